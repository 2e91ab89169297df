"""TensorBoard event files of a training run, read back with the tensorboard package's own reader."""
from __future__ import annotations

import sys

import pytest
import torch

import trainkit
from hpcvid.config import resolve_config
from hpcvid.learn.checkpoints import read_metrics
from hpcvid.learn.trainer import train

torch.set_num_threads(1)


def _config(work, epochs: int, tensorboard: bool = True):
    return resolve_config(overrides={
        "work": str(work), "train.model": "lstm", "train.seq_len": 16, "train.chunk": 8, "train.hidden": 16,
        "train.layers": 1, "train.epochs": epochs, "train.batch_size": 16, "train.device": "cpu",
        "train.tensorboard": tensorboard})


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_event_files_hold_every_epoch_once_across_a_resume(tmp_path):
    """A run killed after writing epoch 2's events but before its checkpoint resumes from epoch 1: the events
    past the checkpoint are purged, so every epoch shows once, with the values of metrics.jsonl."""
    pytest.importorskip("tensorboard")
    from hpcvid.tensorboard_log import SCALARS

    train(_config(tmp_path, epochs=2), data_factory=trainkit.lstm_data)
    run = tmp_path / "runs" / "lstm"
    (run / "ckpt-e0002-s0000000.pt").unlink()                              # as if killed before it was written
    train(_config(tmp_path, epochs=3), data_factory=trainkit.lstm_data)    # resumes at epoch 1, trains 2 and 3
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    scalars = _scalars(run)
    assert sorted(scalars) == sorted(SCALARS.values())
    history = read_metrics(run)
    for key, tag in SCALARS.items():
        assert [step for step, _ in scalars[tag]] == [1, 2, 3], tag
        assert [value for _, value in scalars[tag]] == pytest.approx([h[key] for h in history], rel=1e-6), tag


def test_no_event_files_unless_asked(tmp_path):
    train(_config(tmp_path, epochs=1, tensorboard=False), data_factory=trainkit.lstm_data)
    assert not list((tmp_path / "runs" / "lstm").glob("events.out.tfevents.*"))


def test_asked_for_without_the_package_is_one_line_before_anything_is_queued(tmp_path, monkeypatch, capsys):
    from hpcvid.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)     # `import tensorboard` now fails, as where not installed
    assert main(["submit", "train", "--work", str(tmp_path), "--executor", "slurm", "--dry-run", "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.tensorboard = true needs the tensorboard package" in err
    assert "pip install 'hpcvid[tensorboard]'" in err and not (tmp_path / "jobs").exists()
