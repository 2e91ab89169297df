"""Executors: where shards run (SLURM, this machine, in-process), never what they do.

Every shard runs ``stage.run_shard(config, spec)``, the same plain function on every executor, wrapped in a
:class:`ShardJob`: a submitit *Checkpointable* (it has ``checkpoint()``), so on SLURM's pre-timeout signal
(or ``scancel -s USR2``) submitit pickles it again and requeues the job; the rerun calls ``run_shard`` once
more, which resumes by design (the stage skips what an earlier attempt finished). Stages that are not a list
of independent shards (merge, reduce) run as one :class:`StageJob`.

A submission writes ``WORK/jobs/<stage>-<timestamp>.json`` (job ids, which shard each array task runs, the
submitit folder, the command line), so a later, separate process (``hpcvid status``, ``hpcvid cancel``, a
resubmission) finds the jobs without asking anyone but the files and SLURM.

submitit is imported inside functions only, so ``hpcvid status`` stays fast on a login node.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hpcvid.config import Config, LaunchConfig, config_from_dict, replace, walltime_minutes
from hpcvid.errors import ConfigError, SchedulerError
from hpcvid.fileio import atomic_write_json, read_json
from hpcvid.launch.sharding import ShardSpec

log = logging.getLogger(__name__)

JOBS_DIR = "jobs"
RECORD_SCHEMA = 1
_GRES = re.compile(r"^[A-Za-z][\w.-]*(:[\w.-]+)?(:\d+)?(,[A-Za-z][\w.-]*(:[\w.-]+)?(:\d+)?)*$")
_MEM = re.compile(r"^\d+[KMGT]?$")


# ------------------------------------------------------------------------------------------ the jobs
def _load_module(module_name: str):
    return importlib.import_module(module_name)


def _plain_args(args: argparse.Namespace | None) -> argparse.Namespace:
    """A picklable copy of parsed arguments (the CLI stores the verb module in ``_module``)."""
    values = {k: v for k, v in vars(args or argparse.Namespace()).items() if not k.startswith("_")}
    return argparse.Namespace(**values)


def limit_threads(threads: int) -> None:
    """Cap this process's numeric libraries at ``threads`` CPU threads.

    Why: torch and OpenCV each start one thread per core by default, so N local shard processes on N cores
    would run N x cores threads and slow each other down (parallelism comes from processes, DESIGN 8).
    The variables cover OpenMP/MKL/BLAS libraries imported later (torch reads OMP_NUM_THREADS at import);
    the setters cover OpenCV and an already imported torch.
    """
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    import cv2

    cv2.setNumThreads(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which taskset and cgroup cpusets narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ShardJob:
    """One shard of a shard stage, as a submitit Checkpointable (duck-typed: it has ``checkpoint``).

    ``threads`` > 0 caps the job's CPU threads (:func:`limit_threads`); 0 leaves the libraries' defaults
    (on SLURM the allocation's ``cpus_per_task`` already bounds the job).
    """

    def __init__(self, module_name: str, config: dict[str, Any], index: int, count: int, force: bool = False,
                 threads: int = 0):
        self.module_name = module_name
        self.config = config
        self.index = index
        self.count = count
        self.force = force
        self.threads = threads

    @property
    def spec(self) -> ShardSpec:
        return ShardSpec(self.index, self.count, self.force)

    def __call__(self) -> dict[str, Any]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if getattr(self, "threads", 0):  # getattr: a job pickled by an older version has no threads
            limit_threads(self.threads)
        module = _load_module(self.module_name)
        log.info("running %s shard %s", self.module_name, self.spec.name)
        return module.run_shard(config_from_dict(self.config), self.spec)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Requeue the same shard: its rerun resumes from what the stage already wrote."""
        import submitit

        log.warning("%s shard %s: checkpoint and requeue", self.module_name, self.spec.name)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class StageJob:
    """A whole stage that is not a list of shards (``run_local(config, args)``), e.g. merge or reduce."""

    def __init__(self, module_name: str, config: dict[str, Any], args: argparse.Namespace | None = None):
        self.module_name = module_name
        self.config = config
        self.args = _plain_args(args)

    def __call__(self) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        module = _load_module(self.module_name)
        code = int(module.run_local(config_from_dict(self.config), self.args) or 0)
        if code not in (0, 3):  # 3 = finished with failed items: the job did its work
            raise SchedulerError(f"{self.module_name} exited with code {code}")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class CliJob:
    """An ``hpcvid`` verb run as a job (the reducer's ``collect``): the CLI's own code, nothing re-implemented."""

    def __init__(self, argv: Sequence[str]):
        self.argv = [str(a) for a in argv]

    def __call__(self) -> int:
        from hpcvid.cli import main

        code = int(main(self.argv) or 0)
        if code not in (0, 3):
            raise SchedulerError(f"hpcvid {' '.join(self.argv)} exited with code {code}")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# ------------------------------------------------------------------------------------------ validation
def validate_launch(launch: LaunchConfig, *, check_cluster: bool = True) -> None:
    """Refuse, before sbatch runs, what sbatch would refuse later (or worse, accept wrongly)."""
    walltime_minutes(launch.walltime)
    if launch.gres and not _GRES.match(launch.gres):
        raise ConfigError(f"launch.gres = {launch.gres!r} is not valid: use NAME[:TYPE]:COUNT, e.g. gpu:a100:4")
    if launch.mem and not _MEM.match(launch.mem):
        raise ConfigError(f"launch.mem = {launch.mem!r} is not valid: use a number with K, M, G or T, e.g. 16G")
    if launch.signal_delay_s >= walltime_minutes(launch.walltime) * 60:
        raise ConfigError(f"launch.signal_delay_s = {launch.signal_delay_s} must be shorter than the walltime "
                          f"{launch.walltime}: the job would be signalled before it starts")
    if launch.executor == "slurm" and check_cluster:
        _check_partition(launch.partition)


def _check_partition(partition: str) -> None:
    """The partition must exist on this cluster (one sinfo call)."""
    from hpcvid.launch.external import run_command
    from hpcvid.errors import CommandError

    try:
        out = run_command(["sinfo", "-h", "-o", "%P"], timeout=30)
    except CommandError as error:
        raise SchedulerError(f"cannot reach SLURM ({error}); is this a login node? For the local test cluster "
                             "run `sudo slurm/local-cluster.sh up`") from error
    names = [p.strip().rstrip("*") for p in out.stdout.split()]
    if partition and partition not in names:
        raise ConfigError(f"launch.partition = {partition!r} does not exist on this cluster; "
                          f"partitions: {', '.join(names) or '(none)'}")


# ------------------------------------------------------------------------------------------ executors
@dataclass(frozen=True)
class Resources:
    """What one job (array task) needs beyond the launch section: the trainer's nodes x tasks x GPUs."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    name: str = "hpcvid"
    dependency: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def slurm_parameters(launch: LaunchConfig, resources: Resources) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (without the ``slurm_`` prefix) for this launch section."""
    params: dict[str, Any] = {
        "job_name": resources.name,
        "time": walltime_minutes(launch.walltime),
        "nodes": resources.nodes,
        "ntasks_per_node": resources.tasks_per_node,
        "cpus_per_task": launch.cpus_per_task,
        "signal_delay_s": launch.signal_delay_s,
        "array_parallelism": launch.array_parallelism,
        "stderr_to_stdout": True,
    }
    optional = {"partition": launch.partition, "account": launch.account, "qos": launch.qos,
                "gres": launch.gres, "mem": launch.mem, "dependency": resources.dependency}
    params.update({k: v for k, v in optional.items() if v})
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    # a requeued job must keep its place in an array and its dependants: SLURM's own requeue flag
    params["additional_parameters"] = {"requeue": True, **resources.extra}
    return params


def make_executor(folder: Path, launch: LaunchConfig, resources: Resources):
    """A submitit executor for ``launch.executor`` writing its logs/pickles under ``folder``."""
    import submitit

    if launch.executor == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=launch.max_requeues)
        executor.update_parameters(**slurm_parameters(launch, resources))
        return executor
    if launch.executor == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=launch.max_requeues)
        executor.update_parameters(timeout_min=walltime_minutes(launch.walltime), nodes=1,
                                   tasks_per_node=resources.tasks_per_node,
                                   gpus_per_node=resources.gpus_per_node)
        return executor
    if launch.executor == "debug":
        return submitit.DebugExecutor(folder=folder)
    raise ConfigError(f"launch.executor = {launch.executor!r}: choose slurm, local or debug")


