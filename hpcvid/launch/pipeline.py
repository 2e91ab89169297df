"""Queue units of work with SLURM dependencies: one stage, or the whole study as one dependency graph.

The study (``hpcvid submit pipeline``) is a graph, not a line::

    extract ─┬─> merge ─────────────────────────────> train/lstm (without frame: the extracted features)
             ├─> train/frame ─┬─> features/frame ──> train/lstm
             ├─> train/flow ──┼─> train/twostream (both streams start from the trained runs)
             │                │
    each train/<model> ──> eval/<model>;  every eval ──> reduce

frame and flow train on the extraction shards, so they wait for extract only and run side by side. Each
node waits (``afterok``) for the jobs of the units it reads. Queuing happens in three steps, so that nothing
is queued when anything is wrong: every node's settings are checked (its own ``[launch.<stage>]``
resources, its sbatch options), every node is planned (the shards without a record), and only then is
anything queued, in the graph's order.

Picking up after a failure is a second, identical submit: shards with a record are done and skipped (and
so is a unit its stage would plan again, merge, train or reduce, whose last job COMPLETED and wrote its
record, unless something it reads is queued again now); jobs still running or waiting are kept (their
dependants wait for them); a job that waits for a failed one
(``DependencyNeverSatisfied``), or for a unit being queued again now, can never start as it is, so it is
cancelled and queued again behind the new jobs. SLURM is asked about every earlier job once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from hpcvid.config import Config, PipelineConfig, replace, write_resolved
from hpcvid.errors import ConfigError, HpcvidError, SchedulerError
from hpcvid.launch.cluster import Site, check_job_count, shared_parallelism, split_into_arrays
from hpcvid.launch.sharding import ShardSpec
from hpcvid.learn.kinds import FEATURES, KINDS
from hpcvid.stages import STAGES, Stage
from hpcvid.workfolder import Unit, WorkFolder

# SLURM states of a job that may still run (status and the resubmission rule agree on them).
ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"})
NEVER_STARTS = "DependencyNeverSatisfied"
STUDY_STAGES = PipelineConfig().stages


@dataclass(frozen=True)
class Node:
    """One unit of work of a graph: its stage, the settings that make it that unit, and what it waits for.

    ``name`` is the unit's name (``train/frame``), ``after`` the names of the units it reads.
    """

    stage: str
    model: str = ""
    after: tuple[str, ...] = ()
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.model}" if self.model else self.stage


def study_graph(models: Sequence[str], stages: Sequence[str] = STUDY_STAGES,
                report_runs: Sequence[str] = ()) -> list[Node]:
    """The study's units for ``models``, in an order where every node follows what it waits for.

    Only nodes of ``stages`` are returned; a dependency on a unit that is left out is taken as done (unless
    that unit's earlier jobs still run: then its dependants wait for them).
    """
    unknown = [s for s in stages if s not in STUDY_STAGES]
    if unknown:
        raise ConfigError(f"pipeline.stages: unknown stage(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(STUDY_STAGES)}")
    chosen = [m for m in KINDS if m in models]          # table order: a kind after the kinds it starts from
    nodes = [Node("extract"), Node("merge", after=("extract",))]
    for model in chosen:
        if FEATURES in KINDS[model].reads and "frame" in chosen and not any(n.stage == "features" for n in nodes):
            nodes.append(Node("features", "frame", after=("train/frame",)))   # the fine-tuned frame CNN's features
        nodes.append(Node("train", model, _train_inputs(model, chosen), (("train.model", model),)))
    nodes += [Node("eval", m, (f"train/{m}",), (("train.model", m),)) for m in chosen]
    runs = tuple(report_runs) or tuple(chosen)
    nodes.append(Node("reduce", after=tuple(f"eval/{m}" for m in chosen), settings=(("report.runs", runs),)))
    return [node for node in nodes if node.stage in stages]


def _train_inputs(model: str, chosen: Sequence[str]) -> tuple[str, ...]:
    """The units a kind's training reads: features (fine-tuned ones when frame is trained too, else the merged
    extraction's), or the extraction shards and the runs it starts from."""
    kind = KINDS[model]
    if FEATURES in kind.reads:
        return ("features/frame",) if "frame" in chosen else ("merge",)
    return ("extract", *(f"train/{k}" for k in kind.starts_from if k in chosen))


def node_config(config: Config, node: Node) -> Config:
    """The config a node's jobs run with: its stage's launch settings and its own model or runs."""
    staged = config.for_stage(node.stage)
    return replace(staged, **dict(node.settings)) if node.settings else staged


# ------------------------------------------------------------------------------------------ planning
@dataclass
class Planned:
    """A node after planning: the shards it must run and what SLURM is doing about them now."""

    node: Node
    stage: Stage
    config: Config
    unit: str
    specs: list[ShardSpec]
    active: dict[int, str] = field(default_factory=dict)    # shard index -> job id, still queued or running
    pending: dict[int, str] = field(default_factory=dict)   # those of ``active`` that have not started
    stuck: dict[int, str] = field(default_factory=dict)     # pending jobs that can never start as they are
    finished: dict[int, str] = field(default_factory=dict)  # COMPLETED jobs whose record is there

    def to_queue(self) -> list[ShardSpec]:
        return [s for s in self.specs if s.index not in self.active and s.index not in self.finished]


def plan_nodes(config: Config, nodes: Sequence[Node], *, only: int | None = None, force: bool = False,
               site: Site, dry_run: bool = False, walltime_chosen: Iterable[str] = ()) -> list[Planned]:
    """Check every node's launch settings, then plan every node (in order), before anything is queued.

    A dry run plans without declaring anything in the work folder. A stage that predicts its walltime
    (extract) asks for the prediction where the user chose none, and refuses a chosen one below it.
    """
    import contextlib

    from hpcvid.launch.executors import validate_launch
    from hpcvid.workfolder import dry_run as planning_only

    configs = [node_config(config, node) for node in nodes]
    for node, node_cfg in zip(nodes, configs):
        if node.stage not in STAGES:
            raise ConfigError(f"unknown stage {node.stage!r}; stages: {', '.join(STAGES)}")
        try:
            validate_launch(node_cfg.launch, check_cluster=False, site=site)
        except ConfigError as error:
            raise ConfigError(f"{node.name}: {error}") from None
    if config.launch.executor == "slurm" and not dry_run:
        from hpcvid.launch.executors import check_partitions

        check_partitions(*dict.fromkeys(c.launch.partition for c in configs))
    planned = []
    chosen = set(walltime_chosen)
    for node, node_cfg in zip(nodes, configs):
        stage = STAGES[node.stage]
        module = stage.load()
        unit = str(module.unit(node_cfg))
        with planning_only() if dry_run else contextlib.nullcontext():
            specs = list(module.plan(node_cfg, only, force))
        if stage.plans_walltime and specs and node_cfg.launch.executor == "slurm":
            node_cfg = checked_walltime(node_cfg, module.walltime_needed(node_cfg, specs), unit,
                                        node.stage in chosen, force)
        planned.append(Planned(node, stage, node_cfg, unit, specs))
    return planned


def checked_walltime(config: Config, needed_s: float, unit: str, chosen: bool, force: bool) -> Config:
    """The predicted walltime when none was chosen; a chosen one below the prediction is refused (--force
    queues anyway): a job that is sure to time out wastes the allocation and requeues without end."""
    from hpcvid.config import walltime_minutes
    from hpcvid.launch.planning import format_walltime

    if not chosen:
        walltime = format_walltime(needed_s)
        print(f"{unit}: --walltime {walltime} (predicted from the measured rates; `hpcvid plan` shows how)")
        return replace(config, **{"launch.walltime": walltime})
    if walltime_minutes(config.launch.walltime) * 60 < needed_s and not force:
        raise ConfigError(f"launch.walltime = {config.launch.walltime} is below what the largest {unit} shard is "
                          f"predicted to need ({format_walltime(needed_s)} with the margin; `hpcvid plan` shows "
                          "it): give at least that, use more shards (--shards), or pass --force")
    return config


def find_active(planned: Sequence[Planned], work: Path | str, force: bool, also: Iterable[str] = (),
                skip_completed: bool = False) -> dict[str, list[str]]:
    """Fill each node's active, pending and stuck jobs from ONE scheduler query; return the still active
    job ids of the units in ``also`` (units a node waits for that are not queued now).

    ``skip_completed`` (a pipeline submitted again): a shard whose last job COMPLETED and whose record is
    there is finished, even for a stage that plans its one unit every time (merge, train, reduce). A stage
    submitted alone is queued as its stage plans it (a training continued to more epochs).
    When SLURM cannot be asked nothing is queued (a shard might run twice), unless ``force``.
    """
    from hpcvid.launch import scheduler
    from hpcvid.launch.executors import read_submissions

    latest: dict[tuple[str, int, int], str] = {}
    for submission in read_submissions(work):
        if submission.executor == "slurm":
            for task in submission.tasks:
                latest[(submission.unit, task["shard"], task["count"])] = task["job_id"]
    wanted = {(p.unit, s.index, s.count): latest[(p.unit, s.index, s.count)]
              for p in planned for s in p.specs if (p.unit, s.index, s.count) in latest}
    outside = {key: job for key, job in latest.items() if key[0] in set(also)}
    if not wanted and not outside:
        return {}
    try:
        states = scheduler.query_jobs([*wanted.values(), *outside.values()])
    except HpcvidError as error:
        units = ", ".join(dict.fromkeys(p.unit for p in planned))
        if force:
            print(f"{units}: SLURM cannot be asked whether earlier jobs still run ({error}); queued anyway (--force)")
            return {}
        raise SchedulerError(f"{units}: SLURM cannot be asked whether the earlier jobs of these shards still run "
                             f"({error}); nothing queued, so that no shard runs twice: try again, or pass --force "
                             "to queue anyway") from error
    folder = WorkFolder(work)
    for p in planned:
        for spec in p.specs:
            job_id = wanted.get((p.unit, spec.index, spec.count))
            state = states.get(job_id) if job_id else None
            if skip_completed and state is not None and state.state == "COMPLETED" and not force \
                    and folder.record_file(Unit.parse(p.unit), spec).is_file():
                p.finished[spec.index] = job_id
                continue
            if state is None or state.state not in ACTIVE:
                continue
            if state.state == "PENDING" and state.reason == NEVER_STARTS:
                p.stuck[spec.index] = job_id
                continue
            p.active[spec.index] = job_id
            if state.state in ("PENDING", "REQUEUED"):
                p.pending[spec.index] = job_id
    alive: dict[str, list[str]] = {}
    for (unit, _, _), job_id in outside.items():
        if job_id in states and states[job_id].state in ACTIVE and states[job_id].reason != NEVER_STARTS:
            alive.setdefault(unit, []).append(job_id)
    return alive


def requeue_behind_new_jobs(planned: Sequence[Planned]) -> None:
    """A waiting job whose upstream unit is queued again now would wait for the old jobs: queue it again too."""
    renewed: set[str] = set()
    for p in planned:
        if any(up in renewed for up in p.node.after):
            p.stuck.update(p.pending)
            p.finished.clear()
        for index in p.stuck:
            p.active.pop(index, None)
            p.pending.pop(index, None)
        if p.to_queue():
            renewed.add(p.node.name)


# ------------------------------------------------------------------------------------------ queuing
def submit_graph(config: Config, nodes: Sequence[Node], *, argv: Sequence[str], only: int | None = None,
                 force: bool = False, dry_run: bool = False, site: Site | None = None,
                 walltime_chosen: Iterable[str] = ()) -> list[Any]:
    """Check, plan and queue ``nodes``; return the Submissions (one per node that queued anything)."""
    from hpcvid.launch import executors as launch
    from hpcvid.launch import scheduler

    slurm = config.launch.executor == "slurm"
    site = site or Site(offline=dry_run)
    planned = plan_nodes(config, nodes, only=only, force=force, site=site, dry_run=dry_run,
                         walltime_chosen=walltime_chosen)
    if dry_run:
        _print_dry_run(planned, site)
        return []
    names = {p.node.name for p in planned}
    outside = {up for p in planned for up in p.node.after if up not in names}
    alive = find_active(planned, config.work, force, outside, skip_completed=len(nodes) > 1) if slurm else {}
    requeue_behind_new_jobs(planned)
    if slurm:
        check_job_count(sum(len(p.to_queue()) for p in planned), site.limits, "submit")
    stuck = [job for p in planned for job in p.stuck.values()]
    if stuck:
        scheduler.cancel_jobs(stuck)
        print(f"cancelled {len(stuck)} waiting job(s) that could not start as they were (their upstream failed or "
              f"is queued again now): {' '.join(stuck)}; queued again below")
    write_resolved(config, argv=list(argv))
    waits: dict[str, list[str]] = dict(alive)
    submissions = []
    for p in planned:
        todo = p.to_queue()
        for index, job_id in p.active.items():
            print(f"{p.unit}: shard {ShardSpec(index, p.specs[0].count).name} is already queued as job {job_id}; "
                  "not queued again")
        upstream = [job for up in p.node.after for job in waits.get(up, [])]
        dependency = f"afterok:{':'.join(upstream)}" if upstream and slurm else ""
        if not todo:
            if p.finished:
                print(f"{p.unit}: done (job {', '.join(p.finished.values())} completed and wrote its record)")
            elif not p.active:
                print(f"{p.unit}: nothing to submit: every shard has a record (use --force to redo)")
            waits[p.node.name] = list(p.active.values())
            continue
        resources = launch.resources_for(p.stage, p.config, dependency, name=f"hpcvid-{p.unit.replace('/', '-')}")
        submission = launch.submit_shards(p.config, p.stage, todo, resources, argv, site.limits if slurm else None)
        _report(submission)
        submissions.append(submission)
        waits[p.node.name] = [*scheduler.base_ids(submission.job_ids), *p.active.values()]
    if not submissions:
        print("nothing queued")
    return submissions


def _report(submission: Any) -> None:
    print(f"{submission.unit}: submitted {len(submission.job_ids)} job(s) on {submission.executor}: "
          f"{_shortened(submission.job_ids)}")
    if len(submission.arrays) > 1:
        print(f"  as {len(submission.arrays)} job arrays (this cluster's MaxArraySize): {' '.join(submission.arrays)}")
    if submission.dependency:
        print(f"  after: {submission.dependency}")
    print(f"  shards: {_shortened([t['name'] for t in submission.tasks], ', ')}")
    print(f"  record: {submission.path}")


def _shortened(items: Sequence[str], sep: str = " ") -> str:
    """A long list as its ends (a thousand-shard array fits on a line; the record lists them all)."""
    return sep.join(items) if len(items) <= 8 else f"{sep.join(items[:3])}{sep}...{sep}{sep.join(items[-2:])}"


def _print_dry_run(planned: Sequence[Planned], site: Site) -> None:
    """Each node's sbatch script(s), with the dependency named by unit (there are no job ids yet)."""
    from hpcvid.launch import executors as launch
    from hpcvid.workfolder import WorkFolder

    for p in planned:
        specs = p.to_queue()
        if not specs:
            print(f"# {p.unit}: nothing to submit: every shard has a record (use --force to redo)")
            continue
        dependency = f"afterok:<{'>:<'.join(p.node.after)}>" if p.node.after and len(planned) > 1 else ""
        resources = launch.resources_for(p.stage, p.config, dependency, name=f"hpcvid-{p.unit.replace('/', '-')}")
        folder = WorkFolder.of(launch.absolute_work(p.config)).logs_dir / "%j"
        pieces = split_into_arrays(specs, site.limits.max_array_size) if p.config.launch.executor == "slurm" \
            else [specs]
        shown = p.config.launch
        if len(pieces) > 1:
            shown = dataclasses.replace(shown, array_parallelism=shared_parallelism(shown.array_parallelism,
                                                                                    len(pieces)))
        for number, piece in enumerate(pieces, start=1):
            of = f", array {number} of {len(pieces)}" if len(pieces) > 1 else ""
            shards = piece[0].name if len(piece) == 1 else f"{piece[0].name} .. {piece[-1].name}"
            print(f"# {p.unit}: shard(s) {shards}{of}")
            print(launch.sbatch_text(shown, resources, folder, array=len(piece) if len(piece) > 1 else 0))
    for note in site.notes:
        print(f"# note: {note}")
