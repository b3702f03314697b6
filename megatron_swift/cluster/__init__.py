"""Launching on clusters: SLURM batch scripts (slurm.py)."""
