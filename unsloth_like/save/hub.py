"""``model.push_to_hub_merged(repo_id, tokenizer, save_method=..., token=..., private=...)`` and
``model.push_to_hub_gguf(repo_id, tokenizer, quantization_method=..., token=...)``.

Each saves with exactly the code of ``save_pretrained_merged`` / ``save_pretrained_gguf`` into a
temporary directory, then uploads it with ``huggingface_hub`` (``create_repo(exist_ok=True)`` + ``upload_folder``, one
commit). ``endpoint`` points the client at another Hub (a mirror, a private deployment, the
tests' local server); by default it is huggingface_hub's own (``HF_ENDPOINT``). The token goes
to huggingface_hub and nowhere else: it is never logged or written to disk by us.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

from .merged import save_pretrained_merged

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


def push_to_hub_merged(model, repo_id: str, tokenizer=None, save_method: str = "merged_16bit", token=None,
                       private: bool | None = None, commit_message: str | None = None, max_shard_size="5GB",
                       endpoint: str | None = None, **kwargs):
    """Save ``model`` as ``save_method`` and upload it to the Hub repository ``repo_id``; returns
    the repository URL."""
    _check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="unsloth_like-push-") as scratch:
        folder = save_pretrained_merged(model, Path(scratch) / "model", tokenizer, save_method=save_method,
                                        max_shard_size=max_shard_size, **kwargs)
        url = _upload(folder, repo_id, token, private, endpoint,
                      commit_message or f"Upload {save_method} model (unsloth_like)")
    logger.info("push_to_hub_merged: uploaded %s (%s) to %s.", repo_id, save_method, url)
    return url


def push_to_hub_gguf(model, repo_id: str, tokenizer=None, quantization_method="q8_0", token=None,
                     private: bool | None = None, commit_message: str | None = None, endpoint: str | None = None,
                     **kwargs):
    """Export ``model`` to GGUF (one file per method, plus the Ollama Modelfile) and upload the
    files to the Hub repository ``repo_id``; returns the repository URL."""
    from .gguf import save_pretrained_gguf
    from .gguf.methods import resolve_methods

    _check_repo_id(repo_id)
    methods = resolve_methods(quantization_method)  # before the scratch export: a typo fails at once
    with tempfile.TemporaryDirectory(prefix="unsloth_like-push-") as scratch:
        folder = Path(scratch) / repo_id.split("/")[-1]
        save_pretrained_gguf(model, folder, tokenizer, quantization_method=methods, **kwargs)
        url = _upload(folder, repo_id, token, private, endpoint,
                      commit_message or f"Upload GGUF {', '.join(methods)} (unsloth_like)")
    logger.info("push_to_hub_gguf: uploaded %s (%s) to %s.", repo_id, ", ".join(methods), url)
    return url


def _check_repo_id(repo_id) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ValueError(f"repo_id must look like 'name' or 'namespace/name', got {repo_id!r}.")


def _upload(folder: Path, repo_id: str, token, private, endpoint, commit_message: str) -> str:
    """``create_repo(exist_ok=True)`` + one ``upload_folder`` commit; returns the repository URL."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    # the Hub's full name: a bare "name" lives in the token owner's namespace
    api.upload_folder(folder_path=str(folder), repo_id=getattr(url, "repo_id", None) or repo_id, repo_type="model",
                      commit_message=commit_message)
    return str(url)
