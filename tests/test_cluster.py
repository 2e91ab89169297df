"""What the cluster allows, on literal command output: sbatch's options, MaxArraySize and MaxJobCount."""
from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# `scontrol show config` of SLURM 22.05 (an excerpt, as it prints it)
SCONTROL_CONFIG = """\
Configuration data as of 2026-12-01T20:46:20
AccountingStorageHost   = localhost
MaxArraySize            = 4
MaxDBDMsgs              = 20008
MaxJobCount             = 9
MaxJobId                = 67043328
MaxMemPerNode           = UNLIMITED
"""

# `sbatch --help` of SLURM 22.05 (an excerpt), and an option a newer sbatch adds
SBATCH_HELP = """\
Usage: sbatch [OPTIONS(0)...] [ : [OPTIONS(N)...]] script(0) [args(0)...]

Parallel run options:
  -a, --array=indexes         job array index values
      --bb=<spec>             burst buffer specifications
  -C, --constraint=list       specify a list of constraints
      --mail-type=type        notify on state change: BEGIN, END, FAIL or ALL
      --mem=MB                minimum amount of real memory
                              --mem >= --mem-per-cpu if --mem is specified.
  -B  --extra-node-info=S[:C[:T]]  combine request of sockets per node,
      --exclusive[=user]      allocate nodes in exclusive mode when
      --tres-per-task=list    a newer SLURM's option
"""


def test_scontrol_config_gives_the_array_and_job_limits():
    from hpcvid.launch.cluster import ClusterLimits, parse_scontrol_config

    assert parse_scontrol_config(SCONTROL_CONFIG) == ClusterLimits(max_array_size=4, max_job_count=9)
    assert parse_scontrol_config("Configuration data as of now\n") == ClusterLimits(1001, 10000), "SLURM's defaults"


def test_sbatch_help_gives_the_long_option_names_only():
    from hpcvid.launch.cluster import parse_sbatch_help

    assert parse_sbatch_help(SBATCH_HELP) == {"array", "bb", "constraint", "mail-type", "mem", "extra-node-info",
                                              "exclusive", "tres-per-task"}


@pytest.mark.skipif(not Path("/usr/share/man/man1/sbatch.1.gz").is_file(), reason="no sbatch man page here")
def test_the_literal_option_list_is_the_man_page_s():
    """The list in the code is what sbatch(1) documents (it names options that --help leaves out)."""
    from hpcvid.launch.cluster import SBATCH_OPTIONS

    text = gzip.decompress(Path("/usr/share/man/man1/sbatch.1.gz").read_bytes()).decode().replace("\\-", "-")
    documented = {m.group(1) for line in text.splitlines() if line.startswith("\\fB-")
                  for m in re.finditer(r"--([a-z][a-z0-9-]*)", line)}
    version = subprocess.run(["sbatch", "--version"], capture_output=True, text=True).stdout
    if "22.05" not in version:
        pytest.skip(f"the list is SLURM 22.05's; this is {version.strip()}")
    assert SBATCH_OPTIONS == documented


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="no sbatch here")
def test_every_option_the_local_sbatch_names_is_accepted():
    from hpcvid.launch.cluster import Site, parse_sbatch_help

    help_text = subprocess.run(["sbatch", "--help"], capture_output=True, text=True).stdout
    assert parse_sbatch_help(help_text) <= Site().sbatch_options


def test_a_misspelt_option_is_one_line_naming_the_valid_choices():
    from hpcvid.errors import ConfigError
    from hpcvid.launch.cluster import SBATCH_OPTIONS, check_sbatch_options

    with pytest.raises(ConfigError) as error:
        check_sbatch_options({"constrant": "a100"}, SBATCH_OPTIONS)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("launch.sbatch.constrant: sbatch has no option --constrant; did you mean constraint")
    assert "valid options: " in message and "reservation" in message and "mail-type" in message
    assert "partition" not in message.split("valid options: ")[1], "options hpcvid sets are not offered"
    with pytest.raises(ConfigError, match=r"--tme; did you mean tmp\? valid"):   # not time: hpcvid sets it
        check_sbatch_options({"tme": "1"}, SBATCH_OPTIONS)


def test_options_hpcvid_sets_itself_name_the_key_to_use():
    from hpcvid.errors import ConfigError
    from hpcvid.launch.cluster import SBATCH_OPTIONS, check_sbatch_options

    with pytest.raises(ConfigError, match=r"launch.sbatch.time: hpcvid sets --time itself; use launch.walltime"):
        check_sbatch_options({"time": "10"}, SBATCH_OPTIONS)
    with pytest.raises(ConfigError, match=r"--array itself; use the shard count"):
        check_sbatch_options({"array": "0-3"}, SBATCH_OPTIONS, "launch.sbatch")


def test_spellings_are_normalised_and_false_is_left_out():
    from hpcvid.launch.cluster import SBATCH_OPTIONS, check_sbatch_options

    assert check_sbatch_options({"mail_type": "END", "--reservation": "r1", "exclusive": True, "hold": False},
                                SBATCH_OPTIONS) == {"mail-type": "END", "reservation": "r1", "exclusive": True}


def test_a_newer_sbatch_s_options_come_from_its_help(monkeypatch):
    from hpcvid.launch import external
    from hpcvid.launch.cluster import Site

    calls = []

    def fake(argv, **kwargs):
        calls.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, SBATCH_HELP if argv[0] == "sbatch" else SCONTROL_CONFIG, "")

    monkeypatch.setattr(external, "run_command", fake)
    site = Site()
    assert "tres-per-task" in site.sbatch_options and "hint" in site.sbatch_options
    assert site.limits.max_array_size == 4 and site.limits.max_array_size == 4 and "tres-per-task" in site.sbatch_options
    assert calls == [["sbatch", "--help"], ["scontrol", "show", "config"]], "each asked once per submit"


def test_without_slurm_a_dry_run_assumes_slurm_s_defaults_and_says_so(monkeypatch):
    from hpcvid.errors import CommandError, SchedulerError
    from hpcvid.launch import external
    from hpcvid.launch.cluster import SBATCH_OPTIONS, Site

    def missing(argv, **kwargs):
        raise CommandError(list(argv), 127, stderr=f"{argv[0]}: not found on PATH")

    monkeypatch.setattr(external, "run_command", missing)
    offline = Site(offline=True)
    assert offline.limits.max_array_size == 1001 and offline.sbatch_options == SBATCH_OPTIONS
    assert "default limits" in offline.notes[0]
    with pytest.raises(SchedulerError, match="cannot read the cluster's limits"):
        Site().limits


def test_arrays_are_split_at_the_limit_and_share_the_parallelism():
    from hpcvid.errors import SchedulerError
    from hpcvid.launch.cluster import ClusterLimits, check_job_count, shared_parallelism, split_into_arrays

    assert split_into_arrays(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_into_arrays(list(range(3)), 1001) == [[0, 1, 2]]
    assert split_into_arrays(list(range(2)), 0) == [[0], [1]], "MaxArraySize 0: no arrays, one job per shard"
    assert shared_parallelism(32, 3) == 10 and shared_parallelism(2, 3) == 1
    check_job_count(9, ClusterLimits(4, 9), "x")
    with pytest.raises(SchedulerError, match=r"x: 10 jobs exceed this cluster's MaxJobCount \(9"):
        check_job_count(10, ClusterLimits(4, 9), "x")
