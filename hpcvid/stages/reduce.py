"""The reducer: ``hpcvid collect WORK [--out results/NAME] [--allow-partial]``.

Reads every prediction shard under ``WORK/eval/<run>/`` (see :mod:`hpcvid.storage.predictions`), turns the scores
into integer counts (confusion matrix and top-k hits per run and strategy, :mod:`hpcvid.learn.metrics`), adds
the counts up, checks that every test video of the manifest was counted exactly once, and hands the
totals to :mod:`hpcvid.stages.report`, which writes ``results/NAME/``.

It runs on a login node without SLURM: reading a few MB of predictions is cheap. Inside an MPI job
(``mpirun -n R hpcvid collect WORK --mpi`` or ``srun --mpi=pmix ...``) each rank counts a round-robin share
of the shards and the same integer sums are combined with ``MPI.Reduce``; rank 0 writes the report.
Because counts are integers the result is identical to the single-process reduce, bit for bit.

Exactly once: a shard without its record (missing, or killed mid-write), a record whose .h5 is missing or
changed, a video counted by two shards, and a test video counted by none are each an error naming the
shard or the video. ``--allow-partial`` writes the report over what is there and lists what is missing.

Fusion (``--fuse RUN:WEIGHT ...``, ``report.fusion``; by default the segment networks' RGB and flow runs at
1 : 1.5, the weights of the two-stream literature): the default strategy's softmax scores of each named run,
averaged with those weights per test video, counted as one more run (``<run>+<run>``, model ``fusion``).
Each run's scores are read from its prediction shards after they were counted, so the fused run covers
exactly the videos every member counted. A member that was not evaluated leaves the fusion out, and the
report says so (unless none of them was: a study without those models).
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hpcvid.config import parse_fusion
from hpcvid.learn import metrics
from hpcvid.errors import StoreError
from hpcvid.storage.manifest import Manifest, load_manifest
from hpcvid.launch.sharding import ShardSpec, all_shards
from hpcvid.storage.predictions import read_prediction_shard, read_record
from hpcvid.workfolder import Unit, WorkFolder, redo_hint

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- counts
@dataclass
class RunCounts:
    """Integer totals of one run (one trained model) over the shards counted so far."""

    run: str
    model: str
    classes: tuple[str, ...]
    strategies: list[str]
    default_strategy: str
    confusion: dict[str, np.ndarray]              # strategy -> (C, C) int64, [true, predicted]
    topk: dict[str, dict[int, int]]               # strategy -> k -> hits
    videos: dict[str, str] = field(default_factory=dict)   # video id -> shard file that counted it
    shards: list[dict[str, Any]] = field(default_factory=list)   # provenance of each counted shard
    failed: list[dict[str, str]] = field(default_factory=list)   # videos the eval stage could not score
    config: dict[str, Any] = field(default_factory=dict)
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    code_version: str = ""
    fusion: dict[str, Any] = field(default_factory=dict)   # a fused run: member -> {"weight", "strategy"}

    @property
    def n_videos(self) -> int:
        return len(self.videos)


@dataclass
class Reduction:
    """What the reducer hands to the report: per-run totals and what is missing."""

    work: str
    manifest: Manifest
    runs: dict[str, RunCounts]
    missing_shards: dict[str, list[str]]          # run -> shard file names (or reasons) not counted
    missing_videos: dict[str, list[str]]          # run -> test video ids counted by no shard
    partial: bool = False
    notes: list[str] = field(default_factory=list)   # what the report could not compute, and why


def count_shard(path: Path, record: dict[str, Any]) -> RunCounts:
    """The integer counts of one prediction shard (the unit of work of both the file and MPI reduce)."""
    shard = read_prediction_shard(path)
    videos: dict[str, str] = {}
    for video in shard.video_ids:
        if video in videos:
            raise StoreError(f"video {video} appears twice in {path}: re-run that shard with --force")
        videos[video] = path.name
    confusion, topk = _counts(shard.scores, shard.labels, len(shard.classes))
    return RunCounts(
        run=shard.run, model=shard.model, classes=shard.classes, strategies=shard.strategies,
        default_strategy=shard.default_strategy, confusion=confusion, topk=topk, videos=videos,
        shards=[{"file": path.name, "sha256": record["sha256"], "n_videos": len(shard.video_ids),
                 "checkpoint": shard.checkpoint}],
        failed=list(record.get("failed", [])), config=dict(shard.config), checkpoint=shard.checkpoint,
        checkpoint_sha256=shard.checkpoint_sha256, code_version=shard.code_version,
    )


def _counts(scores: dict[str, np.ndarray], labels: np.ndarray,
            n_classes: int) -> tuple[dict[str, np.ndarray], dict[str, dict[int, int]]]:
    """Per strategy: the confusion counts and the top-k hits of ``scores`` against ``labels``."""
    confusion = {name: metrics.confusion_counts(values, labels) for name, values in scores.items()}
    topk = {name: {k: metrics.topk_hits(values, labels, k) for k in metrics.valid_ks(n_classes)}
            for name, values in scores.items()}
    return confusion, topk


def merge_counts(parts: Sequence[RunCounts]) -> RunCounts:
    """Add up the counts of several shards of one run; a video counted twice is an error naming both shards."""
    if not parts:
        raise ValueError("nothing to merge")
    total = _empty_like(parts[0])
    for part in parts:
        _check_compatible(total, part)
        for video, shard_file in part.videos.items():
            if video in total.videos:
                raise StoreError(f"video {video} of run {total.run} was counted twice: in "
                                 f"{total.videos[video]} and in {shard_file}; delete the stale shard and "
                                 "re-run `hpcvid run eval --force`")
            total.videos[video] = shard_file
        for strategy in total.strategies:
            total.confusion[strategy] += part.confusion[strategy]
            for k in total.topk[strategy]:
                total.topk[strategy][k] += part.topk[strategy][k]
        total.shards.extend(part.shards)
        total.failed.extend(part.failed)
    total.shards.sort(key=lambda s: s["file"])
    return total


def _check_compatible(total: RunCounts, part: RunCounts) -> None:
    where = part.shards[0]["file"] if part.shards else "a shard"
    if part.classes != total.classes:
        raise StoreError(f"{where} of run {total.run} has different classes from the other shards: "
                         "re-run `hpcvid run eval --force` so all shards use one manifest")
    if part.strategies != total.strategies:
        raise StoreError(f"{where} of run {total.run} has strategies {part.strategies}, the others "
                         f"{total.strategies}: re-run `hpcvid run eval --force`")
    if part.checkpoint_sha256 != total.checkpoint_sha256:
        raise StoreError(f"{where} of run {total.run} was made from another checkpoint than the other shards: "
                         "re-run `hpcvid run eval --force` after training finished")


# --------------------------------------------------------------------------------------- finding shards
@dataclass
class ShardPlan:
    """The shards of one run that can be counted, and the names of those that cannot."""

    run: str
    ready: list[tuple[Path, dict[str, Any]]]
    missing: list[str]


def plan_run(work: Path | str, run: str) -> ShardPlan:
    """Which shards of ``run``'s current eval set can be counted (record of the set present, .h5 matching it).

    A shard that is missing or has no record is listed (``--allow-partial`` reports without it); a shard
    whose file does not match its record's sha256 is corrupt, and that is an error even when partial.
    """
    folder = WorkFolder(work)
    unit = Unit("eval", run)
    current = folder.current_set(unit)
    if current is None:
        raise StoreError(f"{folder.unit_dir(unit)} holds no planned eval set: run `hpcvid run eval --model {run} "
                         f"--work {work}` first")
    ready, missing = [], []
    for spec in all_shards(current.count):
        h5_path, record_path = folder.shard_file(unit, spec), folder.record_file(unit, spec)
        if not folder.is_current(unit, spec):
            if record_path.is_file():
                state = "has a record of another eval set (stale: the model or settings changed since)"
            else:
                state = "has no record (not run, or killed mid-shard)" if h5_path.is_file() else "is missing"
            missing.append(f"{h5_path} {state}")
            continue
        record = read_record(record_path)
        if not h5_path.is_file():
            missing.append(f"{h5_path} is missing although its record exists")
            continue
        folder.verify(h5_path, record.get("sha256", ""), fix=redo_hint(unit, spec.index))
        ready.append((h5_path, record))
    _check_model_unchanged(folder, unit, ready)
    return ShardPlan(run=run, ready=ready, missing=missing)


def _check_model_unchanged(folder: WorkFolder, unit: Unit, ready: Sequence[tuple[Path, dict[str, Any]]]) -> None:
    """Refuse predictions of a checkpoint that has been replaced since (the run was trained further)."""
    from hpcvid.fileio import sha256_file

    for path, record in ready[:1]:
        checkpoint = folder.absolute(record.get("checkpoint", "")) if record.get("checkpoint") else None
        expected = read_prediction_shard(path).checkpoint_sha256
        if checkpoint is not None and checkpoint.is_file() and sha256_file(checkpoint) != expected:
            raise StoreError(f"{unit} was scored with an earlier version of {checkpoint} (the run was trained "
                             f"since): re-run `hpcvid run eval --model {unit.run} --force`")


def runs_in(work: Path | str) -> list[str]:
    """The runs with an eval set in the work folder."""
    return sorted(unit.run for unit in WorkFolder(work).units() if unit.stage == "eval"
                  and WorkFolder(work).current_set(unit) is not None)


def plan_all(work: Path | str, runs: Sequence[str] | None = None) -> list[ShardPlan]:
    names = list(runs) if runs else runs_in(work)
    if not names:
        raise StoreError(f"no prediction shards under {WorkFolder(work).unit_dir(Unit('eval', 'x')).parent}: run "
                         f"`hpcvid run eval --model M --work {work}` first")
    return [plan_run(work, name) for name in names]


# ------------------------------------------------------------------------------------------- reducing
def check_coverage(total: RunCounts, manifest: Manifest) -> tuple[list[str], list[str]]:
    """(test videos counted by no shard, counted videos that are not test videos of the manifest)."""
    test_ids = {v.id for v in manifest.by_split("test")}
    counted = set(total.videos)
    return sorted(test_ids - counted), sorted(counted - test_ids)


def finish(work: Path | str, manifest: Manifest, plans: Sequence[ShardPlan], totals: dict[str, RunCounts],
           allow_partial: bool) -> Reduction:
    """Check exactly-once coverage; raise naming what is missing, or (partial) record it."""
    missing_shards = {plan.run: plan.missing for plan in plans if plan.missing}
    missing_videos: dict[str, list[str]] = {}
    for plan in plans:
        total = totals.get(plan.run)
        if total is None:
            missing_videos[plan.run] = sorted(v.id for v in manifest.by_split("test"))
            continue
        if total.classes != manifest.classes:
            raise StoreError(f"run {plan.run} was evaluated with other classes than {Path(work) / 'manifest.json'}"
                             ": re-run `hpcvid run eval --force`")
        absent, foreign = check_coverage(total, manifest)
        if foreign:
            raise StoreError(f"run {plan.run} counted {len(foreign)} video(s) that are not test videos of the "
                             f"manifest, e.g. {foreign[0]} (in {total.videos[foreign[0]]}): re-run "
                             "`hpcvid run eval --force` after re-indexing")
        if absent:
            missing_videos[plan.run] = absent
    problems = _describe_missing(missing_shards, missing_videos, totals)
    if problems and not allow_partial:
        raise StoreError("incomplete predictions: " + "; ".join(problems) +
                         " (re-run `hpcvid run eval` for them, or pass --allow-partial)")
    for problem in problems:
        log.warning("partial: %s", problem)
    if not totals:
        raise StoreError("no complete prediction shard to reduce: " + "; ".join(problems))
    return Reduction(work=str(work), manifest=manifest, runs=totals, missing_shards=missing_shards,
                     missing_videos=missing_videos, partial=bool(problems))


def _describe_missing(missing_shards: dict[str, list[str]], missing_videos: dict[str, list[str]],
                      totals: dict[str, RunCounts]) -> list[str]:
    problems = []
    for run, shards in sorted(missing_shards.items()):
        problems.append(f"run {run}: shard {shards[0]}" + (f" (+{len(shards) - 1} more)" if len(shards) > 1 else ""))
    for run, videos in sorted(missing_videos.items()):
        if run in missing_shards:
            continue  # the missing shard explains them
        failed = {f.get("video"): f.get("reason", "") for f in (totals[run].failed if run in totals else [])}
        first = videos[0]
        why = f" (failed: {failed[first]})" if first in failed else ""
        problems.append(f"run {run}: {len(videos)} test video(s) counted by no shard, e.g. {first}{why}")
    return problems


def reduce_files(work: Path | str, *, runs: Sequence[str] | None = None, allow_partial: bool = False) -> Reduction:
    """The single-process reduce (login node)."""
    manifest = load_manifest(work)
    plans = plan_all(work, runs)
    totals = {}
    for plan in plans:
        parts = [count_shard(path, record) for path, record in plan.ready]
        if parts:
            totals[plan.run] = merge_counts(parts)
    return finish(work, manifest, plans, totals, allow_partial)


def reduce_mpi(work: Path | str, *, runs: Sequence[str] | None = None, allow_partial: bool = False,
               comm: Any = None) -> Reduction | None:
    """The same sums as an MPI reduce: rank r counts shards r, r+R, ...; rank 0 gets the totals.

    Returns the Reduction on rank 0 and None on the other ranks. Errors found on rank 0 (missing or
    duplicated videos) are broadcast so every rank exits with the same error.
    """
    from mpi4py import MPI

    comm = comm or MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    manifest = load_manifest(work)
    plans = plan_all(work, runs)   # every rank lists the same files (a shared file system)
    jobs = [(plan.run, path, record) for plan in plans for path, record in plan.ready]
    local: dict[str, list[RunCounts]] = {}
    error: str | None = None
    try:
        for run, path, record in jobs[rank::size]:
            local.setdefault(run, []).append(count_shard(path, record))
        local_totals = {run: merge_counts(parts) for run, parts in local.items()}
    except StoreError as exc:
        error, local_totals = str(exc), {}
    errors = comm.allgather(error)
    if any(errors):
        raise StoreError(next(e for e in errors if e))
    totals, error = _mpi_sum(comm, local_totals)
    result = None
    if rank == 0 and error is None:
        try:
            result = finish(work, manifest, plans, totals, allow_partial)
        except StoreError as exc:
            error = str(exc)
    error = comm.bcast(error, root=0)   # every rank leaves with the same outcome (no rank left waiting)
    if error:
        raise StoreError(error)
    return result


def _mpi_sum(comm: Any, local: dict[str, RunCounts]) -> tuple[dict[str, RunCounts], str | None]:
    """Integer arrays go through MPI.Reduce(SUM); the video lists are gathered to check exactly-once.

    Returns (totals on rank 0 / {} elsewhere, the first error rank 0 found). Rank 0 keeps taking part in
    every collective after an error, so no rank is left waiting.
    """
    from mpi4py import MPI

    # which runs have counts somewhere, and their shapes (metadata is small: gather it)
    metas = comm.allgather({run: _empty_like(total) for run, total in local.items()})
    templates: dict[str, RunCounts] = {}
    for meta in metas:
        for run, template in meta.items():
            templates.setdefault(run, template)
    totals: dict[str, RunCounts] = {}
    error: str | None = None
    for run in sorted(templates):
        mine = local.get(run, templates[run])
        flat = _flatten(mine)
        summed = np.zeros_like(flat) if comm.Get_rank() == 0 else None
        comm.Reduce([flat, MPI.INT64_T], [summed, MPI.INT64_T] if summed is not None else None, op=MPI.SUM, root=0)
        pieces = comm.gather(_without_counts(mine) if run in local else None, root=0)
        if comm.Get_rank() == 0 and error is None:
            try:
                merged = merge_counts([p for p in pieces if p is not None])   # duplicates are found here
            except StoreError as exc:
                error = str(exc)
                continue
            _unflatten(merged, summed)
            totals[run] = merged
    return totals, error


def _flatten(counts: RunCounts) -> np.ndarray:
    arrays = [counts.confusion[s].ravel() for s in counts.strategies]
    arrays += [np.array([counts.topk[s][k] for k in sorted(counts.topk[s])], dtype=np.int64) for s in counts.strategies]
    return np.concatenate(arrays).astype(np.int64)


def _unflatten(counts: RunCounts, flat: np.ndarray) -> None:
    offset = 0
    for s in counts.strategies:
        shape = counts.confusion[s].shape
        size = int(np.prod(shape))
        counts.confusion[s] = flat[offset:offset + size].reshape(shape).copy()
        offset += size
    for s in counts.strategies:
        for k in sorted(counts.topk[s]):
            counts.topk[s][k] = int(flat[offset])
            offset += 1


def _empty_like(counts: RunCounts) -> RunCounts:
    return RunCounts(
        run=counts.run, model=counts.model, classes=counts.classes, strategies=list(counts.strategies),
        default_strategy=counts.default_strategy,
        confusion={s: np.zeros_like(c) for s, c in counts.confusion.items()},
        topk={s: {k: 0 for k in hits} for s, hits in counts.topk.items()},
        config=counts.config, checkpoint=counts.checkpoint, checkpoint_sha256=counts.checkpoint_sha256,
        code_version=counts.code_version,
    )


def _without_counts(counts: RunCounts) -> RunCounts:
    """What rank 0 needs besides the summed arrays: video ids, shard provenance, failures."""
    light = _empty_like(counts)
    light.videos, light.shards, light.failed = dict(counts.videos), list(counts.shards), list(counts.failed)
    return light


def in_mpi_job(environ: dict[str, str] | None = None) -> bool:
    """True when started by mpirun/srun with more than one rank (Open MPI, PMI or PMIx variables)."""
    env = os.environ if environ is None else environ
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        if int(env.get(name, "1") or 1) > 1:
            return True
    return False


# ------------------------------------------------------------------------------------------- fusion
def fusion_name(weights: dict[str, float]) -> tuple[str, str]:
    """(run name, strategy name) of a fusion: ``tsn_rgb+tsn_flow`` and ``weighted_1:1.5``."""
    return "+".join(weights), "weighted_" + ":".join(f"{w:g}" for w in weights.values())


def default_scores(work: Path | str, run: str, strategy: str) -> dict[str, tuple[int, np.ndarray]]:
    """video id -> (label, scores of ``strategy``) over the current prediction shards of ``run``."""
    scores: dict[str, tuple[int, np.ndarray]] = {}
    for path, _ in plan_run(work, run).ready:
        shard = read_prediction_shard(path)
        for video, label, row in zip(shard.video_ids, shard.labels, shard.scores[strategy]):
            scores[video] = (int(label), row)
    return scores


def fuse(reduction: Reduction, weights: dict[str, float]) -> None:
    """Add the weighted fusion of ``weights``' runs to ``reduction`` (see the module docstring).

    When some members have counts and others not, that is noted in ``reduction.notes`` and nothing is added;
    when none has (a study without those models), nothing is said. A test video whose members disagree on
    its label, which one manifest cannot give, is an error.
    """
    name, strategy = fusion_name(weights)
    absent = [run for run in weights if run not in reduction.runs]
    if len(absent) == len(weights):
        return
    if absent:
        reduction.notes.append(f"fusion {name}: not computed, {' and '.join(absent)} "
                               f"{'was' if len(absent) == 1 else 'were'} not evaluated")
        return
    members = {run: default_scores(reduction.work, run, reduction.runs[run].default_strategy) for run in weights}
    videos = sorted(set.intersection(*(set(scores) for scores in members.values())))
    total = sum(weights.values())
    labels, fused = [], []
    for video in videos:
        found = {members[run][video][0] for run in weights}
        if len(found) != 1:
            raise StoreError(f"video {video} has different labels in the runs of fusion {name}: re-run "
                             "`hpcvid run eval --force` for them with one manifest")
        labels.append(found.pop())
        fused.append(sum(w * members[run][video][1] for run, w in weights.items()) / total)
    first = reduction.runs[next(iter(weights))]
    scores = {strategy: np.asarray(fused, dtype=np.float32).reshape(len(videos), len(first.classes))}
    confusion, topk = _counts(scores, np.asarray(labels, dtype=np.int64), len(first.classes))
    reduction.runs[name] = RunCounts(
        run=name, model="fusion", classes=first.classes, strategies=[strategy], default_strategy=strategy,
        confusion=confusion, topk=topk, videos={v: "fusion" for v in videos},
        shards=[shard for run in weights for shard in reduction.runs[run].shards],
        fusion={run: {"weight": w, "strategy": reduction.runs[run].default_strategy} for run, w in weights.items()})
    absent_videos, _ = check_coverage(reduction.runs[name], reduction.manifest)
    if absent_videos:
        reduction.missing_videos[name] = absent_videos


# ---------------------------------------------------------------------------------------- the stage
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", help="report folder (default: results/<name of WORK>)")
    parser.add_argument("--runs", nargs="+", metavar="RUN", help="only these runs of WORK/eval (default: all)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="write the report over the shards that are there and list what is missing")
    parser.add_argument("--fuse", nargs="*", metavar="RUN:WEIGHT",
                        help="fuse these runs' default scores with these weights (default: tsn_rgb:1 tsn_flow:1.5; "
                             "give --fuse alone for none)")
    parser.add_argument("--explain", type=int, metavar="K",
                        help="Grad-CAM overlays of K test videos per run in the report (one right, one wrong per class)")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"report.out": args.out, "report.runs": args.runs,
            "report.allow_partial": True if args.allow_partial else None, "report.fusion": args.fuse,
            "report.explain": args.explain}


def unit(config: Any) -> Unit:
    return Unit("reduce")


def plan(config: Any, only: int | None = None, force: bool = False) -> list[ShardSpec]:
    """The reducer is one unit of work, run again whenever asked (reading a few MB of predictions is cheap)."""
    WorkFolder.of(config).require("reduce")
    return [ShardSpec(0, 1, force)]


def run_shard(config: Any, spec: ShardSpec) -> dict[str, Any]:
    """Reduce every eval run of the work folder into the report folder; the record says where it went."""
    from hpcvid.fileio import atomic_write_json
    from hpcvid.stages.report import read_summary

    out = collect(config.work, config.report.out or None, runs=config.report.runs or None,
                  allow_partial=config.report.allow_partial, fusion=parse_fusion(config.report.fusion),
                  explain=config.report.explain)
    summary = read_summary(out)
    record = {"out": str(Path(out).resolve()), "partial": bool(summary.get("partial")),
              "runs": sorted(summary.get("runs", {}))}
    atomic_write_json(WorkFolder.of(config).record_file(unit(config), spec), record)
    return record


def report(config: Any, records: Sequence[dict[str, Any]]) -> int:
    from hpcvid.stages.report import format_table, read_summary

    for record in records:
        print(format_table(read_summary(record["out"])))
        print(f"report: {Path(record['out']) / 'report.md'}")
    return 3 if any(r["partial"] for r in records) else 0


def default_out(work: Path | str) -> Path:
    return Path("results") / Path(work).resolve().name


def collect(work: Path | str, out: Path | str | None = None, *, runs: Sequence[str] | None = None,
            allow_partial: bool = False, use_mpi: bool = False, factors: dict[str, list[str]] | None = None,
            fusion: dict[str, float] | None = None, explain: int = 0) -> Path | None:
    """Reduce and write the report; returns the report folder (None on MPI ranks other than 0).

    ``factors`` (optional, see :func:`hpcvid.stages.report.build_summary`) adds per-factor accuracies;
    ``fusion`` (run -> weight) adds the fused run; ``explain`` > 0 adds Grad-CAM overlays of that many test
    videos per run that has pixels to point at (:func:`hpcvid.stages.explain.report_examples`).
    """
    from hpcvid.stages.report import write_report

    WorkFolder(work).require("collect")
    out = Path(out) if out else default_out(work)
    if use_mpi:
        reduction = reduce_mpi(work, runs=runs, allow_partial=allow_partial)
        if reduction is None:
            return None
    else:
        reduction = reduce_files(work, runs=runs, allow_partial=allow_partial)
    fuse(reduction, dict(fusion or {}))
    examples = []
    if explain:
        from hpcvid.stages.explain import report_examples

        examples = report_examples(reduction, out, explain)
    write_report(reduction, out, factors, examples)
    return out
