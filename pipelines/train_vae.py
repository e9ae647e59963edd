"""Train the VAE alone: ``python pipelines/train_vae.py [--config FILE] [key=value ...]``.

Runs the ``train_vae`` stage and the stages it needs; a re-run with the same config resumes
from the last checkpoint, and raising ``train_vae.steps`` continues the same run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from pipelines.train_job import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("train_vae"))
