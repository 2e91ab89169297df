"""Two real gloo processes and one process with the same global batch reach the same weights."""
import torch

import trainkit
from hpcvid.config import resolve_config
from hpcvid.learn.checkpoints import load_checkpoint
from hpcvid.learn.trainer import spawn_local, train

torch.set_num_threads(1)


def _config(work, procs):
    return resolve_config(overrides={
        "work": str(work), "train.model": "lstm", "train.seq_len": 16, "train.chunk": 4, "train.hidden": 16,
        "train.layers": 2, "train.epochs": 2, "train.batch_size": 8, "train.dropout": 0.0, "train.lr": 0.01,
        "train.device": "cpu", "train.procs": procs, "train.schedule": "cyclic", "train.clip_grad": 1.0})


def test_two_gloo_processes_equal_one_process(tmp_path):
    single = _config(tmp_path / "one", 1)
    train(single, data_factory=trainkit.lstm_data)
    double = _config(tmp_path / "two", 2)
    spawn_local(double, 2, data_factory=trainkit.lstm_data)

    a = load_checkpoint(tmp_path / "one" / "runs" / "lstm" / "ckpt-e0002-s0000000.pt")
    b = load_checkpoint(tmp_path / "two" / "runs" / "lstm" / "ckpt-e0002-s0000000.pt")
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert a["global_step"] == b["global_step"] > 0
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], atol=1e-4), key
    first_a, first_b = a["history"][0], b["history"][0]
    assert first_a["train_samples"] == first_b["train_samples"] == 60
    assert abs(first_a["train_loss"] - first_b["train_loss"]) < 1e-4
    assert abs(first_a["val_loss"] - first_b["val_loss"]) < 1e-4


# --------------------------------------------------------------------------- real SLURM (local cluster)
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from hpcvid.config import replace  # noqa: E402
from hpcvid.launch.executors import Resources, make_executor  # noqa: E402
from hpcvid.learn.checkpoints import list_checkpoints  # noqa: E402
from hpcvid.stages.train import TrainJob  # noqa: E402
from slurm_helpers import slurm_cluster  # noqa: E402,F401 (fixture)

TESTS = Path(__file__).resolve().parent


def _on_slurm(config, work):
    return replace(config, work=str(work), **{"launch.executor": "slurm", "launch.partition": "debug",
                                              "launch.walltime": "00:05:00", "launch.cpus_per_task": 1})


@pytest.fixture
def importable_tests(monkeypatch):
    """Jobs on the nodes unpickle trainkit's data factories: put tests/ on their PYTHONPATH."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.slurm
@pytest.mark.slow
def test_trainjob_on_two_slurm_nodes_equals_one_process(tmp_path, slurm_cluster, importable_tests):
    train(_config(tmp_path / "one", 1), data_factory=trainkit.lstm_data)
    config = _on_slurm(_config(tmp_path / "slurm", 1), tmp_path / "slurm")
    executor = make_executor(tmp_path / "logs" / "%j", config.launch, Resources(nodes=2, tasks_per_node=1))
    job = executor.submit(TrainJob(config, data_factory=trainkit.lstm_data))
    assert [r["epochs"] for r in job.results()] == [2, 2]
    a = load_checkpoint(tmp_path / "one" / "runs" / "lstm" / "ckpt-e0002-s0000000.pt")
    b = load_checkpoint(tmp_path / "slurm" / "runs" / "lstm" / "ckpt-e0002-s0000000.pt")
    assert b["world_size"] == 2
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], atol=1e-4), key


@pytest.mark.slurm
@pytest.mark.slow
def test_pre_timeout_signal_on_slurm_checkpoints_requeues_and_resumes(tmp_path, slurm_cluster, importable_tests):
    reference = tmp_path / "reference"
    train(trainkit.resume_config(str(reference)), data_factory=trainkit.lstm_data)
    work = tmp_path / "slurm"
    config = replace(_on_slurm(trainkit.resume_config(str(work)), work), **{"train.keep_checkpoints": 20})
    executor = make_executor(tmp_path / "logs" / "%j", config.launch, Resources())
    job = executor.submit(TrainJob(config, data_factory=trainkit.slow_lstm_data))
    run = work / "runs" / "lstm"
    deadline = time.monotonic() + 180
    while not (work / trainkit.MID_EPOCH_2).exists():       # a few items into epoch 2
        assert time.monotonic() < deadline and not job.done(), "the job made no progress"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], check=True)
    assert job.result()["epochs"] == 3                     # requeued by submitit, resumed, finished
    names = [p.name for p in list_checkpoints(run)]
    assert any(not n.endswith("-s0000000.pt") for n in names), names     # the mid-epoch checkpoint
    final = load_checkpoint(run / "ckpt-e0003-s0000000.pt")
    expected = load_checkpoint(reference / "runs" / "lstm" / "ckpt-e0003-s0000000.pt")
    for key, value in expected["model"].items():
        assert torch.allclose(final["model"][key], value, atol=1e-6), key
