"""``hpcvid submit STAGE``: queue a stage on SLURM (or submitit's local/debug executor) and return at once.

Shard stages (extract, eval) become one array job with a task per shard still missing its record (all
shards with ``--force``); shards whose earlier job is still pending or running are not queued twice.
merge and reduce are one job each; train is one job of nodes x tasks. ``submit pipeline JOB.toml`` queues
the stages that exist in order, each waiting for the previous with ``afterok``. Every setting is checked
here, on the login node, before sbatch runs. Stages not built yet are refused, never faked.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from hpcvid.cli import add_config_arguments, config_from_args
from hpcvid.config import Config, resolve_config, write_resolved
from hpcvid.errors import ConfigError, HpcvidError
from hpcvid.launch.sharding import ShardSpec

STAGE_ORDER = ("extract", "merge", "train", "eval", "reduce")
ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"})


# ------------------------------------------------------------------------------------------ stages
def stage_module(stage: str) -> ModuleType | None:
    """The module that implements ``stage`` in this checkout, or None when it is not built yet."""
    from hpcvid.cli.run import STAGES

    if stage == "train":
        try:
            module = importlib.import_module("hpcvid.stages.train")
        except ImportError:
            return None
        return module if hasattr(module, "TrainJob") else None
    name = STAGES.get(stage)
    if name:
        return importlib.import_module(name)
    if stage == "reduce":  # the reducer is the `collect` verb (hpcvid.stages.reduce.collect)
        try:
            module = importlib.import_module("hpcvid.stages.reduce")
        except ImportError:
            return None
        return module if hasattr(module, "collect") and hasattr(module, "add_cli") else None
    return None


def submittable_stages() -> list[str]:
    """The pipeline's stages, then any other registered shard stage (e.g. one a test registers)."""
    from hpcvid.cli.run import STAGES

    return list(STAGE_ORDER) + [s for s in STAGES if s not in STAGE_ORDER]


def refusal(stage: str) -> str:
    from hpcvid.cli.run import STAGES

    what = {"train": "hpcvid.stages.train.TrainJob", "reduce": "hpcvid.stages.reduce.collect"}.get(
        stage, f"a `{stage}` entry in hpcvid.cli.run.STAGES")
    built = ", ".join(s for s in STAGE_ORDER if stage_module(s) is not None) or "none yet"
    return (f"stage {stage!r} is not built yet in this checkout (no {what}), so it cannot be submitted; "
            f"stages that can: {built}" + (f"; registered: {', '.join(STAGES)}" if STAGES else ""))


# ------------------------------------------------------------------------------------------ flags
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
    from hpcvid.config import load_toml

    for attribute, what in (("profile", "cluster profile"), ("config", "job file"), ("job_file", "job file")):
        path = getattr(args, attribute, None)
        if path and "executor" in load_toml(path, what).get("launch", {}):
            return True
    return False


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training allocation")
    group.add_argument("--nodes", type=int, default=1, help="nodes for the training job")
    group.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (one task per GPU)")
    group.add_argument("--tasks-per-node", type=int, default=None,
                       help="processes per node (default: one per GPU, or 1)")


def _add_reduce_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reduce (hpcvid collect)")
    group.add_argument("--out", metavar="DIR", help="report folder (default: results/<name of WORK>)")
    group.add_argument("--allow-partial", action="store_true", help="report over the shards that are there")


def add_cli(parser: argparse.ArgumentParser) -> None:
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage in submittable_stages():
        module = stage_module(stage)
        help_text = getattr(module, "HELP", None) or f"queue the {stage} stage" + ("" if module else " (not built yet)")
        sub = stages.add_parser(stage, help=help_text, description=help_text, conflict_handler="resolve")
        add_config_arguments(sub)
        add_launch_arguments(sub)
        sub.add_argument("--dry-run", action="store_true", help="print the sbatch script and queue nothing")
        if stage == "train":
            _add_train_arguments(sub)
        if stage == "reduce":
            _add_reduce_arguments(sub)
        elif module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(sub)
    pipe = stages.add_parser("pipeline", help="queue extract -> merge -> train -> eval -> reduce with afterok",
                             description="queue the built stages in order, joined by SLURM afterok dependencies")
    pipe.add_argument("job_file", metavar="JOB.toml", help="job file (see jobs/)")
    pipe.add_argument("--profile", metavar="PROFILE.toml", help="cluster profile (see slurm/)")
    pipe.add_argument("--work", metavar="WORK", help="work folder; overrides the job file's `work`")
    pipe.add_argument("--stages", default=",".join(STAGE_ORDER),
                      help=f"comma-separated stages to chain, in the order given (default: {','.join(STAGE_ORDER)})")
    pipe.add_argument("--results", metavar="DIR", help="the reduce stage's report folder (default: results/<name of WORK>)")
    add_launch_arguments(pipe)
    _add_train_arguments(pipe)


