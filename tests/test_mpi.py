"""hpcvid mpi: ranks take shards round robin, rank 0 gathers the records; the same files as the array path.
Real Open MPI (mpirun) and srun --mpi=pmix on the local SLURM."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_helpers import extract_job_file, slurm_cluster  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_round_robin_assignment_covers_every_shard_once():
    from hpcvid.cli.mpi import shards_for_rank
    from hpcvid.launch.sharding import all_shards

    specs = all_shards(5)
    parts = [shards_for_rank(specs, rank, 2) for rank in range(2)]
    assert [s.index for s in parts[0]] == [0, 2, 4] and [s.index for s in parts[1]] == [1, 3]
    assert shards_for_rank(specs, 3, 8) == [specs[3]] and shards_for_rank(specs, 6, 8) == []


def _outputs(work: Path) -> dict[str, object]:
    """Per shard: the videos and their content checksums, from the records (written last)."""
    return {p.name: sorted((v["id"], v["checksum"]) for v in json.loads(p.read_text())["videos"])
            for p in sorted((work / "extract").glob("shard-*.json"))}


@pytest.fixture(scope="module")
def array_path_output(tiny_synthetic, tmp_path_factory) -> dict:
    """The shards as the array path writes them (each shard its own process, run_shard)."""
    from hpcvid.cli import main

    tmp = tmp_path_factory.mktemp("array")
    work = tmp / "array"
    assert main(["run", "extract", "--config", str(extract_job_file(tmp, tiny_synthetic, work)), "--jobs", "2"]) == 0
    return _outputs(work)


def _mpirun() -> list[str]:
    if not shutil.which("mpirun"):
        pytest.skip("mpirun (Open MPI) is not installed: `make system` installs it (root + apt-get)")
    pytest.importorskip("mpi4py", reason="mpi4py is missing: pip install 'hpcvid[mpi]'")
    command = ["mpirun", "-n", "2"]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")
    return command


def _ranks_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "SLURM_"))
           or k == "SLURM_CONF"}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.mpi
@pytest.mark.slow
def test_mpirun_two_ranks_write_the_same_shards_as_the_array_path(array_path_output, tiny_synthetic, tmp_path):
    work = tmp_path / "mpi"
    command = _mpirun() + [sys.executable, "-m", "hpcvid.cli", "mpi", "extract",
                           "--config", str(extract_job_file(tmp_path, tiny_synthetic, work))]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=_ranks_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mpi: 3 shard(s) on 2 rank(s); 0 failed" in out.stdout
    assert out.stdout.count("extract: 3 of 3 shards done") == 1, "only rank 0 reports"
    hosts = {json.loads(p.read_text())["host"] for p in (work / "extract").glob("shard-*.json")}
    assert hosts and _outputs(work) == array_path_output
    # every shard done: a second run finds nothing to do
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=_ranks_env())
    assert again.returncode == 0 and "mpi: 0 shard(s) on 2 rank(s)" in again.stdout


@pytest.mark.mpi
@pytest.mark.slurm
@pytest.mark.slow
def test_srun_pmix_two_ranks_write_the_same_shards(slurm_cluster, array_path_output, tiny_synthetic, tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py is missing: pip install 'hpcvid[mpi]'")
    work = tmp_path / "srun"
    command = ["srun", "--mpi=pmix", "-N", "2", "-n", "2", "--time=5", sys.executable, "-m", "hpcvid.cli", "mpi",
               "extract", "--config", str(extract_job_file(tmp_path, tiny_synthetic, work))]
    out = subprocess.run(command, capture_output=True, text=True, timeout=360, cwd=ROOT, env=_ranks_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mpi: 3 shard(s) on 2 rank(s); 0 failed" in out.stdout
    assert _outputs(work) == array_path_output
