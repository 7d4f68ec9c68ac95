"""The one exception for bad input (a recipe key, a data file, a result file, a flag), and what the scripts do with it.

Library code raises UserError with a message that names the file, key or row; an entry script lets `exit_on_user_error`
turn it into one line on stderr and exit status 1 (as sys.exit with a message), instead of a traceback.
"""

import contextlib
import difflib
import sys


class UserError(Exception):
    """Bad input that the user can fix; the message says where and how."""


@contextlib.contextmanager
def exit_on_user_error(program):
    """`with exit_on_user_error("train_sft.py"): main()`: a UserError becomes "train_sft.py: message", exit 1."""
    try:
        yield
    except UserError as err:
        print(f"{program}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def did_you_mean(unknown, known):
    """Hint lines for unknown keys: the closest valid name of each, where there is one."""
    hints = [f"'{key}' -> did you mean '{close[0]}'?" for key in unknown
             if (close := difflib.get_close_matches(key, known, n=1))]
    return "\n  " + "\n  ".join(hints) if hints else ""
