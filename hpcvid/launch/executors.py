"""Executors: where shards run (SLURM, this machine, in-process), never what they do.

Every shard runs its stage's ``run_shard(config, spec)`` through :func:`run_stage_shard` (the shard's lock
around the plain function), the same on every executor, wrapped in a :class:`ShardJob`: a submitit
*Checkpointable* (it has ``checkpoint()``), so on SLURM's pre-timeout signal (or ``scancel -s USR2``)
submitit pickles it again and requeues the job; the rerun calls ``run_shard`` once more, which resumes by
design (the stage skips what an earlier attempt finished). A stage of one unit of work (merge, train,
reduce) is one shard, ``0000-of-0001``; the trainer's job has one task per rank.

A submission writes ``WORK/jobs/<unit>-<timestamp>.json`` (the unit, job ids, which shard each array task
runs, the submitit folder, the command line), so a later, separate process (``hpcvid status``, ``hpcvid
cancel``, a resubmission) finds the jobs without asking anyone but the files and SLURM.

submitit is imported inside functions only, so ``hpcvid status`` stays fast on a login node.
"""
from __future__ import annotations

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
from hpcvid.launch.cluster import (ClusterLimits, Site, check_sbatch_options, option_name, shared_parallelism,
                                   split_into_arrays)
from hpcvid.launch.sharding import ShardSpec
from hpcvid.stages import Stage
from hpcvid.workfolder import Unit, WorkFolder

log = logging.getLogger(__name__)

RECORD_SCHEMA = 2
_GRES = re.compile(r"^[A-Za-z][\w.-]*(:[\w.-]+)?(:\d+)?(,[A-Za-z][\w.-]*(:[\w.-]+)?(:\d+)?)*$")
_MEM = re.compile(r"^\d+[KMGT]?$")


