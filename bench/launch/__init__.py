"""Execution back-ends: local worker processes (and, later, Slurm through submitit)."""
