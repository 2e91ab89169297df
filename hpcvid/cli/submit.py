"""``hpcvid submit STAGE``: queue a stage on SLURM (or submitit's local/debug executor) and return at once.

A sharded stage (extract, features, eval) becomes one array job with a task per shard that has no record
of the unit's current set (all shards with ``--force``), or several arrays where the cluster's
``MaxArraySize`` is smaller than the shard count. Shards whose earlier job is still pending or running are
not queued twice, and when SLURM cannot be asked about them nothing is queued (``--force`` queues anyway).
merge, train and reduce are one job each; train's job has nodes x tasks ranks.

``submit pipeline JOB.toml`` queues the whole study as one dependency graph (:mod:`hpcvid.launch.pipeline`):
the models of ``--models`` (default: the job file's ``pipeline.models``), each stage with its own
``[launch.<stage>]`` resources. Submitting it again picks up where it stopped.

Every setting is checked here, on the login node, before sbatch runs (sbatch options against sbatch's own,
array and job limits against ``scontrol show config``), and every flag is a config key, so the job runs
with exactly the settings ``hpcvid run`` would use.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from hpcvid.cli import config_from_args
from hpcvid.config import MODELS, resolve_config
from hpcvid.learn.kinds import KINDS
from hpcvid.errors import ConfigError
from hpcvid.stages import STAGES

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
    "--container": ("launch.container", str, "Apptainer/Singularity image the jobs run in"),
}


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("launch (override the cluster profile's [launch] and [launch.STAGE])")
    for flag, (_, kind, help_text) in LAUNCH_FLAGS.items():
        group.add_argument(flag, type=kind, default=None, help=help_text)
    group.add_argument("--sbatch", action="append", metavar="OPTION[=VALUE]", default=[],
                       help="any other sbatch option, e.g. --sbatch constraint=a100 --sbatch exclusive (repeatable; "
                            "launch.sbatch in a profile)")


def launch_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The launch flags as dotted config keys. ``submit`` means SLURM: when neither a flag, the profile nor
    the job file names an executor, it is ``slurm`` (the config's own default, ``local``, serves ``run``)."""
    values = {key: getattr(args, flag[2:].replace("-", "_"), None) for flag, (key, _, _) in LAUNCH_FLAGS.items()}
    if values["launch.executor"] is None and not _files_name_executor(args):
        values["launch.executor"] = "slurm"
    for item in getattr(args, "sbatch", None) or []:
        name, has_value, value = item.partition("=")
        values[f"launch.sbatch.{name.strip().lstrip('-')}"] = value if has_value else True
    return values


def _files_name_executor(args: argparse.Namespace) -> bool:
    return bool(_files_naming(args, "executor", ()))


def _files_naming(args: argparse.Namespace, key: str, stages: Any) -> bool:
    """True when the profile or the job file sets ``launch.<key>`` (or ``launch.<stage>.<key>``)."""
    from hpcvid.config import load_toml

    for attribute, what in (("profile", "cluster profile"), ("config", "job file"), ("job_file", "job file")):
        path = getattr(args, attribute, None)
        if not path:
            continue
        launch = load_toml(path, what).get("launch", {})
        if key in launch or any(key in launch.get(stage, {}) for stage in stages):
            return True
    return False


def walltime_chosen(args: argparse.Namespace) -> frozenset[str]:
    """The stages whose walltime the user chose (a flag chooses every stage's). A stage that can predict its
    walltime asks for the prediction where none was chosen, rather than for the default."""
    if getattr(args, "walltime", None) is not None:
        return frozenset(STAGES)
    return frozenset(stage for stage in STAGES if _files_naming(args, "walltime", (stage,)))


def add_cli(parser: argparse.ArgumentParser) -> None:
    from hpcvid.cli.run import add_stage_arguments
    from hpcvid.launch.pipeline import STUDY_STAGES

    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, stage in STAGES.items():
        sub = stages.add_parser(name, help=stage.help, description=stage.help)
        add_stage_arguments(sub, stage)
        add_launch_arguments(sub)
        sub.add_argument("--dry-run", action="store_true", help="print the sbatch script and queue nothing")
    about = ("queue the whole study as one graph of SLURM dependencies: extract -> merge; frame and flow "
             "training; two-stream after both; features after frame, the LSTM after them; TSN, C3D and CNN-LSTM "
             "(when named in --models) after extract; each eval after its training; one reduce after every eval")
    pipe = stages.add_parser("pipeline", help=about, description=about)
    pipe.add_argument("job_file", metavar="JOB.toml", help="job file (see jobs/)")
    pipe.add_argument("--profile", metavar="PROFILE.toml", help="cluster profile (see slurm/)")
    pipe.add_argument("--work", metavar="WORK", help="work folder; overrides the job file's `work`")
    pipe.add_argument("--models", metavar="M1,M2", help=f"models of the study, from {','.join(KINDS)} (default: "
                                                        f"the job file's pipeline.models, else {','.join(MODELS)})")
    pipe.add_argument("--stages", metavar="S1,S2", help=f"only these stages, from {','.join(STUDY_STAGES)}; units of "
                                                        "the others are taken as done (pipeline.stages)")
    pipe.add_argument("--results", metavar="DIR", help="the reduce stage's report folder (default: results/<name of WORK>)")
    pipe.add_argument("--force", action="store_true", help="redo every shard; queue even when SLURM cannot be asked")
    pipe.add_argument("--dry-run", action="store_true", help="print every job's sbatch script and queue nothing")
    add_launch_arguments(pipe)


# ------------------------------------------------------------------------------------------ main
def main(args: argparse.Namespace) -> int:
    from hpcvid.launch.pipeline import Node, submit_graph

    if args.stage == "pipeline":
        return submit_pipeline(args)
    stage = STAGES[args.stage]
    overrides = {**stage.load().overrides(args), **launch_overrides(args)}
    config = config_from_args(args, overrides)
    submit_graph(config, [Node(stage.name)], argv=sys.argv, only=getattr(args, "shard", None),
                 force=bool(args.force), dry_run=bool(args.dry_run), walltime_chosen=walltime_chosen(args))
    return 0


def _listed(text: str | None) -> list[str] | None:
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


def submit_pipeline(args: argparse.Namespace) -> int:
    """Queue the study's graph for the chosen models and stages (each stage with its own resources)."""
    from hpcvid.launch.pipeline import study_graph, submit_graph

    overrides = dict(launch_overrides(args), work=args.work)
    overrides.update({"pipeline.models": _listed(args.models), "pipeline.stages": _listed(args.stages),
                      "report.out": args.results})
    config = resolve_config(args.job_file, args.profile, overrides)
    if config.launch.executor != "slurm" and not args.dry_run:
        raise ConfigError("submit pipeline chains jobs with SLURM dependencies: use --executor slurm (or a "
                          "profile with launch.executor = \"slurm\"); on this machine use `hpcvid run STAGE`")
    nodes = study_graph(config.pipeline.models, config.pipeline.stages, config.report.runs)
    submit_graph(config, nodes, argv=sys.argv, force=bool(args.force), dry_run=bool(args.dry_run),
                 walltime_chosen=walltime_chosen(args))
    return 0
