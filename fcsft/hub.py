"""The Hugging Face Hub, for epoch checkpoints, model cards and merged models: the token comes from HF_TOKEN only and
never reaches a message, a log, a card or a file; the hub is checked before any work, and a failed upload names the
local folder (kept) and the command that uploads it later.
"""

import logging
import os
import re
from pathlib import Path

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