# ------------------------------------------------------------------------------------------ main
def main(args: argparse.Namespace) -> int:
    if args.stage == "pipeline":
        return submit_pipeline(args)
    module = stage_module(args.stage)
    if module is None:
        raise ConfigError(refusal(args.stage))
    overrides = dict(module.overrides(args)) if hasattr(module, "overrides") else {}
    overrides.update(launch_overrides(args))
    config = config_from_args(args, overrides)
    submit_stage(args.stage, module, config, args, dependency="")
    return 0


def submit_stage(stage: str, module: ModuleType, config: Config, args: argparse.Namespace, *, dependency: str):
    """Validate and queue one stage; print what was queued; return the Submission (None: nothing queued)."""
    from hpcvid.launch import executors as launch

    dry_run = bool(getattr(args, "dry_run", False))
    launch.validate_launch(config.launch, check_cluster=not dry_run)
    if stage == "train" and config.train.weights:  # a missing file must not wait in the queue to fail
        from hpcvid.learn.backbones import require_weights_file

        require_weights_file(config.train.weights, config.train.backbone)
    resources = (_train_resources(args, dependency) if stage == "train"
                 else launch.Resources(name=f"hpcvid-{stage}", dependency=dependency))
    specs, job = None, None
    if _is_shard_stage(stage, module):
        specs = _without_active(config, stage, list(module.plan(config, args)))
        if not specs:
            print(f"{stage}: nothing to submit: every shard has a record or a queued job (use --force to redo)")
            return None
    else:
        job = _single_job(stage, module, config, args)
    if dry_run:
        array = len(specs) if specs and len(specs) > 1 else 0
        print(launch.sbatch_text(config.launch, resources, launch.jobs_dir(config.work) / "logs" / "%j", array=array))
        return None
    write_resolved(config, argv=sys.argv)
    if specs is not None:
        return _report(launch.submit_shards(config, module.__name__, stage, specs, resources, sys.argv))
    return _report(launch.submit_single(config, job, stage, resources, sys.argv))


def _is_reducer(stage: str, module: ModuleType) -> bool:
    return stage == "reduce" and module.__name__ == "hpcvid.stages.reduce"


def _is_shard_stage(stage: str, module: ModuleType) -> bool:
    """An array of shards (extract, eval, merge's single shard); train and the reducer are one job each."""
    return (stage != "train" and not _is_reducer(stage, module)
            and hasattr(module, "plan") and hasattr(module, "run_shard"))


def _single_job(stage: str, module: ModuleType, config: Config, args: argparse.Namespace) -> Any:
    """The callable one job runs: the trainer, the reducer (`collect`), or a run_local stage."""
    from hpcvid.launch import executors as launch

    if stage == "train":
        return module.TrainJob(launch.absolute_work(config))
    if _is_reducer(stage, module):
        work = launch.absolute_work(config).work
        out = Path(getattr(args, "out", None) or module.default_out(work)).resolve()
        partial = ["--allow-partial"] if getattr(args, "allow_partial", False) else []
        return launch.CliJob(["collect", work, "--out", str(out), *partial])
    if hasattr(module, "run_local"):
        return launch.StageJob(module.__name__, launch.absolute_work(config).to_dict(), args)
    raise ConfigError(f"stage {stage!r} ({module.__name__}) has neither plan/run_shard nor run_local")


