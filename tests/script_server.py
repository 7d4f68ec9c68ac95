"""Runs the entry scripts for the tests without paying their start-up each time.

Every `python train_sft.py ...` spends about 5 s of CPU importing torch, transformers, TRL, datasets and PEFT before
its first line runs, and every `accelerate launch` about 2.5 s importing accelerate's command line before it starts
the workers; the suite runs such commands a hundred times. This process imports them once, then for each request
forks a child that runs the script (or the `accelerate` command's own file) as `python SCRIPT ARGS` would
(`__main__`, sys.argv, sys.path[0], the working directory and environment given, stdout and stderr into files,
SystemExit and uncaught exceptions turned into the same exit code and message), and answers with the exit code. A
launch's workers are what torch's elastic agent always starts: fresh interpreters. conftest.run sends it the commands
it can run this way and starts everything else (commands the tests kill or signal) as a real process.

Protocol: one JSON object per line on stdin {"argv", "cwd", "env", "stdout", "stderr", "timeout"}; one JSON object
per line on stdout {"returncode"} (or {"timeout": true}). "ready" is printed once the imports are done.
"""

import contextlib
import json
import os
import runpy
import signal
import sys
import time
import traceback
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def preload():
    """What the entry scripts import at the top or inside main(); never run anything (no thread pools before fork)."""
    import importlib

    sys.path[0] = str(REPO)  # as for `python SCRIPT.py` in the repo root
    import accelerate.commands.accelerate_cli  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch.distributed.run  # noqa: F401
    import transformers  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401

    for module in sorted((REPO / "fcsft").glob("*.py")):
        importlib.import_module(f"fcsft.{module.stem}")
    for script in sorted(REPO.glob("*.py")):  # the scripts' own imports, without calling main()
        runpy.run_path(str(script), run_name="__preload__")


def run_child(request, answers):
    """In the forked child: become `python argv...` and never return."""
    answers.close()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((0, os.devnull), (1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    script = str(Path(request["cwd"], request["argv"][0]))
    sys.argv = list(request["argv"])
    sys.path[0] = str(Path(script).parent)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None:
            code = 0
        elif isinstance(exit_.code, int):
            code = exit_.code
        else:  # sys.exit("message"): Python prints it and exits 1
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve():
    answers = os.fdopen(os.dup(1), "w")  # the protocol; anything the libraries print goes to stderr
    os.dup2(2, 1)
    preload()
    print("ready", file=answers, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request, answers)
        deadline = time.monotonic() + request["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=answers, flush=True)
                break
            if time.monotonic() > deadline:  # the child and what it started (a launch's workers)
                for proc in [*psutil.Process(pid).children(recursive=True), psutil.Process(pid)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.kill()
                os.waitpid(pid, 0)
                print(json.dumps({"timeout": True}), file=answers, flush=True)
                break
            time.sleep(0.01)


if __name__ == "__main__":
    serve()
