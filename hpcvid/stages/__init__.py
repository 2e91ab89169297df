"""The stages, as one table: each is a plain function of (resolved config, shard spec) that returns a record.

A stage module provides five functions; the executors (``hpcvid run``, ``hpcvid submit``, ``hpcvid mpi``)
call them and nothing else, so the same code runs in-process, in submitit's local processes, in SLURM array
tasks and on MPI ranks:

* ``add_arguments(parser)`` - the stage's own flags. Every flag is a config key (``overrides``), so a queued
  job gets exactly the settings ``run`` would use; ``--force`` and ``--shard`` are added by the verbs.
* ``overrides(args) -> dict`` - those flags as dotted config keys (``{"extract.shards": args.shards}``).
* ``unit(config) -> Unit`` - the unit of work this config means (``extract``, ``eval/lstm``): it keys the
  records, progress, locks and submissions (:mod:`hpcvid.workfolder`).
* ``plan(config, only, force) -> list[ShardSpec]`` - declare the unit's current shard set and return the
  shards to run now: all (or shard ``only``) that have no record of the current set, every one with ``force``.
* ``run_shard(config, spec) -> dict`` - do the work of one shard and return its record.
* ``report(config, records) -> int`` - print a summary; 0, or raise PartialFailure (exit 3) for failed items.

Modules are imported only when a stage is used, so ``hpcvid --help`` stays fast on a login node.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Stage:
    """One entry of the table: where the stage's functions live and how its work is shaped.

    ``sharded``: an array of independent shards (one SLURM array task each); otherwise one job.
    ``distributed``: one job whose tasks are the ranks of a torch.distributed group (nodes x tasks per node).
    ``plans_walltime``: the module's ``walltime_needed(config, specs)`` predicts the walltime its shards need
    from measured rates; ``submit`` asks for it when no walltime is given and refuses one below it.
    """

    name: str
    module: str
    help: str
    sharded: bool = True
    distributed: bool = False
    plans_walltime: bool = False

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("extract", "hpcvid.stages.extract",
          "decode, optical flow and CNN features per shard into WORK/extract/shard-*.h5", plans_walltime=True),
    Stage("merge", "hpcvid.stages.merge",
          "merge the shards' features into one file with train-split mean/std (WORK/features.h5)", sharded=False),
    Stage("train", "hpcvid.stages.train", "train a model into WORK/runs/<model>/", sharded=False,
          distributed=True),
    Stage("features", "hpcvid.stages.features",
          "recompute per-frame features + scores with a trained frame CNN into WORK/features/<run>/"),
    Stage("eval", "hpcvid.stages.evaluate",
          "score the test videos with a trained model under several inference strategies -> WORK/eval/<model>/"),
    Stage("predict", "hpcvid.stages.predict",
          "classify videos of one's own with a trained run (top classes, timelines) -> one table"),
    Stage("reduce", "hpcvid.stages.reduce",
          "reduce prediction shards into results/NAME (tables, confusion matrices, plots)", sharded=False),
)}
PIPELINE_ORDER = ("extract", "merge", "train", "features", "eval", "reduce")


def stage(name: str) -> Stage:
    from hpcvid.errors import ConfigError

    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]
