"""Distributed, tracked jobs around the pure-PyTorch ``lafma`` library (Ray, MLflow, DeepSpeed)."""
