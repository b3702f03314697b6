"""The training loop and what it needs: optimizer, schedule, run length, checkpoints, FLOPs."""
