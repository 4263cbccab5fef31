"""The training loop and what it runs on: checkpoints, the device mesh, logs and summaries."""
