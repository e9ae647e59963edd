"""LAFMA: text-to-audio generation by latent flow matching, as a pure-PyTorch library.

This package never imports ray, mlflow or deepspeed; the distributed and tracked jobs
live in ``pipelines/``.
"""

__version__ = "0.1.0"
