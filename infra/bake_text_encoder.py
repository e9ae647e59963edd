"""Put a Hugging Face text encoder into the image's HF cache at ``docker build`` time.

``python infra/bake_text_encoder.py google/flan-t5-large`` downloads the tokenizer, config and
one copy of the weights (safetensors when the repo has them, else the PyTorch ``.bin``) into
``$HF_HOME``, then loads them with the hub switched off through the same ``transformers`` calls
as ``lafma.text.encoders.t5_encoder``. With the image's ``HF_HUB_OFFLINE=1`` the text stage then
resolves ``text.name_or_path: google/flan-t5-large`` from the cache on any node, hub or no hub.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Loads exactly what the text stage loads (lafma/text/encoders.py: t5_encoder).
_CHECK = """
import sys
from transformers import AutoTokenizer, T5EncoderModel
AutoTokenizer.from_pretrained(sys.argv[1])
model = T5EncoderModel.from_pretrained(sys.argv[1])
print(f"{sys.argv[1]}: d_model={model.config.d_model}, loads offline")
"""


def bake(repo_id: str) -> None:
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi().list_repo_files(repo_id)
    weights = (
        ["*.safetensors"]
        if any(f.endswith(".safetensors") for f in files)
        else ["pytorch_model*.bin*"]
    )
    # Config, tokenizer (json + sentencepiece model) and a single weight format: not the
    # TF / Flax copies that would triple the image.
    snapshot_download(repo_id, allow_patterns=["*.json", "*.model", *weights])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", _CHECK, repo_id], env=env, check=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python infra/bake_text_encoder.py <hub id, e.g. google/flan-t5-large>")
    bake(sys.argv[1])
