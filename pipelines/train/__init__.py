"""Training jobs (VAE, vocoder, LFM) on Ray Train + DeepSpeed, tracked in MLflow.

``jobs`` is the table of jobs (:data:`~pipelines.train.jobs.JOBS`); ``launch`` starts one
from the driver, ``worker`` runs it in each Ray Train worker through the one ``loop``. The
jobs themselves: ``vae`` and ``vocoder`` (two small tasks over the shared ``gan`` update) and
``lfm``; ``data``, ``engines`` and ``weights`` are what they share.
"""
