"""Training: config, optimizer, train/eval steps, the trainer loop, checkpoints, metrics."""
