"""The code MLflow runs to load a ``lafma`` model version (MLflow's "models from code"):
loading executes this file rather than unpickling an object, so a swapped artifact cannot
run arbitrary code through pickle."""

import mlflow

from pipelines.serving import LafmaModel

mlflow.models.set_model(LafmaModel())
