"""The one way Trellis uploads to the Hugging Face Hub: a model directory and its card, in one commit.

The token comes from `HF_TOKEN` or `hf auth login`, read by huggingface_hub itself; Trellis never reads,
logs or writes it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger("trellis")
CARD_TEMPLATE = Path(__file__).with_name("model_card.md")  # jinja: metadata, title, summary, sections
CARD = "README.md"
# Not published: training checkpoints and logs, pickles (safetensors only), the folder's own card (replaced).
_SKIPPED_DIRS = re.compile(r"^(checkpoint-\d+|runs|\..*)$")
_SKIPPED_FILES = re.compile(r"^(README\.md|.*\.(bin|pt|pth|pkl|pickle|tmp))$")


def files_to_upload(folder: str) -> list[str]:
    """The files of a model directory that are published, relative to it, sorted."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _SKIPPED_DIRS.match(d))
        for name in names:
            if not _SKIPPED_FILES.match(name):
                files.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(files)


def upload_model(
    folder: str,
    repo_id: str,
    card: str,
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    api: Any = None,
) -> dict:
    """Upload a model directory (its files but checkpoints, logs and pickles, plus `card` as README.md) in one
    commit, creating the repository (and `revision` as a branch) if needed; return the upload plan. Training
    stages, quantization and pipeline publishing all upload through here."""
    files = files_to_upload(folder)
    plan = {
        "repo_id": repo_id,
        "repo_type": "model",
        "private": private,
        "revision": revision or "main",
        "commit_message": commit_message
        or f"Upload {os.path.basename(os.path.normpath(folder))} with Trellis",
        "folder": folder,
        "files": sorted([*files, CARD]),
        "dry_run": dry_run,
    }
    if dry_run:
        logger.info(
            "Dry run: would upload %d files to %s (%s)", len(plan["files"]), repo_id, plan["revision"]
        )
        return plan
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api or HfApi()  # the token: HF_TOKEN or the saved login, read by huggingface_hub itself
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if plan["revision"] != "main":
        api.create_branch(repo_id, repo_type="model", branch=plan["revision"], exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=os.path.join(folder, f)) for f in files]
    operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode()))
    info = api.create_commit(
        repo_id,
        operations,
        commit_message=plan["commit_message"],
        revision=plan["revision"],
        repo_type="model",
    )
    plan["commit_url"] = str(getattr(info, "commit_url", info))
    logger.info("Published %s to %s", folder, plan["commit_url"])
    return plan


def model_card(data, title: str, sections: dict[str, str], summary: str = ""):
    """Every card Trellis writes (training stages, evaluation, quantized variants, pipeline publishing): the
    metadata (a huggingface_hub ModelCardData: model-index results, base model, datasets, tags) and markdown
    sections, rendered from one template."""
    from huggingface_hub import ModelCard

    return ModelCard.from_template(
        data, template_path=str(CARD_TEMPLATE), title=title, summary=summary, sections=sections
    )


def vllm_usage(where: str) -> str:
    """A card's section on serving a transformers model (a directory or a Hub repository) with vLLM."""
    request = f'{{"model": "{where}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
    return (
        "Serve it with vLLM's OpenAI-compatible server, then ask it with any OpenAI client:\n\n"
        f"```bash\nvllm serve {where}\ncurl localhost:8000/v1/chat/completions -H 'Content-Type: "
        f"application/json' -d '{request}'\n```\n\n"
        "For llama.cpp (and the tools built on it), the export stage writes GGUF files: "
        "`scripts/export.py --config recipes/<model>/export.yaml`."
    )


def llama_cpp_usage(file: str) -> str:
    """A card's section on running a GGUF file with llama.cpp (its chat template is in the file)."""
    return (
        f"```bash\nllama-cli -m {file} -cnv             # chat in the terminal\n"
        f"llama-server -m {file} --port 8080     # an OpenAI-compatible server\n```\n\n"
        "From Python, with llama-cpp-python:\n\n"
        f'```python\nfrom llama_cpp import Llama\n\nllm = Llama(model_path="{file}")\n'
        'llm.create_chat_completion(messages=[{"role": "user", "content": "Hello"}])\n```'
    )