def _train_resources(args: argparse.Namespace, dependency: str):
    from hpcvid.launch.executors import Resources

    def given(name: str, default: int) -> int:
        value = getattr(args, name, None)
        return default if value is None else int(value)

    nodes, gpus = given("nodes", 1), given("gpus_per_node", 0)
    tasks = given("tasks_per_node", max(1, gpus))
    if nodes < 1 or tasks < 1 or gpus < 0:
        raise ConfigError(f"--nodes ({nodes}) and --tasks-per-node ({tasks}) must be >= 1, --gpus-per-node >= 0")
    return Resources(nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus, name="hpcvid-train",
                     dependency=dependency)


def _without_active(config: Config, stage: str, specs: list[ShardSpec]) -> list[ShardSpec]:
    """Drop shards whose latest job is still pending or running (never queue a shard twice)."""
    from hpcvid.launch import executors as launch
    from hpcvid.launch import scheduler

    if config.launch.executor != "slurm" or not specs:
        return specs
    latest: dict[tuple[int, int], str] = {}
    for submission in launch.read_submissions(config.work):
        if submission.stage == stage and submission.executor == "slurm":
            for task in submission.tasks:
                latest[(task["shard"], task["count"])] = task["job_id"]
    wanted = {(s.index, s.count): latest[(s.index, s.count)] for s in specs if (s.index, s.count) in latest}
    if not wanted:
        return specs
    try:
        states = scheduler.query_jobs(wanted.values())
    except HpcvidError:
        return specs
    kept = []
    for spec in specs:
        job_id = wanted.get((spec.index, spec.count))
        state = states.get(job_id).state if job_id in states else ""
        if state in ACTIVE:
            print(f"{stage}: shard {spec.name} is already queued as job {job_id} ({state}); not queued again")
        else:
            kept.append(spec)
    return kept


def _report(submission) -> Any:
    ids = submission.job_ids
    shards = ", ".join(t["name"] for t in submission.tasks)
    print(f"{submission.stage}: submitted {len(ids)} job(s) on {submission.executor}: {' '.join(ids)}")
    print(f"  shards: {shards}")
    print(f"  record: {submission.path}")
    return submission


def submit_pipeline(args: argparse.Namespace) -> int:
    """Queue the chosen stages in order, each ``afterok`` on the previous stage's jobs."""
    from hpcvid.launch.scheduler import base_ids

    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in submittable_stages()]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(submittable_stages())}")
    overrides = dict(launch_overrides(args), work=args.work)
    config = resolve_config(args.job_file, args.profile, overrides)
    if config.launch.executor != "slurm":
        raise ConfigError("submit pipeline chains jobs with SLURM dependencies: use --executor slurm (or a "
                          "profile with launch.executor = \"slurm\"); on this machine use `hpcvid run STAGE`")
    refused = [s for s in chosen if stage_module(s) is None]
    for stage in refused:
        print(f"{stage}: refused: {refusal(stage)}")
    dependency = ""
    queued = 0
    for stage in [s for s in chosen if s not in refused]:  # the order given (default: the pipeline's)
        module = stage_module(stage)
        stage_args = _default_stage_args(stage, module, args)
        stage_config = resolve_config(args.job_file, args.profile,
                                      {**(module.overrides(stage_args) if hasattr(module, "overrides") else {}),
                                       **overrides})
        submission = submit_stage(stage, module, stage_config, stage_args, dependency=dependency)
        if submission is not None:
            dependency = "afterok:" + ":".join(base_ids(submission.job_ids))
            queued += 1
    if not queued:
        print("pipeline: nothing queued")
    return 0


def _default_stage_args(stage: str, module: ModuleType, pipeline_args: argparse.Namespace) -> argparse.Namespace:
    """The stage's own flags at their defaults (the job file decides), plus the pipeline's shared ones."""
    parser = argparse.ArgumentParser(add_help=False, conflict_handler="resolve")
    add_config_arguments(parser)
    if stage == "train":
        _add_train_arguments(parser)
    if stage == "reduce":
        _add_reduce_arguments(parser)
    elif hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    stage_args = parser.parse_args([])
    stage_args.config, stage_args.profile, stage_args.work = pipeline_args.job_file, pipeline_args.profile, \
        pipeline_args.work
    for name in ("nodes", "gpus_per_node", "tasks_per_node"):
        setattr(stage_args, name, getattr(pipeline_args, name, None))
    if stage == "reduce":
        stage_args.out = getattr(pipeline_args, "results", None)
    stage_args.dry_run = False
    return stage_args
