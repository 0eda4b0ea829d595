"""Downloading a transformers Gemma 3 checkpoint from the Hugging Face Hub: weights, config and tokenizer.

Only safetensors, JSON and tokenizer files are fetched (`allow_patterns`), never pickles. A gated
repository (Google's own Gemma uploads) gets a message that says what to do, and names an ungated
copy where one is known.
"""

from __future__ import annotations

import re
from pathlib import Path

from .checkpoint import CheckpointError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
# Public copies of gated repositories (same weights, same licence) that download without a token.
UNGATED_COPIES = {
    "google/gemma-3-270m": "unsloth/gemma-3-270m",
    "google/gemma-3-270m-it": "unsloth/gemma-3-270m-it",
}


def is_repo_id(text: str) -> bool:
    return bool(REPO_ID.match(text.strip()))


def gated_message(repo_id: str) -> str:
    message = (
        f"{repo_id} is a gated repository: open https://huggingface.co/{repo_id} while logged in and accept its "
        "licence (the Gemma Terms of Use), then create a read token at https://huggingface.co/settings/tokens and "
        "set it as HF_TOKEN in the environment that starts this program."
    )
    copy = UNGATED_COPIES.get(repo_id)
    if copy:
        message += f" Or load the ungated copy {copy} (the same weights, under the same terms)."
    return message


def _is_gated(exc: BaseException) -> bool:
    try:
        from huggingface_hub.errors import GatedRepoError
    except ImportError:  # pragma: no cover - older huggingface_hub
        return "gated" in str(exc).lower()
    return isinstance(exc, GatedRepoError) or "gated" in str(exc).lower()


def download(repo_id: str, local_dir: str | Path | None = None) -> Path:
    """Download a Hub repository's config, safetensors weights and tokenizer files; return the folder.

    With `local_dir` the files land there; without, in the Hugging Face cache. Raises CheckpointError
    with a message a user can act on (gated, offline, unknown repository).
    """
    repo_id = (repo_id or "").strip()
    if not is_repo_id(repo_id):
        raise CheckpointError(f"{repo_id!r} is not a Hub repository id; it looks like 'owner/name'.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - gradio and datasets depend on huggingface_hub
        raise CheckpointError("huggingface_hub is not installed, so nothing can be downloaded.") from exc
    try:
        path = snapshot_download(
            repo_id, local_dir=str(local_dir) if local_dir is not None else None,
            allow_patterns=ALLOW_PATTERNS, etag_timeout=10,
        )
    except Exception as exc:  # offline, unknown repo, gated repo, ...: one clear message each
        if _is_gated(exc):
            raise CheckpointError(gated_message(repo_id)) from exc
        raise CheckpointError(
            f"Could not download {repo_id} from the Hugging Face Hub ({type(exc).__name__}). "
            "The Hub may be unreachable from this machine (offline?), or the repository does not exist "
            "or is private. Local checkpoints still work."
        ) from exc
    return Path(local_dir) if local_dir is not None else Path(path)
