"""hpcvid: video action recognition on HPC clusters, from raw clips to published tables.

Stages (one module each): synth, index, extract, merge, train, features, eval, reduce.
Executors (local, SLURM through submitit, MPI) only decide where a shard runs.
"""
from __future__ import annotations

__version__ = "0.1.0"
