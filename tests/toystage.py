"""A test-only shard stage for the launcher's tests (never registered outside tests).

It does what a real stage does, in miniature: items per shard, one output file per item written
atomically, resume by skipping finished items, per-item progress (hpcvid.launch.progress), the record last,
the current-set rule of the work folder. Its knobs live in WORK/toy.json (so that jobs on SLURM nodes read
the same): {"items": per shard, "sleep": seconds per item, "sleep_by_shard": {"1": seconds per item of
shard 1}, "fail": [shard indices that raise]}. Every item it starts is appended to WORK/toy/started.log
("shard item restart"), which lets a test count what was redone after a requeue. The ``toymerge`` stage
(one job) needs every shard record, and records when it ran.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from hpcvid.errors import StoreError
from hpcvid.fileio import atomic_write_json, atomic_write_text
from hpcvid.launch.progress import write_progress
from hpcvid.launch.sharding import ShardSpec, all_shards
from hpcvid.stages import Stage
from hpcvid.workfolder import Unit, WorkFolder

TOY = Stage("toy", "toystage", "test-only stage: files per item, with a sleep")
TOYMERGE = Stage("toymerge", "toymerge", "test-only merge of toy shards", sharded=False)
UNIT = Unit("toy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=int, help="number of shards")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"extract.shards": getattr(args, "shards", None)}


def settings(config) -> dict[str, Any]:
    return json.loads((Path(config.work) / "toy.json").read_text())


def unit(config) -> Unit:
    return UNIT


def plan(config, only=None, force=False) -> list[ShardSpec]:
    return WorkFolder.of(config).plan(UNIT, config.extract.shards, {"toy": 1}, only=only, force=force)


def record_path(config, spec: ShardSpec) -> Path:
    return WorkFolder.of(config).record_file(UNIT, spec)


def run_shard(config, spec: ShardSpec) -> dict[str, Any]:
    knobs = settings(config)
    shard_set = WorkFolder.of(config).ensure_set(UNIT, spec.count, {"toy": 1})
    out = Path(config.work) / "toy" / f"shard-{spec.name}.items"
    out.mkdir(parents=True, exist_ok=True)
    items = [f"item{spec.index * 100 + i:05d}" for i in range(knobs["items"])]
    started = time.time()
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    write_progress(config.work, UNIT, spec, done=0, total=len(items), started=started)
    for done, item in enumerate(items):
        target = out / f"{item}.txt"
        if target.exists() and not spec.force:
            continue
        with open(Path(config.work) / "toy" / "started.log", "a") as log:
            log.write(f"{spec.index} {item} {restart}\n")
        time.sleep(knobs.get("sleep_by_shard", {}).get(str(spec.index), knobs.get("sleep", 0)))
        atomic_write_text(target, f"{item} of shard {spec.name}\n")
        write_progress(config.work, UNIT, spec, done=done + 1, total=len(items), started=started)
    if spec.index in knobs.get("fail", []):
        raise StoreError(f"toy shard {spec.name} fails on purpose")
    record = {"shard": spec.name, "index": spec.index, "count": spec.count, "videos": items, "failed": [],
              "finished": time.time(), "restart": restart, "set": shard_set.id}
    atomic_write_json(record_path(config, spec), record)
    return record


def report(config, records) -> int:
    print(f"toy: {len(records)} shard(s)")
    return 0


class Merge:
    """The ``toymerge`` stage: one job that needs every toy shard record."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        pass

    @staticmethod
    def overrides(args) -> dict[str, Any]:
        return {}

    @staticmethod
    def unit(config) -> Unit:
        return Unit("toymerge")

    @staticmethod
    def plan(config, only=None, force=False) -> list[ShardSpec]:
        return [ShardSpec(0, 1, force)]

    @staticmethod
    def run_shard(config, spec) -> dict[str, Any]:
        specs = all_shards(config.extract.shards)
        missing = [s.name for s in specs if not record_path(config, s).exists()]
        if missing:
            raise StoreError(f"toymerge: shards {missing} have no record")
        record = {"shards": len(specs)}
        atomic_write_json(Path(config.work) / "toy" / "merged.json", record)
        return record

    @staticmethod
    def report(config, records) -> int:
        return 0
