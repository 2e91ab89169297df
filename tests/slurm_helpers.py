"""Fixtures and helpers for tests that need the one-machine SLURM of slurm/local-cluster.sh.

``slurm_cluster`` (session) brings the cluster up when it is not (root + apt, as ``make test`` does), and
exports SLURM_CONF for the clients. Where it cannot come up (not root, no apt, no SLURM) the tests skip
and pytest -ra prints why; where it should come up (root) but does not, they FAIL: CI must run them.
``toy_stages`` registers the test-only stages of toystage.py for the jobs on the nodes too.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "local-cluster.sh"
TESTS = Path(__file__).resolve().parent
STATE = Path(os.environ.get("HPCVID_SLURM_STATE", "/var/tmp/hpcvid-slurm"))


def _cluster(verb: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), verb], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[str]:
    """The SLURM_CONF of a running local cluster (started here when it is not up)."""
    os.environ["SLURM_CONF"] = str(STATE / "etc" / "slurm.conf")
    started_here = False
    if _cluster("status", 60).returncode != 0:
        if os.geteuid() != 0 or not shutil.which("apt-get") and not shutil.which("slurmctld"):
            pytest.skip("the local SLURM cannot come up here: it needs root and apt-get (or Debian's SLURM "
                        "packages); run `sudo slurm/local-cluster.sh up`")
        started = _cluster("up")
        if started.returncode != 0:
            pytest.fail(f"slurm/local-cluster.sh up failed:\n{started.stdout}\n{started.stderr}")
        started_here = True
    yield os.environ["SLURM_CONF"]
    if started_here:  # leave the machine as we found it (make test does the same)
        _cluster("down", 120)


@pytest.fixture
def toy_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register toystage/toymerge in-process and make them importable by jobs on the nodes."""
    from hpcvid.stages import STAGES

    monkeypatch.syspath_prepend(str(TESTS))
    from toystage import TOY, TOYMERGE

    monkeypatch.setitem(STAGES, "toy", TOY)
    monkeypatch.setitem(STAGES, "toymerge", TOYMERGE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))


def hpcvid(*argv: str) -> int:
    """Run the CLI in this process (so test-registered stages are visible)."""
    from hpcvid.cli import main

    return main([str(a) for a in argv])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, every: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def job_states(job_ids) -> dict:
    from hpcvid.launch.scheduler import query_jobs

    return query_jobs(job_ids)


def wait_finished(job_ids, timeout: float = 120) -> dict:
    """Wait until SLURM reports every job finished; return their states."""
    result: dict = {}

    def finished() -> bool:
        nonlocal result
        result = job_states(job_ids)
        return all(j in result and result[j].finished for j in job_ids)

    wait_until(finished, timeout, f"jobs {job_ids} to finish", every=2)
    return result


def python() -> str:
    return sys.executable


def extract_job_file(folder: Path, dataset: Path, work: Path) -> Path:
    """A job file for a cheap 3-shard extraction (32 px, Farneback flow, no CNN) of ``dataset`` into ``work``."""
    job = folder / f"{work.name}.toml"
    job.write_text(f'work = "{work}"\n[dataset]\nroot = "{dataset}"\nformat = "ucf101"\n'
                   '[extract]\nshards = 3\nsize = 32\nbackbone = "none"\nflow = "farneback"\n')
    return job


@pytest.fixture
def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``sbatch`` first on PATH that keeps every script it is given (``N.sh``) and answers as sbatch does,
    with job ids from 100: submitit's own submission code runs, and no job is queued anywhere."""
    folder = tmp_path / "fake-sbatch"
    (folder / "bin").mkdir(parents=True)
    script = folder / "bin" / "sbatch"
    script.write_text(f"""#!/bin/bash
set -e
n=$(( $(cat "{folder}/last" 2>/dev/null || echo 99) + 1 ))
echo $n > "{folder}/last"
cp "$1" "{folder}/$n.sh"
echo "Submitted batch job $n"
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return folder
