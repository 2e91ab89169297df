"""``hpcvid submit STAGE``: queue a stage on SLURM (or submitit's local/debug executor) and return at once.

A sharded stage (extract, features, eval) becomes one array job with a task per shard that has no record
of the unit's current set (all shards with ``--force``); shards whose earlier job is still pending or
running are not queued twice, and when SLURM cannot be asked about them nothing is queued (``--force``
queues anyway). merge, train and reduce are one job each; train's job has nodes x tasks ranks.
``submit pipeline JOB.toml`` queues the chosen stages in order, each waiting for the previous with
``afterok``. Every setting is checked here, on the login node, before sbatch runs, and every flag is a
config key, so the job runs with exactly the settings ``hpcvid run`` would use.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from hpcvid.cli import config_from_args
from hpcvid.config import Config, resolve_config, write_resolved
from hpcvid.errors import ConfigError, SchedulerError
from hpcvid.launch.sharding import ShardSpec
from hpcvid.stages import PIPELINE_ORDER, STAGES, Stage

ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"})
DEFAULT_PIPELINE = ("extract", "merge", "train", "eval", "reduce")

LAUNCH_FLAGS = {  # flag -> (dotted config key, type, help)
    "--executor": ("launch.executor", str, "slurm (queue and return), local (processes here) or debug (in-process)"),
    "--walltime": ("launch.walltime", str, "time limit per job, HH:MM:SS or D-HH:MM:SS"),
    "--partition": ("launch.partition", str, "SLURM partition"),
    "--account": ("launch.account", str, "SLURM account to charge"),
    "--qos": ("launch.qos", str, "SLURM quality of service"),
    "--gres": ("launch.gres", str, "generic resources per node, e.g. gpu:4"),
    "--cpus-per-task": ("launch.cpus_per_task", int, "CPUs per task"),
    "--mem": ("launch.mem", str, "memory per node, e.g. 16G"),
    "--array-parallelism": ("launch.array_parallelism", int, "array tasks running at once"),
    "--signal-delay": ("launch.signal_delay_s", int, "seconds before the walltime at which jobs checkpoint and requeue"),
    "--max-requeues": ("launch.max_requeues", int, "how often a job may requeue after a timeout"),
    "--nodes": ("launch.nodes", int, "nodes of the training job"),
    "--gpus-per-node": ("launch.gpus_per_node", int, "GPUs per node (training: one rank per GPU by default)"),
    "--tasks-per-node": ("launch.tasks_per_node", int, "training ranks per node (default: one per GPU, or 1)"),
}


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("launch (override the cluster profile's [launch])")
    for flag, (_, kind, help_text) in LAUNCH_FLAGS.items():
        group.add_argument(flag, type=kind, default=None, help=help_text)


def launch_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The launch flags as dotted config keys. ``submit`` means SLURM: when neither a flag, the profile nor
    the job file names an executor, it is ``slurm`` (the config's own default, ``local``, serves ``run``)."""
    values = {key: getattr(args, flag[2:].replace("-", "_"), None) for flag, (key, _, _) in LAUNCH_FLAGS.items()}
    if values["launch.executor"] is None and not _files_name_executor(args):
        values["launch.executor"] = "slurm"
    return values


def _files_name_executor(args: argparse.Namespace) -> bool:
    return _files_name(args, "executor")


def _files_name(args: argparse.Namespace, key: str) -> bool:
    """True when the profile or the job file sets ``launch.<key>``."""
    from hpcvid.config import load_toml

    for attribute, what in (("profile", "cluster profile"), ("config", "job file"), ("job_file", "job file")):
        path = getattr(args, attribute, None)
        if path and key in load_toml(path, what).get("launch", {}):
            return True
    return False


def walltime_given(args: argparse.Namespace) -> bool:
    """Did the user choose a walltime (flag, profile or job file)? Otherwise a stage that can predict one
    asks for its prediction rather than for the default."""
    return getattr(args, "walltime", None) is not None or _files_name(args, "walltime")


def add_cli(parser: argparse.ArgumentParser) -> None:
    from hpcvid.cli.run import add_stage_arguments

    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, stage in STAGES.items():
        sub = stages.add_parser(name, help=stage.help, description=stage.help)
        add_stage_arguments(sub, stage)
        add_launch_arguments(sub)
        sub.add_argument("--dry-run", action="store_true", help="print the sbatch script and queue nothing")
    pipe = stages.add_parser("pipeline", help="queue the stages in order, joined by SLURM afterok dependencies",
                             description="queue the chosen stages in order, joined by SLURM afterok dependencies")
    pipe.add_argument("job_file", metavar="JOB.toml", help="job file (see jobs/)")
    pipe.add_argument("--profile", metavar="PROFILE.toml", help="cluster profile (see slurm/)")
    pipe.add_argument("--work", metavar="WORK", help="work folder; overrides the job file's `work`")
    pipe.add_argument("--stages", default=",".join(DEFAULT_PIPELINE),
                      help=f"comma-separated stages to chain, in the order given (default: {','.join(DEFAULT_PIPELINE)})")
    pipe.add_argument("--results", metavar="DIR", help="the reduce stage's report folder (default: results/<name of WORK>)")
    pipe.add_argument("--force", action="store_true", help="redo every shard; queue even when SLURM cannot be asked")
    add_launch_arguments(pipe)


