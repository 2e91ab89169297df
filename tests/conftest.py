"""Shared fixtures: a tiny synthetic dataset (generated once per test session) and its indexed work folder.

Other stages' tests build on these; they are real files (mpeg4 .avi through ffmpeg, split files, the
motion ground truth, a real manifest), only small: 6 classes x 4 videos, 12 frames of 48x48.
"""
from __future__ import annotations

from pathlib import Path

import pytest

TINY_SYNTH = {"classes": 6, "per_class": 4, "test_per_class": 1, "frames": 12, "size": "48x48",
              "fps": 25.0, "seed": 0}


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a tiny synthetic dataset in UCF-101's layout (see hpcvid.stages.synth); do not modify it."""
    from hpcvid.config import SynthConfig
    from hpcvid.stages.synth import generate

    return generate(tmp_path_factory.mktemp("tiny_synthetic"), SynthConfig(**TINY_SYNTH))


@pytest.fixture(scope="session")
def tiny_work(tiny_synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work folder holding ``manifest.json`` and ``config.resolved.json`` for :func:`tiny_synthetic`.

    The resolved config has dataset.root = the tiny dataset, split 1, and synth = TINY_SYNTH; copy the
    folder (or use ``hpcvid.config.replace`` + your own work folder) before writing into it.
    """
    from hpcvid.config import resolve_config
    from hpcvid.stages.index import index_dataset

    work = tmp_path_factory.mktemp("tiny_work")
    overrides = {"work": str(work), "dataset.root": str(tiny_synthetic), "dataset.format": "ucf101",
                 "dataset.split": 1, **{f"synth.{k}": v for k, v in TINY_SYNTH.items()}}
    index_dataset(resolve_config(overrides=overrides))
    return work


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the duration of a test (the CI machine's 2 cores are shared by the suite)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PIPELINE_JOB = """\
work = "{work}"
[dataset]
root = "{data}"
format = "ucf101"
[extract]
shards = 3
size = 32
backbone = "resnet18"
flow = "farneback"
device = "cpu"
[train]
backbone = "small"
epochs = 1
batch_size = 6
device = "cpu"
flow_stack = 3
seq_len = 8
chunk = 4
hidden = 16
layers = 1
val_fraction = 0.2
[eval]
device = "cpu"
window_stride = 2
frame_samples = 4
"""


@pytest.fixture(scope="session")
def pipeline_work(tiny_synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A work folder the way a user makes one, with the CLI: an old 2-shard extraction, then the current
    3-shard one; `frame` trained (1 epoch), its features recomputed and merged, `lstm` trained on them.

    Returns (work folder, job file). Copy the folder before changing anything in it.
    """
    from hpcvid.cli import main

    root = tmp_path_factory.mktemp("pipeline")
    work, job = root / "work", root / "job.toml"
    job.write_text(PIPELINE_JOB.format(work=work, data=tiny_synthetic))
    steps = [["run", "extract", "--shards", "2"], ["run", "extract"], ["run", "train", "--model", "frame"],
             ["run", "features"], ["run", "merge", "--features-dir", str(work / "features" / "frame")],
             ["run", "train", "--model", "lstm"]]
    for step in steps:
        assert main([*step, "--config", str(job)]) == 0, step
    return work, job
