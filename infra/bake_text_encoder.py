"""Put a Hugging Face text encoder into the image's HF cache at ``docker build`` time.

``python infra/bake_text_encoder.py google/flan-t5-large --revision <40-hex commit>`` downloads
the tokenizer, config and one copy of the weights (safetensors when the repo has them, else the
PyTorch ``.bin``) of exactly that commit into ``$HF_HOME``, points the cache's ``main`` at it,
then loads them with the hub switched off through the same ``transformers`` calls as
``lafma.text.encoders.t5_encoder``. With the image's ``HF_HUB_OFFLINE=1`` the text stage then
resolves ``text.name_or_path: google/flan-t5-large`` to that commit on any node, hub or no hub.

A branch or tag name is refused: ``main`` moves, so two builds of one Dockerfile could bake two
different encoders, and the text stage's embeddings (hashed by ``text.name_or_path`` alone)
would silently mix them. Look the commit up once, review it, and pass it (infra/README.md).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

# Loads exactly what the text stage loads (lafma/text/encoders.py: t5_encoder).
_CHECK = """
import sys
from transformers import AutoTokenizer, T5EncoderModel
AutoTokenizer.from_pretrained(sys.argv[1])
model = T5EncoderModel.from_pretrained(sys.argv[1])
print(f"{sys.argv[1]}: d_model={model.config.d_model}, loads offline")
"""

_COMMIT = re.compile(r"[0-9a-f]{40}")


def pin_revision(repo_id: str, revision: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Make ``revision`` (a snapshot already in the cache) what the hub id resolves to offline.

    Offline, ``from_pretrained(repo_id)`` reads the commit of branch ``main`` from
    ``refs/main`` in the cache; a download by commit hash writes no ref, so this writes it.

    Returns:
        The snapshot directory.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / revision
    if not snapshot.is_dir():
        raise FileNotFoundError(f"{snapshot}: {repo_id}@{revision} is not in the cache")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def bake(repo_id: str, revision: str) -> None:
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi().list_repo_files(repo_id, revision=revision)
    weights = (
        ["*.safetensors"]
        if any(f.endswith(".safetensors") for f in files)
        else ["pytorch_model*.bin*"]
    )
    # Config, tokenizer (json + sentencepiece model) and a single weight format: not the
    # TF / Flax copies that would triple the image.
    snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", "*.model", *weights])
    pin_revision(repo_id, revision)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", _CHECK, repo_id], env=env, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo_id", help="hub id, e.g. google/flan-t5-large")
    parser.add_argument(
        "--revision",
        default="",
        help="the full 40-hex commit to bake (required: a branch or tag moves)",
    )
    args = parser.parse_args(argv)
    if not _COMMIT.fullmatch(args.revision):
        parser.error(
            f"--revision {args.revision!r}: give the full 40-hex commit of {args.repo_id} to bake, "
            "not a branch or tag (infra/README.md: 'Build and push the image' says how to find it)"
        )
    bake(args.repo_id, args.revision)


if __name__ == "__main__":
    main()