# ------------------------------------------------------------------------------------------ main
def main(args: argparse.Namespace) -> int:
    if args.stage == "pipeline":
        return submit_pipeline(args)
    stage = STAGES[args.stage]
    overrides = {**stage.load().overrides(args), **launch_overrides(args)}
    config = config_from_args(args, overrides)
    submit_stage(stage, config, only=getattr(args, "shard", None), force=bool(args.force),
                 dry_run=bool(args.dry_run), dependency="", walltime_chosen=walltime_given(args))
    return 0


def submit_stage(stage: Stage, config: Config, *, only: int | None = None, force: bool = False,
                 dry_run: bool = False, dependency: str = "", walltime_chosen: bool = True) -> Any:
    """Validate and queue one stage; print what was queued; return the Submission (None: nothing queued)."""
    from hpcvid.launch import executors as launch
    from hpcvid.workfolder import WorkFolder

    launch.validate_launch(config.launch, check_cluster=not dry_run)
    module = stage.load()
    unit = module.unit(config)
    with planning(dry_run):
        specs = module.plan(config, only, force)
    specs = _without_active(config, str(unit), specs, force)
    if not specs:
        print(f"{unit}: nothing to submit: every shard has a record or a queued job (use --force to redo)")
        return None
    if stage.plans_walltime and config.launch.executor == "slurm":
        config = _checked_walltime(config, module.walltime_needed(config, specs), str(unit), walltime_chosen, force)
        launch.validate_launch(config.launch, check_cluster=False)
    resources = launch.resources_for(stage, config.launch, dependency, name=f"hpcvid-{unit.slug}")
    if dry_run:
        folder = WorkFolder.of(launch.absolute_work(config)).logs_dir / "%j"
        print(launch.sbatch_text(config.launch, resources, folder, array=len(specs) if len(specs) > 1 else 0))
        return None
    write_resolved(config, argv=sys.argv)
    return _report(launch.submit_shards(config, stage, specs, resources, sys.argv))


def _checked_walltime(config: Config, needed_s: float, unit: str, chosen: bool, force: bool) -> Config:
    """The predicted walltime when none was chosen; a chosen one below the prediction is refused (--force
    queues anyway): a job that is sure to time out wastes the allocation and requeues without end."""
    from hpcvid.config import replace, walltime_minutes
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


def planning(dry: bool) -> Any:
    """A dry run plans without changing the work folder."""
    import contextlib

    from hpcvid.workfolder import dry_run

    return dry_run() if dry else contextlib.nullcontext()


def _without_active(config: Config, unit: str, specs: list[ShardSpec], force: bool) -> list[ShardSpec]:
    """Drop shards whose latest job is still pending or running (never queue a shard twice).

    When SLURM cannot be asked, nothing is queued (a shard might be queued twice) unless ``force``.
    """
    from hpcvid.errors import HpcvidError
    from hpcvid.launch import executors as launch
    from hpcvid.launch import scheduler

    if config.launch.executor != "slurm" or not specs:
        return specs
    latest: dict[tuple[int, int], str] = {}
    for submission in launch.read_submissions(config.work):
        if submission.unit == unit and submission.executor == "slurm":
            for task in submission.tasks:
                latest[(task["shard"], task["count"])] = task["job_id"]
    wanted = {(s.index, s.count): latest[(s.index, s.count)] for s in specs if (s.index, s.count) in latest}
    if not wanted:
        return specs
    try:
        states = scheduler.query_jobs(wanted.values())
    except HpcvidError as error:
        if force:
            print(f"{unit}: SLURM cannot be asked whether earlier jobs still run ({error}); queued anyway (--force)")
            return specs
        raise SchedulerError(f"{unit}: SLURM cannot be asked whether the earlier jobs of these shards still run "
                             f"({error}); nothing queued, so that no shard runs twice: try again, or pass --force "
                             "to queue anyway") from error
    kept = []
    for spec in specs:
        job_id = wanted.get((spec.index, spec.count))
        state = states[job_id].state if job_id in states else ""
        if state in ACTIVE:
            print(f"{unit}: shard {spec.name} is already queued as job {job_id} ({state}); not queued again")
        else:
            kept.append(spec)
    return kept


def _report(submission) -> Any:
    ids = submission.job_ids
    shards = ", ".join(t["name"] for t in submission.tasks)
    print(f"{submission.unit}: submitted {len(ids)} job(s) on {submission.executor}: {' '.join(ids)}")
    print(f"  shards: {shards}")
    print(f"  record: {submission.path}")
    return submission


def submit_pipeline(args: argparse.Namespace) -> int:
    """Queue the chosen stages in order, each ``afterok`` on the previous stage's jobs."""
    from hpcvid.launch.scheduler import base_ids

    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(PIPELINE_ORDER)}")
    overrides = dict(launch_overrides(args), work=args.work)
    if args.results:
        overrides["report.out"] = args.results
    config = resolve_config(args.job_file, args.profile, overrides)
    if config.launch.executor != "slurm":
        raise ConfigError("submit pipeline chains jobs with SLURM dependencies: use --executor slurm (or a "
                          "profile with launch.executor = \"slurm\"); on this machine use `hpcvid run STAGE`")
    dependency = ""
    queued = 0
    for name in chosen:  # the order given (default: the pipeline's)
        submission = submit_stage(STAGES[name], config, force=args.force, dependency=dependency,
                                  walltime_chosen=walltime_given(args))
        if submission is not None:
            dependency = "afterok:" + ":".join(base_ids(submission.job_ids))
            queued += 1
    if not queued:
        print("pipeline: nothing queued")
    return 0
