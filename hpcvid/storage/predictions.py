"""The prediction shard: the contract between the "eval" stage and the reducer (``hpcvid collect``).

``WORK/eval/<run>/pred-<IIII>-of-<NNNN>.h5`` (0-based index, like extraction shards) holds, for the test
videos of one shard, the class scores of every inference strategy::

    attributes  schema_version (int, 2), kind = "hpcvid.predictions", model, run, shard ("0001-of-0004"),
                strategies (JSON list, in report order), default_strategy, classes (JSON list),
                checkpoint (path), checkpoint_sha256, config (JSON of the resolved config), code_version
    video_ids   (N,) fixed-length UTF-8 strings, the manifest's video ids
    labels      (N,) int64, index into ``classes``
    splits      (N,) fixed-length UTF-8 strings ("test")
    scores/<strategy>   (N, C) float32, one dataset per strategy (any monotone score: logits or
                probabilities; only the ranking is used)

Every dataset is chunked (1024 rows) with a fletcher32 checksum per chunk (:mod:`hpcvid.storage.h5`): a
damaged chunk fails the read with a one-line StoreError. Strings are fixed-length because HDF5 refuses
filters, the checksum included, on variable-length data. Files of schema 1 are refused (re-run eval).

Beside it, ``pred-<IIII>-of-<NNNN>.json`` is the shard's record, written last and atomically: the shard
counts as done only when its record exists and names the .h5 file's sha256. A run killed mid-shard leaves
no record, so the reducer reports the shard as missing and a rerun redoes it.

h5py is imported inside functions so that ``hpcvid --help`` stays fast.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hpcvid.errors import StoreError
from hpcvid.fileio import atomic_path, read_json, write_record
from hpcvid.launch.sharding import ShardSpec
from hpcvid.storage.h5 import H5File, read_text, write_array, write_text

PREDICTION_SCHEMA_VERSION = 2
PREDICTION_KIND = "hpcvid.predictions"
FIX = "re-run `hpcvid run eval --force` for that shard"
CHUNK_ROWS = 1024
_NAME = re.compile(r"^pred-(\d{4})-of-(\d{4})\.(h5|json)$")


@dataclass
class PredictionShard:
    """One prediction shard in memory (what the file holds)."""

    model: str
    run: str
    shard: ShardSpec
    classes: tuple[str, ...]
    video_ids: list[str]
    labels: np.ndarray
    scores: dict[str, np.ndarray]
    default_strategy: str
    splits: list[str] | None = None
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    code_version: str = ""

    @property
    def strategies(self) -> list[str]:
        return list(self.scores)


def parse_shard_name(name: str) -> ShardSpec | None:
    """'pred-0001-of-0004.h5' -> ShardSpec(1, 4); None for other names."""
    match = _NAME.match(name)
    if not match:
        return None
    return ShardSpec(int(match.group(1)), int(match.group(2)))


def write_prediction_shard(h5_path: Path, record_path: Path, shard: PredictionShard, *,
                           failed: Sequence[Mapping[str, str]] = (),
                           extra_record: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the .h5 atomically, then its record (last). Returns the record."""
    import h5py

    n_videos = len(shard.video_ids)
    labels = np.asarray(shard.labels, dtype=np.int64)
    if labels.shape != (n_videos,):
        raise ValueError(f"labels must have shape ({n_videos},), got {labels.shape}")
    if shard.default_strategy not in shard.scores:
        raise ValueError(f"default strategy {shard.default_strategy!r} is not among {shard.strategies}")
    with atomic_path(h5_path) as temporary:
        with h5py.File(temporary, "w") as out:
            out.attrs.update({
                "schema_version": PREDICTION_SCHEMA_VERSION, "kind": PREDICTION_KIND, "model": shard.model,
                "run": shard.run, "shard": shard.shard.name, "strategies": json.dumps(shard.strategies),
                "default_strategy": shard.default_strategy, "classes": json.dumps(list(shard.classes)),
                "checkpoint": shard.checkpoint, "checkpoint_sha256": shard.checkpoint_sha256,
                "config": json.dumps(dict(shard.config), default=str), "code_version": shard.code_version,
            })
            write_text(out, "video_ids", shard.video_ids, chunk_rows=CHUNK_ROWS)
            write_array(out, "labels", labels, chunk_rows=CHUNK_ROWS)
            splits = shard.splits if shard.splits is not None else ["test"] * n_videos
            write_text(out, "splits", splits, chunk_rows=CHUNK_ROWS)
            group = out.create_group("scores")
            for name, values in shard.scores.items():
                values = np.asarray(values, dtype=np.float32)
                if values.shape != (n_videos, len(shard.classes)):
                    raise ValueError(f"scores of strategy {name!r} must have shape "
                                     f"({n_videos}, {len(shard.classes)}), got {values.shape}")
                write_array(group, name, values, chunk_rows=CHUNK_ROWS)
    fields = {
        "model": shard.model, "run": shard.run,
        "shard": shard.shard.name, "index": shard.shard.index, "count": shard.shard.count, "n_videos": n_videos,
        "videos": list(shard.video_ids), "failed": [dict(f) for f in failed],
        "strategies": shard.strategies, "default_strategy": shard.default_strategy,
        "checkpoint": shard.checkpoint, "code_version": shard.code_version, **(extra_record or {}),
    }
    return write_record(record_path, fields, kind="hpcvid.predictions.record",
                        schema_version=PREDICTION_SCHEMA_VERSION, describes=h5_path)


def read_record(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        record = read_json(path)
    except (OSError, ValueError) as exc:
        raise StoreError(f"prediction record {path} cannot be read ({exc}): delete it and re-run "
                         "`hpcvid run eval` for that shard") from exc
    if record.get("schema_version") != PREDICTION_SCHEMA_VERSION:
        raise StoreError(f"prediction record {path} has schema_version {record.get('schema_version')}, this "
                         f"hpcvid reads {PREDICTION_SCHEMA_VERSION}: re-run `hpcvid run eval --force`")
    return record


def read_prediction_shard(path: Path | str) -> PredictionShard:
    """Read one .h5 prediction shard; a wrong kind or schema, or a damaged chunk, is a one-line StoreError
    naming the file."""
    path = Path(path)
    h5 = H5File(path, kinds={PREDICTION_KIND: FIX}, schema_version=PREDICTION_SCHEMA_VERSION)
    try:
        handle = h5.handle
        with h5.reading():
            attrs = handle.attrs
            strategies = json.loads(attrs["strategies"])
            return PredictionShard(
                model=str(attrs["model"]), run=str(attrs["run"]), shard=parse_shard_name(path.name) or ShardSpec(0, 1),
                classes=tuple(json.loads(attrs["classes"])), video_ids=read_text(handle["video_ids"]),
                labels=handle["labels"][()].astype(np.int64),
                scores={name: handle["scores"][name][()] for name in strategies},
                default_strategy=str(attrs["default_strategy"]), splits=read_text(handle["splits"]),
                checkpoint=str(attrs.get("checkpoint", "")), checkpoint_sha256=str(attrs.get("checkpoint_sha256", "")),
                config=json.loads(attrs.get("config", "{}")), code_version=str(attrs.get("code_version", "")),
            )
    finally:
        h5.close()
