"""The work folder: the one owner of every path under WORK, and of which shard set each unit reads.

Every unit of work has a complete name, a :class:`Unit` (its stage and, where a stage runs for several
models, its run): ``extract``, ``merge``, ``features/frame``, ``train/lstm``, ``eval/frame``. The unit keys
its output folder, its shard records, its progress files, its locks and its submission records, so two
models' training and evaluation can be queued, run and shown side by side without touching each other.

Layout (every name below comes from :class:`WorkFolder`; no other module builds a path under WORK)::

    WORK/manifest.json                    the indexed dataset (video paths relative to the dataset root)
    WORK/config.resolved.json             the settings and command line of the last `run` / `submit`
    WORK/extract/shard-IIII-of-NNNN.h5    extraction shards, each with its record .json (written last)
    WORK/extract/set.json                 the current shard set: its shard count and identity
    WORK/features.h5 (+ features.json)    the merged features of the extraction (merge)
    WORK/features/<run>/shard-*.h5, set.json, features.h5
                                          per-frame features recomputed by a trained CNN (features stage)
    WORK/runs/<run>/                      checkpoints, metrics.jsonl, resolved config (train)
    WORK/eval/<run>/pred-IIII-of-NNNN.h5  prediction shards and their records, set.json (eval)
    WORK/explain/<run>/<video>__<class>.png  Grad-CAM overlays drawn by `hpcvid explain`
    WORK/jobs/<unit>-<time>.json          submission records; jobs/logs/ holds submitit's files
    WORK/.progress/<unit>/shard-*.json    progress a login node can read while a shard runs
    WORK/.locks/<unit>/shard-*.lock       who works on a shard now (hpcvid.launch.locks)
    WORK/.verified/                       which files' sha256 was checked against their record

The current set. A sharded unit's records are read only when they belong to its *current set*: the shard
count and identity (the settings and inputs that determine the contents) declared in ``set.json`` by the
last plan of that unit. Records of another count, or made with other settings or from another manifest,
are *stale*: ``hpcvid status`` names them and no stage reads them. A set that misses a record is incomplete,
and reading it is an error that names the missing shards and the command that makes them.

Paths stored inside WORK are relative to WORK (or, for videos, to the dataset root), so a work folder can
be copied or moved and reads only its own files.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from hpcvid.errors import ConfigError, StoreError
from hpcvid.fileio import atomic_write_json, read_json, sha256_file
from hpcvid.launch.sharding import ShardSpec

log = logging.getLogger(__name__)

SET_NAME = "set.json"
SET_SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
RESOLVED_CONFIG_NAME = "config.resolved.json"
MERGED_NAME = "features.h5"
_SHARD_NAME = re.compile(r"^(?P<prefix>shard|pred)-(?P<index>\d{4,})-of-(?P<count>\d{4,})\.json$")
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# stage -> folder below WORK holding its units' outputs; the run (if any) is a sub-folder
_STAGE_DIRS = {"extract": "extract", "features": "features", "train": "runs", "eval": "eval", "predict": "predict"}
_RECORD_PREFIX = {"eval": "pred", "predict": "pred"}
HIDDEN_DIRS = (".progress", ".locks", ".verified")


@dataclass(frozen=True, order=True)
class Unit:
    """A unit of work: a stage, and the run it is for (``eval/lstm``); keys records, progress, locks, jobs."""

    stage: str
    run: str = ""

    def __post_init__(self) -> None:
        for part in (self.stage, self.run):
            if part and not _NAME_PART.match(part):
                raise ConfigError(f"{part!r} cannot name a stage or run: use letters, digits, '.', '_' and '-'")

    def __str__(self) -> str:
        return f"{self.stage}/{self.run}" if self.run else self.stage

    @classmethod
    def parse(cls, text: str) -> "Unit":
        stage, _, run = str(text).partition("/")
        return cls(stage, run)

    @property
    def slug(self) -> str:
        """The unit in a file name (``eval-lstm``)."""
        return str(self).replace("/", "-")


@dataclass(frozen=True)
class ShardSet:
    """A unit's current set of shards: how many, and the identity its records must carry."""

    count: int
    identity: dict[str, Any]

    @property
    def id(self) -> str:
        """A short digest of (count, identity): records of this set carry it as ``set``."""
        return set_id(self.count, self.identity)