# ------------------------------------------------------------------------------------------ the jobs
def limit_threads(threads: int) -> None:
    """Cap this process's numeric libraries at ``threads`` CPU threads.

    Why: torch and OpenCV each start one thread per core by default, so N local shard processes on N cores
    would run N x cores threads and slow each other down (parallelism comes from processes: threads
    inside one decoder slowed small clips here).
    The variables cover OpenMP/MKL/BLAS libraries imported later (torch reads OMP_NUM_THREADS at import);
    the setters cover OpenCV and an already imported torch.
    """
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    import cv2

    cv2.setNumThreads(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def exit_without_collecting() -> None:
    """Let this process end without Python's last garbage collections.

    At exit Python collects every object still alive, a walk over all that torch, torchvision and a CNN
    left in memory: 0.6-1.2 s of every job process and command here, after its files are written (a fixed
    cost each shard pays, and what the bench's scaling part saw as a tail of ~1 s per run). Frozen, the
    objects are left to go with the process. During the run, objects are freed as before; at exit, exit
    handlers (logging's flush, ``weakref.finalize``) still run, but what is still alive then (module
    globals, reference cycles) may go without its finalizer. Nothing is lost by that: every file this
    project writes is closed, and renamed into place, before its job returns.
    """
    import atexit
    import gc

    atexit.unregister(gc.freeze)        # once, however many jobs ran in this process
    atexit.register(gc.freeze)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which taskset and cgroup cpusets narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_stage_shard(stage: Stage, config: Config, spec: ShardSpec) -> dict[str, Any]:
    """Run one shard of ``stage`` here: the stage's own ``run_shard``, under the shard's lock.

    Every executor comes through this function, so the lock is taken the same way in-process, in local
    processes, in SLURM tasks and on MPI ranks. A distributed stage (the trainer) takes its lock itself, on
    rank 0 only: its ranks run the same shard together.
    """
    module = stage.load()
    if stage.distributed:
        return module.run_shard(config, spec)
    unit = module.unit(config)
    with WorkFolder.of(config).lock(unit, spec):
        return module.run_shard(config, spec)


class ShardJob:
    """One shard of a stage, as a submitit Checkpointable (duck-typed: it has ``checkpoint``).

    ``threads`` > 0 caps the job's CPU threads (:func:`limit_threads`); 0 leaves the libraries' defaults.
    ``force`` is honoured on the job's first start only: a job that SLURM started again (requeued after a
    timeout, a preemption or a node failure) resumes what its first start did instead of starting over,
    or a long shard would begin anew at every requeue and never finish.
    """

    def __init__(self, stage: Stage, config: dict[str, Any], index: int, count: int, force: bool = False,
                 threads: int = 0):
        self.stage = stage
        self.config = config
        self.index = index
        self.count = count
        self.force = force
        self.threads = threads

    @property
    def spec(self) -> ShardSpec:
        requeued = os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")
        return ShardSpec(self.index, self.count, self.force and not requeued)

    def __call__(self) -> dict[str, Any]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        exit_without_collecting()      # the job's process ends once its result is written
        if self.threads:
            limit_threads(self.threads)
        log.info("running %s shard %s", self.stage.name, self.spec.name)
        return run_stage_shard(self.stage, config_from_dict(self.config), self.spec)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Requeue the same shard, without --force: its rerun resumes from what the stage already wrote."""
        import submitit

        log.warning("%s shard %s: checkpoint and requeue", self.stage.name, self.spec.name)
        again = ShardJob(self.stage, self.config, self.index, self.count, False, self.threads)
        return submitit.helpers.DelayedSubmission(again, *args, **kwargs)


# ------------------------------------------------------------------------------------------ validation
def validate_launch(launch: LaunchConfig, *, check_cluster: bool = True, site: Site | None = None) -> None:
    """Refuse, before sbatch runs, what sbatch would refuse later (or worse, accept wrongly).

    ``site`` answers which sbatch options exist (asked once per submit); without one, those of SLURM 22.05
    and of the local ``sbatch --help``.
    """
    walltime_minutes(launch.walltime)
    if launch.gres and not _GRES.match(launch.gres):
        raise ConfigError(f"launch.gres = {launch.gres!r} is not valid: use NAME[:TYPE]:COUNT, e.g. gpu:a100:4")
    if launch.mem and not _MEM.match(launch.mem):
        raise ConfigError(f"launch.mem = {launch.mem!r} is not valid: use a number with K, M, G or T, e.g. 16G")
    if launch.signal_delay_s >= walltime_minutes(launch.walltime) * 60:
        raise ConfigError(f"launch.signal_delay_s = {launch.signal_delay_s} must be shorter than the walltime "
                          f"{launch.walltime}: the job would be signalled before it starts")
    if launch.sbatch:
        check_sbatch_options(launch.sbatch, (site or Site(offline=True)).sbatch_options)
    if any("\n" in line for line in launch.setup):
        raise ConfigError("launch.setup: give one shell line per list item (a line holds no newline)")
    if launch.container and "://" not in launch.container and not Path(launch.container).expanduser().is_file():
        raise ConfigError(f"launch.container = {launch.container!r} does not exist: give the path of an "
                          "Apptainer/Singularity image (.sif) that the compute nodes can read")
    if launch.executor == "slurm" and check_cluster:
        check_partitions(launch.partition)


def check_partitions(*partitions: str) -> None:
    """Each named partition must exist on this cluster (one sinfo call for all of them)."""
    from hpcvid.launch.external import run_command
    from hpcvid.errors import CommandError

    try:
        out = run_command(["sinfo", "-h", "-o", "%P"], timeout=30)
    except CommandError as error:
        raise SchedulerError(f"cannot reach SLURM ({error}); is this a login node? For the local test cluster "
                             "run `sudo slurm/local-cluster.sh up`") from error
    names = [p.strip().rstrip("*") for p in out.stdout.split()]
    for partition in partitions:
        if partition and partition not in names:
            raise ConfigError(f"launch.partition = {partition!r} does not exist on this cluster; "
                              f"partitions: {', '.join(names) or '(none)'}")


# ------------------------------------------------------------------------------------------ executors
@dataclass(frozen=True)
class Resources:
    """What one job (array task) needs beyond the launch section: the trainer's nodes x tasks x GPUs, and
    the folders a container must see (the work folder and the dataset)."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    name: str = "hpcvid"
    dependency: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    binds: tuple[str, ...] = ()


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
    if launch.setup:
        params["setup"] = list(launch.setup)
    passed = {option_name(k): v for k, v in launch.sbatch.items() if v is not False}
    # a requeued job must keep its place in an array and its dependants: SLURM's own requeue flag
    params["additional_parameters"] = {"requeue": True, **resources.extra, **passed}
    return params


def job_python(launch: LaunchConfig, resources: Resources) -> str:
    """The shell words that start Python in a job: this interpreter, or one inside the site's container.

    In a container the work folder and the dataset must be bound (they are, with ``launch.container_binds``),
    and ``--nv`` makes the node's GPUs visible when the job asks for any.
    """
    if not launch.container:
        return shlex.quote(launch.python or sys.executable)
    words = [launch.container_runtime, "exec"]
    if launch.gpus_per_node or resources.gpus_per_node or "gpu" in launch.gres:
        words.append("--nv")
    binds = list(dict.fromkeys([*resources.binds, *launch.container_binds]))
    if binds:
        words += ["--bind", ",".join(binds)]
    words += [launch.container, launch.python or "python3"]
    return " ".join(shlex.quote(word) for word in words)


def make_executor(folder: Path, launch: LaunchConfig, resources: Resources):
    """A submitit executor for ``launch.executor`` writing its logs/pickles under ``folder``."""
    import submitit

    if launch.executor == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=launch.max_requeues,
                                          python=job_python(launch, resources))
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
    return _make_sbatch_string(command=f"{job_python(launch, resources)} -u -m submitit.core._submit "
                               f"{shlex.quote(str(folder))}", folder=folder, **params)


