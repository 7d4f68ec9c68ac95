"""The Hugging Face Hub, for epoch checkpoints, model cards and merged models: the token comes from HF_TOKEN only and
never reaches a message, a log, a card or a file; the hub is checked before any work, and a failed upload names the
local folder (kept) and the command that uploads it later.
"""

import logging
import os
import re
from pathlib import Path

from fcsft.errors import UserError

logger = logging.getLogger(__name__)


class HubPushError(RuntimeError):
    """A hub call failed; the local checkpoint named in the message is complete."""


def make_hub_client(token):
    """The real client. Tests replace this (or pass `hub_client=`) with a stand-in that records calls."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


def looks_local(name):
    """A local path (or a local data file name), not a hub id: hub metadata takes hub ids only."""
    return name is None or Path(name).exists() or Path(name).suffix in (".json", ".jsonl", ".parquet")


TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HF_API_TOKEN", "WANDB_API_KEY")
# What Hugging Face user and organisation tokens look like (hf_ + 30-40 letters and digits; api_org_... for old ones)
TOKEN_PATTERN = re.compile(r"\b(?:hf_[A-Za-z0-9]{16,}|api_org_[A-Za-z0-9]{16,})\b")
extra_secrets = set()  # tokens given by another route (a refused hub_token): scrubbed from everything written too


def check_model_source(name, key):
    """Before any folder is made or anything loads: a model given as a path must be a folder, and a hub id must be
    reachable or cached. Otherwise transformers says "Repo id must be in the form..." about a mistyped path, or
    prints 47 lines about the network for an id that was never downloaded."""
    if not name or Path(name).is_dir():
        return
    if Path(name).exists():
        raise UserError(f"{key}: {name} is a file, not a model folder (config.json + weights) or a hub id")
    hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) and not name.startswith((".", "-")) and ".." not in name
    if not hub_id:
        raise UserError(f"{key}: {name}: no such folder (and not a hub id of the form owner/name)")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise UserError(f"{key}: {name} is neither a local folder nor in the Hugging Face cache, and the hub is offline "
                        f"(HF_HUB_OFFLINE=1): download it first with `hf download {name}` (on a machine with network, "
                        "then copy the cache), or give a local folder")


def scrub_token(text):
    """The text with every token replaced by ***: the values of the token variables, any token seen by another
    route, and anything that looks like a Hugging Face token (hf_...), whichever way it was given."""
    text = str(text)
    secrets = {os.environ.get(name) for name in TOKEN_VARIABLES} | extra_secrets
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        if len(secret) >= 8:  # a short value (e.g. "1") is not a secret and would garble the text
            text = text.replace(secret, "***")
    return TOKEN_PATTERN.sub("***", text)


def scrub_value(value):
    """scrub_token over a JSON-like value (dicts, lists, strings), for run summaries and settings."""
    if isinstance(value, dict):
        return {key: scrub_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_value(item) for item in value]
    return scrub_token(value) if isinstance(value, str) else value


def hub_access_problem(get_client, repo_id, private, what, create_repo=True):
    """Before any work: a token in HF_TOKEN, the hub reachable, the repository writable. The problem, or None.
    `what` names the setting that asked for the push (e.g. "hub_push_epochs=branch")."""
    if not os.environ.get("HF_TOKEN"):
        return (f"{what} needs a write token in the HF_TOKEN environment variable (export HF_TOKEN=hf_...); it is read "
                "from there only")
    try:
        client = get_client()
        who = client.whoami()
        if create_repo:
            client.create_repo(repo_id, private=private, exist_ok=True)
        logger.warning("%s: pushing to %s as %s", what, repo_id, who.get("name", "?") if isinstance(who, dict) else "?")
    except Exception as err:  # noqa: BLE001 - any failure here means we cannot push later either
        return (f"cannot reach or write to the Hugging Face Hub for {what} (hub_model_id {repo_id}): "
                f"{type(err).__name__}: {scrub_token(err)[:500]}")
    return None


def push_folder(client, folder, repo_id, branch, private, what, commit_message):
    """Upload a local folder to a repository (and branch), creating them if needed. Returns None, or an error message
    that names the local folder, which is kept, and the command that pushes it later."""
    where = f"{repo_id}@{branch}" if branch else repo_id
    try:
        client.create_repo(repo_id, private=private, exist_ok=True)
        if branch:
            client.create_branch(repo_id, branch=branch, exist_ok=True)
        client.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=branch, commit_message=commit_message)
    except Exception as err:  # noqa: BLE001
        retry = f"hf upload {repo_id} {folder}" + (f" --revision {branch}" if branch else "")
        return (f"pushing {what} to {where} failed: {type(err).__name__}: {scrub_token(err)[:500]}\n"
                f"  The checkpoint is saved at {folder}; push it later with: {retry}")
    logger.warning("pushed %s to https://huggingface.co/%s%s", what, repo_id, f"/tree/{branch}" if branch else "")
    return None
