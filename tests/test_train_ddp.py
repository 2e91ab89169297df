"""Two real gloo processes and one process with the same global batch reach the same weights."""
import torch

import trainkit
from hpcvid.config import resolve_config
from hpcvid.train import load_checkpoint, spawn_local, train

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