def sbatch_text(launch: LaunchConfig, resources: Resources, folder: Path, *, array: int = 0) -> str:
    """The sbatch script submitit would write for these settings (shown by --dry-run, tested as golden)."""
    import submitit

    from submitit.slurm.slurm import _make_sbatch_string

    executor = submitit.SlurmExecutor(folder=folder, python=sys.executable)
    executor.update_parameters(**slurm_parameters(launch, resources))
    params = dict(executor.parameters)
    if array:
        params["map_count"] = array  # what executor.batch() sets for an array of this size
    return _make_sbatch_string(command=f"{shlex.quote(sys.executable)} -u -m submitit.core._submit "
                               f"{shlex.quote(str(folder))}", folder=folder, **params)


# ------------------------------------------------------------------------------------------ records
@dataclass
class Submission:
    """What one ``hpcvid submit`` queued: enough for status, cancel and resubmission in another process."""

    stage: str
    executor: str
    job_ids: list[str]
    tasks: list[dict[str, Any]]  # {"job_id", "shard" (index), "count", "name"} per array task / job
    folder: str
    argv: list[str]
    submitted: str
    dependency: str = ""
    walltime: str = ""
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        payload = dict(self.__dict__)
        payload.pop("path")
        payload["schema_version"] = RECORD_SCHEMA
        payload["kind"] = "hpcvid.submission"
        return payload