# ------------------------------------------------------------------------------------------ records
@dataclass
class Submission:
    """What one ``hpcvid submit`` queued: enough for status, cancel and resubmission in another process."""

    unit: str
    executor: str
    job_ids: list[str]
    tasks: list[dict[str, Any]]  # {"job_id", "shard" (index), "count", "name"} per array task / job
    folder: str                  # submitit's folder, relative to WORK
    argv: list[str]
    submitted: str
    dependency: str = ""
    walltime: str = ""
    arrays: list[str] = field(default_factory=list)   # SLURM job ids of the arrays (several past MaxArraySize)
    path: str = ""

    @property
    def stage(self) -> str:
        return Unit.parse(self.unit).stage

    def to_dict(self) -> dict[str, Any]:
        payload = dict(self.__dict__)
        payload.pop("path")
        payload["stage"] = self.stage
        payload["schema_version"] = RECORD_SCHEMA
        payload["kind"] = "hpcvid.submission"
        return payload


def write_submission(work: Path | str, submission: Submission) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    folder = WorkFolder(work).jobs_dir
    slug = Unit.parse(submission.unit).slug
    path = folder / f"{slug}-{stamp}.json"
    serial = 1
    while path.exists():  # two submissions in the same second (a pipeline) keep both records
        serial += 1
        path = folder / f"{slug}-{stamp}-{serial}.json"
    atomic_write_json(path, submission.to_dict())
    submission.path = str(path)
    return path


