"""Training jobs (VAE, vocoder, LFM) on Ray Train + DeepSpeed, tracked in MLflow."""
