"""A run killed mid-epoch (SIGKILL) or stopped by the pre-timeout signal, then resumed, ends with exactly the
weights of an uninterrupted run (CPU)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import trainkit
from hpcvid.learn.checkpoints import list_checkpoints, load_checkpoint, read_metrics
from hpcvid.learn.trainer import train

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("reference")
    train(trainkit.resume_config(str(work)), data_factory=trainkit.lstm_data)
    return load_checkpoint(list_checkpoints(work / "runs" / "lstm")[-1])


def _start(work: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    code = f"import trainkit; trainkit.main([{str(work)!r}])"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("trainer made no progress")
        time.sleep(0.02)


def _assert_same_weights(resumed: dict, reference: dict) -> None:
    assert resumed["epoch"] == reference["epoch"] == 3
    assert resumed["global_step"] == reference["global_step"]
    for key, value in reference["model"].items():
        assert torch.allclose(resumed["model"][key], value, atol=1e-6), key


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, reference):
    run = tmp_path / "runs" / "lstm"
    process = _start(tmp_path)
    _wait_for((tmp_path / trainkit.MID_EPOCH_2).exists, process)          # a few items into epoch 2
    process.send_signal(signal.SIGKILL)
    process.wait()
    newest = list_checkpoints(run)[-1]
    assert newest.name.startswith(("ckpt-e0001", "ckpt-e0002")), newest   # killed before the end

    result = train(trainkit.resume_config(str(tmp_path)), data_factory=trainkit.lstm_data)
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert not list(run.glob(".*.partial"))
    _assert_same_weights(load_checkpoint(list_checkpoints(run)[-1]), reference)
    assert [h["epoch"] for h in read_metrics(run)] == [1, 2, 3]


def test_pre_timeout_signal_checkpoints_mid_epoch_and_resumes_exactly(tmp_path, reference):
    run = tmp_path / "runs" / "lstm"
    process = _start(tmp_path)
    _wait_for((tmp_path / trainkit.MID_EPOCH_2).exists, process)          # a few items into epoch 2
    process.send_signal(signal.SIGUSR2)
    assert process.wait(timeout=120) == 7             # the handler ran (after the step finished) and exited
    middle = [p for p in list_checkpoints(run) if not p.name.endswith("-s0000000.pt")]
    assert middle, [p.name for p in list_checkpoints(run)]     # a mid-epoch checkpoint was written
    payload = load_checkpoint(middle[-1])
    assert payload["step"] > 0 and payload["epoch"] in (1, 2)

    train(trainkit.resume_config(str(tmp_path)), data_factory=trainkit.lstm_data)
    _assert_same_weights(load_checkpoint(list_checkpoints(run)[-1]), reference)