def set_id(count: int, identity: Mapping[str, Any]) -> str:
    text = json.dumps({"count": int(count), "identity": identity}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class WorkFolder:
    """Every path under one work folder, and the rules for which of its files a stage may read."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @classmethod
    def of(cls, config: Any) -> "WorkFolder":
        return cls(config.work)

    def __repr__(self) -> str:
        return f"WorkFolder({str(self.root)!r})"

    # ---------------------------------------------------------------------------------- fixed files
    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def resolved_config(self) -> Path:
        return self.root / RESOLVED_CONFIG_NAME

    @property
    def rates(self) -> Path:
        """Extraction rates measured with this folder's settings (``hpcvid plan`` and ``submit extract``)."""
        return self.root / "bench.json"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    @property
    def logs_dir(self) -> Path:
        return self.jobs_dir / "logs"

    def require(self, what: str = "this stage") -> "WorkFolder":
        """Refuse (without creating anything) when the folder does not exist or holds no manifest."""
        if not self.root.is_dir():
            raise ConfigError(f"work folder {self.root} does not exist: give the folder you indexed and "
                              f"extracted into (--work or the job file's `work`); {what} creates nothing")
        return self

    # ---------------------------------------------------------------------------------- units
    def unit_dir(self, unit: Unit) -> Path:
        """The folder of a unit's outputs (``extract/``, ``runs/lstm/``, ``eval/frame/``, ...)."""
        if unit.stage == "merge":
            return self.root if not unit.run else self.unit_dir(Unit("features", unit.run))
        folder = _STAGE_DIRS.get(unit.stage, unit.stage)
        return self.root / folder / unit.run if unit.run else self.root / folder

    def run_dir(self, run: str) -> Path:
        return self.unit_dir(Unit("train", run))

    def explain_dir(self, run: str) -> Path:
        """Where `hpcvid explain` draws a run's Grad-CAM overlays (pictures for people; no stage reads them)."""
        return self.root / "explain" / Unit("explain", run).run

    def prefix(self, unit: Unit) -> str:
        return _RECORD_PREFIX.get(unit.stage, "shard")

    def shard_file(self, unit: Unit, spec: ShardSpec) -> Path:
        return self.unit_dir(unit) / f"{self.prefix(unit)}-{spec.name}.h5"

    def record_file(self, unit: Unit, spec: ShardSpec) -> Path:
        """The record of one shard, written last: it exists exactly when the shard's work is done."""
        if unit.stage == "merge":
            return self.unit_dir(unit) / Path(MERGED_NAME).with_suffix(".json")
        if unit.stage == "train":
            return self.unit_dir(unit) / "run.json"
        return self.unit_dir(unit) / f"{self.prefix(unit)}-{spec.name}.json"

    def parts_dir(self, unit: Unit, spec: ShardSpec) -> Path:
        return self.unit_dir(unit) / f"{self.prefix(unit)}-{spec.name}.parts"

    def progress_file(self, unit: Unit, spec: ShardSpec) -> Path:
        return self.root / ".progress" / str(unit) / f"shard-{spec.name}.json"

    def lock_file(self, unit: Unit, spec: ShardSpec) -> Path:
        return self.root / ".locks" / str(unit) / f"shard-{spec.name}.lock"

    def lock(self, unit: Unit, spec: ShardSpec) -> Any:
        """The lock of one shard of a unit (a context manager; see :mod:`hpcvid.launch.locks`)."""
        from hpcvid.launch.locks import UnitLock

        return UnitLock(self.lock_file(unit, spec), f"{unit} shard {spec.name}")

    def merged_file(self, source: Unit = Unit("extract")) -> Path:
        """The merged features file of a features unit: WORK/features.h5 for the extraction."""
        return self.unit_dir(merge_unit(source)) / MERGED_NAME

    def merged_record(self, source: Unit = Unit("extract")) -> Path:
        return self.record_file(merge_unit(source), ShardSpec(0, 1))

    # ---------------------------------------------------------------------------------- relocation
    def relative(self, path: Path | str) -> str:
        """``path`` as stored inside WORK: relative to WORK when it lies below it ('/'-separated)."""
        path = Path(path)
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path)

    def absolute(self, stored: str) -> Path:
        """A path stored by :meth:`relative`, below this work folder wherever it now lies."""
        path = Path(stored)
        return path if path.is_absolute() else self.root / path

    # ---------------------------------------------------------------------------------- shard sets
    def set_file(self, unit: Unit) -> Path:
        return self.unit_dir(unit) / SET_NAME

    def current_set(self, unit: Unit) -> ShardSet | None:
        """The set declared by the last plan of ``unit`` (None before the first)."""
        path = self.set_file(unit)
        if not path.is_file():
            return None
        try:
            payload = read_json(path)
            return ShardSet(int(payload["count"]), dict(payload["identity"]))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise StoreError(f"{path} is unreadable ({error}): plan {unit} again (`hpcvid run {unit.stage} "
                             "--force` redoes its shards)") from error

    def declare_set(self, unit: Unit, count: int, identity: Mapping[str, Any]) -> ShardSet:
        """Make (count, identity) the current set of ``unit``; records of any other set become stale.

        Inside :func:`dry_run` nothing is written: a ``--dry-run`` must not change what is current.
        """
        shard_set = ShardSet(int(count), json.loads(json.dumps(dict(identity), sort_keys=True, default=str)))
        current = self.current_set(unit)
        if current != shard_set and not planning_only():
            stale = self.record_sets(unit).get(current.id, []) if current is not None else []
            if stale:
                log.warning("%s: a new set (%d shards) replaces the current one (%s); its %d record(s) stay in %s "
                            "but are no longer read", unit, shard_set.count,
                            describe_difference(current, shard_set), len(stale), self.unit_dir(unit))
            atomic_write_json(self.set_file(unit), {"schema_version": SET_SCHEMA_VERSION, "unit": str(unit),
                                                     "count": shard_set.count, "identity": shard_set.identity,
                                                     "id": shard_set.id})
        return shard_set

    def ensure_set(self, unit: Unit, count: int, identity: Mapping[str, Any]) -> ShardSet:
        """A shard about to run checks that it belongs to the current set (declaring it when there is none).

        A shard whose count or identity differs from a declared set was planned with other settings or
        inputs than the set it would join: it is refused rather than mixed in. An input that did not exist
        when the set was planned (a checkpoint still being trained when a pipeline was queued) is declared
        as None; the first shard that runs fills it in.
        """
        wanted = ShardSet(int(count), json.loads(json.dumps(dict(identity), sort_keys=True, default=str)))
        current = self.current_set(unit)
        if current is None or _fills_pending(current, wanted):
            return self.declare_set(unit, count, identity)
        if current != wanted:
            differs = describe_difference(current, wanted)
            raise StoreError(f"{self.set_file(unit)}: the current {unit} set is another one ({differs}); plan "
                             f"again so that this one becomes current: `hpcvid run {unit.stage}` (or submit) "
                             "with the settings you want")
        return current

    def plan(self, unit: Unit, count: int, identity: Mapping[str, Any], *, only: int | None = None,
             force: bool = False) -> list[ShardSpec]:
        """Declare (count, identity) the unit's current set; return its shards to run now.

        All shards (or shard ``only``) except those that already have a record of this set; with ``force``
        every one. "It has a record of the current set" means "this shard is done", for every stage. The
        shards asked for are checked before anything is declared.
        """
        specs = [ShardSpec(only, count, force)] if only is not None else [ShardSpec(i, count, force)
                                                                           for i in range(count)]
        shard_set = self.declare_set(unit, count, identity)
        todo = []
        for spec in specs:
            if not force and _record_set_id(self.record_file(unit, spec)) == shard_set.id:
                log.info("%s shard %s is done (%s); skipped - --force redoes it", unit, spec.name,
                         self.record_file(unit, spec))
            else:
                todo.append(spec)
        return todo

    def record_sets(self, unit: Unit) -> dict[str, list[Path]]:
        """Every record of a unit's folder, grouped by the set id it carries (unreadable ones under '?')."""
        groups: dict[str, list[Path]] = {}
        folder = self.unit_dir(unit)
        if not folder.is_dir():
            return groups
        for path in sorted(folder.iterdir()):
            if _SHARD_NAME.match(path.name):
                groups.setdefault(_record_set_id(path), []).append(path)
        return groups

    def is_current(self, unit: Unit, spec: ShardSpec) -> bool:
        """True when shard ``spec`` has a record of the current set (the rule for 'this shard is done')."""
        current = self.current_set(unit)
        path = self.record_file(unit, spec)
        return (current is not None and spec.count == current.count and path.is_file()
                and _record_set_id(path) == current.id)

    def current_records(self, unit: Unit, *, fix: str | None = None) -> list[Path]:
        """The record of every shard of the unit's current set, in shard order.

        Raises StoreError (naming what is missing and how to make it) when there is no set yet or when a
        shard of it has no record of this set.
        """
        fix = fix or f"run or resume `hpcvid run {unit.stage}` (or `hpcvid submit {unit.stage}`)"
        current = self.current_set(unit)
        if current is None:
            raise StoreError(f"{self.unit_dir(unit)} holds no planned {unit} set: {fix} first")
        missing = [spec.name for spec in _all(current.count) if not self.is_current(unit, spec)]
        if missing:
            shown = ", ".join(missing[:6]) + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
            raise StoreError(f"{unit} is not complete in {self.unit_dir(unit)}: shard(s) {shown} of the current "
                             f"{current.count}-shard set have no record yet: {fix}")
        return [self.record_file(unit, spec) for spec in _all(current.count)]

    def current_shards(self, unit: Unit, *, fix: str | None = None) -> list[Path]:
        """The shard files of the unit's complete current set, each checked against its record's sha256."""
        shards = []
        for record_file in self.current_records(unit, fix=fix):
            record = read_json(record_file)
            shard = record_file.parent / record["file"]
            self.verify(shard, record["sha256"], fix=redo_hint(unit, int(record["index"])))
            shards.append(shard)
        return shards

    def current_shard(self, unit: Unit, spec: ShardSpec) -> Path:
        """The file of shard ``spec`` of the unit's current set, checked against its record's sha256: what a
        stage that follows another shard by shard reads, before the other shards are done."""
        current = self.current_set(unit)
        if current is None or current.count != spec.count:
            raise StoreError(f"{self.unit_dir(unit)} holds no {spec.count}-shard {unit} set (it now has "
                             f"{current.count if current else 'none'}): plan both stages again")
        if not self.is_current(unit, spec):
            raise StoreError(f"{unit} shard {spec.name} has no record of the current set in {self.unit_dir(unit)}: "
                             f"run or resume `hpcvid run {unit.stage} --shard {spec.index}` first")
        record = read_json(self.record_file(unit, spec))
        shard = self.record_file(unit, spec).parent / record["file"]
        self.verify(shard, record["sha256"], fix=redo_hint(unit, spec.index))
        return shard

    def stale_records(self, unit: Unit) -> list[Path]:
        """Records in the unit's folder that do not belong to its current set (never read)."""
        current = self.current_set(unit)
        current_id = current.id if current is not None else None
        return [p for sid, paths in self.record_sets(unit).items() if sid != current_id for p in paths]

    # ---------------------------------------------------------------------------------- discovery
    def units(self) -> list[Unit]:
        """Every unit with outputs, progress or a record in this work folder (for status)."""
        found: set[Unit] = set()
        extract = self.unit_dir(Unit("extract"))
        if extract.is_dir() and any(_SHARD_NAME.match(p.name) or p.name == SET_NAME for p in extract.iterdir()):
            found.add(Unit("extract"))
        for stage in ("features", "train", "eval", "predict"):
            base = self.root / _STAGE_DIRS[stage]
            if base.is_dir():
                found.update(Unit(stage, sub.name) for sub in base.iterdir()
                             if sub.is_dir() and _NAME_PART.match(sub.name))
        for source in [Unit("extract")] + [u for u in found if u.stage == "features"]:
            if self.merged_record(source).is_file():
                found.add(merge_unit(source))
        if self.unit_dir(Unit("reduce")).is_dir():
            found.add(Unit("reduce"))
        progress = self.root / ".progress"
        if progress.is_dir():
            for folder in progress.rglob("*"):
                if folder.is_dir() and any(f.suffix == ".json" for f in folder.iterdir()):
                    found.add(Unit.parse(folder.relative_to(progress).as_posix()))
        return sorted(found)

    # ---------------------------------------------------------------------------------- verification
    def verify(self, path: Path | str, expected_sha256: str, *, fix: str) -> None:
        """Check a file against the sha256 its record names; remember success until the file changes.

        The whole-file digest is computed the first time a stage opens the file after it was written or
        changed (size or mtime differ from what was remembered); HDF5's per-chunk checksums cover each read.
        """
        path = Path(path)
        try:
            stat = path.stat()
        except OSError as error:
            raise StoreError(f"{path} cannot be read ({error.strerror}): {fix}") from error
        marker = self.root / ".verified" / (self.relative(path).replace("/", "%2F") + ".json")
        seen = {"sha256": expected_sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        try:
            if read_json(marker) == seen:
                return
        except (OSError, ValueError):
            pass
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise StoreError(f"{path} does not match the sha256 in its record (changed or corrupted after it "
                             f"was written): {fix}")
        try:
            atomic_write_json(marker, seen)
        except OSError:  # a read-only work folder: verify again next time, read anyway
            pass


_PLANNING = threading.local()


@contextlib.contextmanager
def dry_run() -> Iterator[None]:
    """Plan without changing the work folder (``--dry-run``): sets are computed, not declared."""
    _PLANNING.only = True
    try:
        yield
    finally:
        _PLANNING.only = False


def planning_only() -> bool:
    """True inside :func:`dry_run`: a plan may compute but must not change files."""
    return bool(getattr(_PLANNING, "only", False))


def merge_unit(source: Unit) -> Unit:
    """The merge unit of a features unit: ``merge`` for the extraction, ``merge/<run>`` for features/<run>."""
    return Unit("merge") if source.stage == "extract" else Unit("merge", source.run)


def _fills_pending(current: ShardSet, wanted: ShardSet) -> bool:
    """True when ``wanted`` is ``current`` with inputs that were pending (None) at planning now known."""
    pending = {k for k, v in current.identity.items() if v is None}
    return (bool(pending) and current.count == wanted.count and set(current.identity) == set(wanted.identity)
            and all(current.identity[k] == wanted.identity[k] for k in current.identity if k not in pending))


def redo_hint(unit: Unit, index: int) -> str:
    """What a user types to make shard ``index`` of ``unit`` again (for messages about a corrupt file).

    With the job file the set was made with: other settings would make another set current instead.
    """
    if unit.stage == "predict":
        return (f"redo shard {index} with `hpcvid run predict --run RUN --work WORK VIDEOS... --shard {index} "
                "--force` (the run, prediction folder and videos it was made with)")
    model = f" --model {unit.run}" if unit.stage == "eval" else ""
    return (f"redo shard {index} with `hpcvid run {unit.stage}{model} --config JOB --shard {index} --force` "
            "(JOB: the job file this work folder was made with)")


def describe_difference(current: ShardSet, wanted: ShardSet) -> str:
    if current.count != wanted.count:
        return f"{current.count} shards, this one is of {wanted.count}"
    keys = sorted(k for k in set(current.identity) | set(wanted.identity)
                  if current.identity.get(k) != wanted.identity.get(k))
    return "made with other " + ", ".join(keys) if keys else "another identity"


def _all(count: int) -> Iterator[ShardSpec]:
    return (ShardSpec(i, count) for i in range(count))


def _record_set_id(path: Path) -> str:
    try:
        return str(read_json(path).get("set", "?"))
    except (OSError, ValueError, AttributeError):
        return "?"


def digest(payload: Any) -> str:
    """A stable short digest of JSON-able settings (for set identities)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