def jobs_dir(work: Path | str) -> Path:
    return Path(work) / JOBS_DIR


def write_submission(work: Path | str, submission: Submission) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    folder = jobs_dir(work)
    path = folder / f"{submission.stage}-{stamp}.json"
    serial = 1
    while path.exists():  # two submissions in the same second (a pipeline) keep both records
        serial += 1
        path = folder / f"{submission.stage}-{stamp}-{serial}.json"
    atomic_write_json(path, submission.to_dict())
    submission.path = str(path)
    return path


def read_submissions(work: Path | str) -> list[Submission]:
    """Every submission record of a work folder, oldest first (a corrupt one is a clear error)."""
    records = []
    for path in sorted(jobs_dir(work).glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
        try:
            payload = read_json(path)
            if payload.get("kind") != "hpcvid.submission":
                continue
            fields = {k: payload[k] for k in ("stage", "executor", "job_ids", "tasks", "folder", "argv",
                                              "submitted")}
            records.append(Submission(**fields, dependency=payload.get("dependency", ""),
                                      walltime=payload.get("walltime", ""), path=str(path)))
        except (ValueError, KeyError, OSError) as error:
            raise SchedulerError(f"submission record {path} is unreadable ({error}); move it away") from error
    return records


# ------------------------------------------------------------------------------------------ submitting
def absolute_work(config: Config) -> Config:
    """Jobs may start in another folder: give them the work folder as an absolute path."""
    return replace(config, work=str(Path(config.work).expanduser().resolve()))


def submit_shards(config: Config, module_name: str, stage: str, specs: Sequence[ShardSpec],
                  resources: Resources, argv: Sequence[str]) -> Submission:
    """Queue one array (one task per shard spec) and write its submission record."""
    config = absolute_work(config)
    folder = jobs_dir(config.work) / "logs" / "%j"
    executor = make_executor(folder, config.launch, resources)
    payload = config.to_dict()
    # Without a cap torch and OpenCV start a thread per core of the NODE, not of the allocation.
    threads = config.launch.cpus_per_task if config.launch.executor != "debug" else 0
    shard_jobs = [ShardJob(module_name, payload, s.index, s.count, s.force, threads) for s in specs]
    if config.launch.executor == "slurm" and len(shard_jobs) > 1:
        with executor.batch():
            jobs = [executor.submit(job) for job in shard_jobs]
    else:
        jobs = [executor.submit(job) for job in shard_jobs]
    tasks = [{"job_id": str(job.job_id), "shard": s.index, "count": s.count, "name": s.name}
             for job, s in zip(jobs, specs)]
    submission = Submission(stage, config.launch.executor, [str(j.job_id) for j in jobs], tasks,
                            str(folder), list(argv), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            resources.dependency, config.launch.walltime)
    write_submission(config.work, submission)
    if config.launch.executor == "debug":  # the debug executor runs only when asked for the result
        for job in jobs:
            job.result()
    return submission


def submit_single(config: Config, job: Any, stage: str, resources: Resources, argv: Sequence[str]) -> Submission:
    """Queue one (possibly multi-node) job and write its submission record."""
    config = absolute_work(config)
    folder = jobs_dir(config.work) / "logs" / "%j"
    executor = make_executor(folder, config.launch, resources)
    submitted = executor.submit(job)
    submission = Submission(stage, config.launch.executor, [str(submitted.job_id)],
                            [{"job_id": str(submitted.job_id), "shard": 0, "count": 1, "name": stage}],
                            str(folder), list(argv), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            resources.dependency, config.launch.walltime)
    write_submission(config.work, submission)
    if config.launch.executor == "debug":
        submitted.result()
    return submission


def run_shards_locally(config: Config, module_name: str, specs: Sequence[ShardSpec], jobs: int,
                       threads: int | None = None) -> list[dict]:
    """``hpcvid run --jobs N``: the shards through submitit's local executor, N processes at a time.

    Each process gets ``threads`` CPU threads, by default the usable cores / the processes running at
    once (at least 1): without that cap, torch and OpenCV in every process each use all cores and N
    processes oversubscribe the machine N-fold.
    """
    import submitit

    if threads is None:
        threads = max(1, usable_cores() // max(1, min(jobs, len(specs))))

    config = absolute_work(config)
    folder = jobs_dir(config.work) / "logs" / "local-%j"
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=walltime_minutes(config.launch.walltime))
    payload = config.to_dict()
    pending = [ShardJob(module_name, payload, s.index, s.count, s.force, threads) for s in specs]
    records: dict[int, dict] = {}
    running: list[tuple[int, Any]] = []
    while pending or running:
        while pending and len(running) < max(1, jobs):
            shard = pending.pop(0)
            running.append((shard.index, executor.submit(shard)))
        time.sleep(0.2)
        for index, job in [item for item in running if item[1].done()]:
            running.remove((index, job))
            records[index] = job.result()  # a failed shard raises here, naming its log
    return [records[s.index] for s in specs]
