"""What this cluster allows, asked once per submit: sbatch's options, and its array and job limits.

A site's profile may pass any sbatch option through (``launch.sbatch``). A misspelt one would be refused by
sbatch only after earlier stages of a pipeline were queued, or worse, for a job array half submitted, so
names are checked here first, against the options of the sbatch on this login node: those SLURM 22.05
documents (its man page lists more than ``sbatch --help`` does, e.g. ``--hint`` and ``--network``) plus
any that the local ``sbatch --help`` names (a newer SLURM's additions).

``MaxArraySize`` caps the tasks of one job array (indices 0 .. MaxArraySize-1; often 1001) and
``MaxJobCount`` the jobs slurmctld holds at once: ``scontrol show config`` tells both, and more shards than
one array may hold are queued as several arrays (:func:`split_into_arrays`).

The parsers take literal command output, so they are tested on text; the commands go through
:func:`hpcvid.launch.external.run_command`.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, TypeVar

from hpcvid.errors import CommandError, ConfigError, SchedulerError
from hpcvid.launch import external

T = TypeVar("T")

# Long options of sbatch, SLURM 22.05 (its man page, sbatch(1)); sbatch --help names only some of them.
SBATCH_OPTIONS = frozenset("""
account acctg-freq array batch bb bbf begin chdir cluster-constraint clusters comment constraint container
contiguous core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task deadline delay-boot dependency
distribution error exclude exclusive export export-file extra-node-info get-user-env gid gpu-bind gpu-freq gpus
gpus-per-node gpus-per-socket gpus-per-task gres gres-flags help hint hold ignore-pbs input job-name
kill-on-invalid-dep licenses mail-type mail-user mcs-label mem mem-bind mem-per-cpu mem-per-gpu mincpus network
nice no-kill no-requeue nodefile nodelist nodes ntasks ntasks-per-core ntasks-per-gpu ntasks-per-node
ntasks-per-socket open-mode output overcommit oversubscribe parsable partition power prefer priority profile
propagate qos quiet reboot requeue reservation signal sockets-per-node spread-job switches test-only thread-spec
threads-per-core time time-min tmp uid usage use-min-nodes verbose version wait wait-all-nodes wckey wrap
""".split())

# Options hpcvid sets itself (the key to use instead), or that would break a submission.
MANAGED = {
    "account": "launch.account", "partition": "launch.partition", "qos": "launch.qos", "gres": "launch.gres",
    "mem": "launch.mem", "time": "launch.walltime", "nodes": "launch.nodes", "cpus-per-task": "launch.cpus_per_task",
    "ntasks-per-node": "launch.tasks_per_node", "gpus-per-node": "launch.gpus_per_node",
    "signal": "launch.signal_delay_s", "requeue": "launch.max_requeues (jobs always requeue)",
    "no-requeue": "launch.max_requeues = 0", "array": "the shard count (extract.shards, eval.shards)",
    "dependency": "submit pipeline, which sets the dependencies", "job-name": "the unit of work (named by hpcvid)",
    "output": "WORK/jobs/logs (set by hpcvid)", "error": "WORK/jobs/logs (set by hpcvid)",
    "open-mode": "WORK/jobs/logs (set by hpcvid)", "wckey": "nothing: submitit sets it",
    "wrap": "nothing: hpcvid writes the job script", "parsable": "nothing: hpcvid reads sbatch's answer",
    "wait": "nothing: submit returns at once; watch with `hpcvid status --watch`", "help": "nothing", "usage": "nothing",
    "version": "nothing", "test-only": "`hpcvid submit ... --dry-run`",
}

_HELP_OPTION = re.compile(r"^\s+(?:-[A-Za-z],?\s+)?--([a-z][a-z0-9-]*)")
_CONFIG_LINE = re.compile(r"^\s*(\w+)\s*=\s*(.*?)\s*$")


@dataclass(frozen=True)
class ClusterLimits:
    """How many tasks one job array may hold, and how many jobs slurmctld keeps (SLURM's defaults)."""

    max_array_size: int = 1001
    max_job_count: int = 10000


def parse_scontrol_config(text: str) -> ClusterLimits:
    """``scontrol show config`` -> its MaxArraySize and MaxJobCount (SLURM's defaults where a line is missing)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        match = _CONFIG_LINE.match(line)
        if match:
            values[match.group(1)] = match.group(2)
    defaults = ClusterLimits()
    try:
        return ClusterLimits(int(values.get("MaxArraySize", defaults.max_array_size)),
                             int(values.get("MaxJobCount", defaults.max_job_count)))
    except ValueError as error:
        raise SchedulerError(f"unexpected `scontrol show config` output ({error}): MaxArraySize and MaxJobCount "
                             "must be whole numbers") from error


def parse_sbatch_help(text: str) -> frozenset[str]:
    """The long option names of ``sbatch --help`` output (``--mail-type=type`` -> ``mail-type``)."""
    return frozenset(m.group(1) for m in map(_HELP_OPTION.match, text.splitlines()) if m)


def option_name(name: str) -> str:
    """A profile's spelling of an option (``mail_type``, ``mail-type``, ``--mail-type``) as sbatch spells it."""
    return name.strip().lstrip("-").replace("_", "-").lower()


class Site:
    """The facts of this cluster that one submit needs, each asked at most once.

    ``offline`` (a --dry-run where SLURM's commands are missing) uses SLURM 22.05's options and SLURM's
    default limits instead of failing, and says so in :attr:`notes`.
    """

    def __init__(self, offline: bool = False) -> None:
        self.offline = offline
        self.notes: list[str] = []
        self._limits: ClusterLimits | None = None
        self._options: frozenset[str] | None = None

    @property
    def limits(self) -> ClusterLimits:
        if self._limits is None:
            try:
                self._limits = parse_scontrol_config(external.run_command(["scontrol", "show", "config"],
                                                                          timeout=60).stdout)
            except CommandError as error:
                if not self.offline:
                    raise SchedulerError(f"cannot read the cluster's limits ({error}); is this a login node? For "
                                         "the local test cluster run `sudo slurm/local-cluster.sh up`") from error
                self._limits = ClusterLimits()
                self.notes.append("scontrol cannot be run here: assumed SLURM's default limits "
                                  f"(MaxArraySize={self._limits.max_array_size})")
        return self._limits

    @property
    def sbatch_options(self) -> frozenset[str]:
        if self._options is None:
            try:
                local = parse_sbatch_help(external.run_command(["sbatch", "--help"], timeout=60).stdout)
            except CommandError:
                local = frozenset()
            self._options = SBATCH_OPTIONS | local
        return self._options


def check_sbatch_options(options: Mapping[str, Any], valid: frozenset[str], where: str = "launch.sbatch"
                         ) -> dict[str, Any]:
    """The pass-through options as submitit's ``additional_parameters``: sbatch's spelling, ``false`` left out.

    Raises ConfigError, on one line, for a name sbatch does not know (naming the close matches and every
    valid option) or one that hpcvid sets itself (naming the key to use instead).
    """
    checked: dict[str, Any] = {}
    for raw, value in options.items():
        name = option_name(raw)
        if name in MANAGED:
            raise ConfigError(f"{where}.{raw}: hpcvid sets --{name} itself; use {MANAGED[name]} instead")
        if name not in valid:
            passable = sorted(valid - set(MANAGED))
            close = difflib.get_close_matches(name, passable, n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ConfigError(f"{where}.{raw}: sbatch has no option --{name}; {hint}valid options: "
                              f"{', '.join(passable)}")
        if value is not False:
            checked[name] = value
    return checked


def split_into_arrays(items: Sequence[T], max_array_size: int) -> list[list[T]]:
    """Consecutive pieces of at most ``max_array_size`` items (one per job array; 1 = plain jobs)."""
    size = max(1, max_array_size)
    return [list(items[start:start + size]) for start in range(0, len(items), size)]


def check_job_count(jobs: int, limits: ClusterLimits, what: str) -> None:
    """Refuse, before anything is queued, more jobs than slurmctld may hold at once."""
    if jobs > limits.max_job_count:
        raise SchedulerError(f"{what}: {jobs} jobs exceed this cluster's MaxJobCount ({limits.max_job_count}, "
                             "`scontrol show config`): use fewer shards")


def shared_parallelism(array_parallelism: int, pieces: int) -> int:
    """Each of several arrays runs this many tasks at once, so that together they keep to the profile's cap."""
    return max(1, array_parallelism // max(1, pieces))
