"""hpcvid.launch.distributed.detect on literal environments, and for real: srun -n 2 and submitit, gloo all_reduce."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcvid.launch.distributed import DistEnv, detect, port_for_job
from slurm_helpers import slurm_cluster, toy_stages  # noqa: F401 (fixtures)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_single_process_without_a_launcher():
    assert detect({}) == DistEnv() and not detect({}).is_distributed and detect({}).is_main


def test_torchrun_variables_win():
    env = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234",
                  "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == \
        (3, 8, 1, "h0", 1234, "torchrun")


def test_slurm_variables_give_the_first_node_and_a_port_from_the_job_id():
    env = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
                  "SLURM_JOB_NODELIST": "gpu[07-08],cpu1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (5, 8, 1, "gpu07", "slurm")
    assert env.master_port == port_for_job("4242") and 20000 <= env.master_port < 40000
    assert port_for_job("4242") != port_for_job("4243") and port_for_job("12_3") != port_for_job("12_4")


def test_open_mpi_variables():
    env = detect({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (1, 2, 1, "mpi") and env.is_distributed


def test_export_sets_what_env_init_reads(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "unset")  # so that monkeypatch restores the previous state afterwards
    DistEnv(1, 2, 0, "10.0.0.1", 23456).export()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]) == ("1", "2", "23456")


def _probe_results(text: str) -> list[dict]:
    return sorted((json.loads(line) for line in text.splitlines() if line.startswith("{")), key=lambda r: r["rank"])


@pytest.mark.slurm
@pytest.mark.slow
def test_srun_two_tasks_on_two_fake_nodes_all_reduce_with_gloo(slurm_cluster):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)])
    out = subprocess.run(["srun", "-N", "2", "-n", "2", "--time=2", sys.executable, str(TESTS / "dist_probe.py")],
                         capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    results = _probe_results(out.stdout)
    assert [r["rank"] for r in results] == [0, 1] and {r["world"] for r in results} == {2}
    assert {r["sum"] for r in results} == {3.0}, "the all_reduce did not combine both ranks"
    assert {r["source"] for r in results} == {"slurm"} and len({r["master"] for r in results}) == 1


@pytest.mark.slurm
@pytest.mark.slow
def test_submitit_job_uses_torch_distributed_environment(slurm_cluster, toy_stages, tmp_path, monkeypatch):
    import submitit

    for name in LAUNCHER_VARIABLES:  # sbatch exports this environment to the job
        monkeypatch.delenv(name, raising=False)

    import dist_probe

    executor = submitit.SlurmExecutor(folder=tmp_path / "%j")
    executor.update_parameters(nodes=1, ntasks_per_node=2, cpus_per_task=1, time=3, job_name="hpcvid-dist")
    job = executor.submit(dist_probe.probe)
    results = sorted(job.results(), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1] and {r["sum"] for r in results} == {3.0}
    assert {r["source"] for r in results} == {"submitit"}
    assert results[0]["master"].endswith(f":{port_for_job(job.job_id)}")