def read_submissions(work: Path | str) -> list[Submission]:
    """Every submission record of a work folder, oldest first (a corrupt one is a clear error)."""
    records = []
    for path in sorted(WorkFolder(work).jobs_dir.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
        try:
            payload = read_json(path)
            if payload.get("kind") != "hpcvid.submission":
                continue
            fields = {k: payload[k] for k in ("executor", "job_ids", "tasks", "folder", "argv", "submitted")}
            records.append(Submission(unit=payload.get("unit", payload.get("stage", "")), **fields,
                                      dependency=payload.get("dependency", ""), walltime=payload.get("walltime", ""),
                                      arrays=list(payload.get("arrays", [])), path=str(path)))
        except (ValueError, KeyError, OSError, TypeError) as error:
            raise SchedulerError(f"submission record {path} is unreadable ({error}); move it away") from error
    return records


# ------------------------------------------------------------------------------------------ submitting
def absolute_work(config: Config) -> Config:
    """Jobs may start in another folder: give them the work folder as an absolute path."""
    return replace(config, work=str(Path(config.work).expanduser().resolve()))


def resources_for(stage: Stage, config: Config, dependency: str = "", name: str = "") -> Resources:
    """What one job of ``stage`` asks for: a distributed stage spans nodes x tasks; an array task is one task.

    ``config.launch`` must be the stage's own (:meth:`hpcvid.config.Config.for_stage`).
    """
    launch = config.launch
    name = name or f"hpcvid-{stage.name}"
    binds = container_binds(config) if launch.container else ()
    if not stage.distributed:
        return Resources(gpus_per_node=launch.gpus_per_node, name=name, dependency=dependency, binds=binds)
    tasks = launch.tasks_per_node or max(1, launch.gpus_per_node)
    return Resources(nodes=launch.nodes, tasks_per_node=tasks, gpus_per_node=launch.gpus_per_node, name=name,
                     dependency=dependency, binds=binds)


def container_binds(config: Config) -> tuple[str, ...]:
    """The folders a job in a container reads and writes: the work folder and the dataset (absolute)."""
    paths = [config.work, config.dataset.root, config.dataset.splits_dir]
    return tuple(dict.fromkeys(str(Path(p).expanduser().resolve()) for p in paths if p))


def submit_shards(config: Config, stage: Stage, specs: Sequence[ShardSpec], resources: Resources,
                  argv: Sequence[str], limits: ClusterLimits | None = None) -> Submission:
    """Queue the shards (job arrays of one task per shard; one job for a single shard) and write the record.

    On SLURM, more shards than ``limits.max_array_size`` are queued as several arrays that share the
    profile's ``array_parallelism``; the record lists every task, so status, cancel and a resubmission treat
    them as one unit. If sbatch refuses a later array, the record keeps what was queued and the error says so.
    """
    config = absolute_work(config)
    work = WorkFolder.of(config)
    unit = stage.load().unit(config)
    folder = work.logs_dir / "%j"
    executor = make_executor(folder, config.launch, resources)
    payload = config.to_dict()
    # Without a cap torch and OpenCV start a thread per core of the NODE, not of the allocation.
    threads = config.launch.cpus_per_task if config.launch.executor != "debug" else 0
    shard_jobs = [ShardJob(stage, payload, s.index, s.count, s.force, threads) for s in specs]
    slurm = config.launch.executor == "slurm"
    pieces = split_into_arrays(shard_jobs, (limits or ClusterLimits()).max_array_size) if slurm else [shard_jobs]
    jobs: list[Any] = []
    arrays: list[str] = []
    failure: Exception | None = None
    for piece in pieces:
        try:
            if slurm and len(piece) > 1:
                if len(pieces) > 1:
                    executor.update_parameters(
                        array_parallelism=shared_parallelism(config.launch.array_parallelism, len(pieces)))
                with executor.batch():
                    queued = [executor.submit(job) for job in piece]
            else:
                queued = [executor.submit(job) for job in piece]
        except Exception as error:  # sbatch's refusal, in submitit's words: reported below with what was queued
            failure = error
            break
        jobs.extend(queued)
        arrays.extend(dict.fromkeys(str(job.job_id).split("_", 1)[0] for job in queued))
    if failure is not None and not jobs:
        raise SchedulerError(f"{unit}: sbatch refused the job: {_last_error_line(str(failure))}") from failure
    done_specs = specs[:len(jobs)]
    tasks = [{"job_id": str(job.job_id), "shard": s.index, "count": s.count, "name": s.name}
             for job, s in zip(jobs, done_specs)]
    submission = Submission(str(unit), config.launch.executor, [str(j.job_id) for j in jobs], tasks,
                            work.relative(folder), list(argv), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            resources.dependency, config.launch.walltime, arrays=arrays if slurm else [])
    write_submission(config.work, submission)
    if failure is not None:
        raise SchedulerError(f"{unit}: queued {len(jobs)} of {len(specs)} shards (jobs {', '.join(arrays)}), then "
                             f"sbatch refused the rest: {_last_error_line(str(failure))}; submit again to queue "
                             "them") from failure
    if config.launch.executor == "debug":  # the debug executor runs only when asked for the result
        for job in jobs:
            job.result()
    return submission


def run_shards_locally(config: Config, stage: Stage, specs: Sequence[ShardSpec], jobs: int,
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
    folder = WorkFolder.of(config).logs_dir / "local-%j"
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=walltime_minutes(config.launch.walltime))
    payload = config.to_dict()
    pending = [ShardJob(stage, payload, s.index, s.count, s.force, threads) for s in specs]
    records: dict[int, dict] = {}
    running: list[tuple[int, Any]] = []
    while pending or running:
        while pending and len(running) < max(1, jobs):
            shard = pending.pop(0)
            running.append((shard.index, executor.submit(shard)))
        time.sleep(0.2)
        for index, job in [item for item in running if item[1].done()]:
            running.remove((index, job))
            records[index] = _result_of(job)
    return [records[s.index] for s in specs]


def _result_of(job: Any) -> dict:
    """A finished local job's record; a project error in it comes back as that error, on one line."""
    from submitit.core.utils import FailedJobError

    try:
        return job.result()
    except FailedJobError as error:
        exception = job.exception()
        raise SchedulerError(f"shard job {job.job_id} failed: {_last_error_line(str(exception or error))} "
                             f"(log: {job.paths.stderr})") from None


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":", 1)[0]:
            return line
    return lines[-1] if lines else "no message"
