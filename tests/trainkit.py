"""Small in-memory data for the trainer tests (importable by spawned ranks and killed subprocesses).

The feature task imitates what the synthetic videos give an LSTM: each clip has a large random static
offset (appearance, background) and a small temporal pattern that decides the class (motion), so only a
model that sees change over time gets above chance.
"""
from __future__ import annotations

import time

import numpy as np

from hpcvid.config import Config
from hpcvid.learn.datasets import (FeatureDataset, FeatureItem, MemoryFeatureSource, MemoryVideoSource, VideoItem,
                                   feature_input_dim, hold_out)
from hpcvid.learn.kinds import DataBundle, TrainInputs, get_kind

CLASSES = ["rise", "fall", "wave"]


def feature_clips(n_per_class: int = 24, frames: int = 16, dim: int = 4, seed: int = 123):
    rng = np.random.default_rng(seed)
    arrays, labels = [], []
    t = np.linspace(0.0, 1.0, frames)[:, None]
    patterns = [t, 1.0 - t, np.sin(2 * np.pi * t)]
    for label, pattern in enumerate(patterns):
        for _ in range(n_per_class):
            offset = rng.normal(scale=1.0, size=(1, dim))
            direction = np.zeros((1, dim))
            direction[0, :2] = 1.0
            arrays.append((offset + 3.0 * pattern * direction + rng.normal(scale=0.1, size=(frames, dim))).astype(np.float32))
            labels.append(label)
    return arrays, labels


MID_EPOCH_2 = "mid-epoch-2"
"""The file (in the run's work folder) a slow run creates once it is a few items into its second epoch."""


class SlowFeatureDataset(FeatureDataset):
    """Sleeps a little per item, so that a run's epoch lasts long enough for a test to act in its middle; with
    ``marker``, creates that file after its 6th item of the second epoch. Loaded in the training process
    (``train.workers = 0``: nothing is read ahead), so the run is then in its second epoch, most of it to go:
    a test waits for the file, never for a guessed time."""

    marker = None

    def __getitem__(self, index):
        time.sleep(0.01)
        if self.marker is not None and self.epoch == 1:
            self.loaded_in_epoch_2 = getattr(self, "loaded_in_epoch_2", 0) + 1
            if self.loaded_in_epoch_2 == 6:
                self.marker.touch()
        return super().__getitem__(index)


def lstm_data(config: Config, slow: bool = False) -> DataBundle:
    arrays, labels = feature_clips()
    items = [FeatureItem(i, f"clip{i:03d}", label, len(arrays[i])) for i, label in enumerate(labels)]
    train_items, val_items = hold_out(items, config.train.val_fraction, config.train.seed)
    source = MemoryFeatureSource(arrays)
    source.mean = np.concatenate([arrays[it.index] for it in train_items]).mean(0)
    source.std = np.concatenate([arrays[it.index] for it in train_items]).std(0)
    t = config.train
    cls = SlowFeatureDataset if slow else FeatureDataset
    make = lambda its, train: cls(source, its, seq_len=t.seq_len, train=train, seed=t.seed,  # noqa: E731
                                  centring=t.temporal_centering)
    meta = {"classes": CLASSES, "centring": t.temporal_centering, "feature_mean": source.mean,
            "feature_std": source.std, "seq_len": t.seq_len}
    return DataBundle(make(train_items, True), make(val_items, False) if val_items else None, CLASSES,
                      {"input_dim": feature_input_dim(arrays[0].shape[1], t.temporal_centering)}, meta)


def slow_lstm_data(config: Config) -> DataBundle:
    bundle = lstm_data(config, slow=True)
    bundle.train.marker = config.work_dir / MID_EPOCH_2
    return bundle


def video_clips(n_per_class: int = 6, frames: int = 6, size: int = 32, seed: int = 5):
    """Videos whose class is the colour of a square that moves right: frames and flow for each."""
    rng = np.random.default_rng(seed)
    frames_, flow, items = {}, {}, []
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for label, colour in enumerate(colours):
        for k in range(n_per_class):
            vid = f"c{label}/v{k}"
            video = rng.integers(0, 40, (frames, size, size, 3), dtype=np.uint8)
            top, left = rng.integers(4, size - 12, 2)
            for f in range(frames):
                video[f, top:top + 8, left + f:left + f + 8] = colour
            frames_[vid] = video
            field = np.zeros((frames - 1, size, size, 2), np.float32)
            field[:, top:top + 8, left:left + 8, 0] = 1.0 + label     # speed differs per class too
            flow[vid] = field
            items.append(VideoItem(vid, label, frames))
    return MemoryVideoSource(frames_, flow), items


def video_data(config: Config) -> DataBundle:
    """The configured kind's bundle over :func:`video_clips` (what the train stage does with real shards)."""
    source, items = video_clips()
    return get_kind(config.train.model).implementation().build_data(config, TrainInputs(source, items, CLASSES))


def resume_config(work: str, epochs: int = 3) -> Config:
    from hpcvid.config import resolve_config

    return resolve_config(overrides={
        "work": work, "train.model": "lstm", "train.seq_len": 16, "train.chunk": 4, "train.hidden": 16,
        "train.layers": 2, "train.epochs": epochs, "train.batch_size": 6, "train.dropout": 0.3, "train.lr": 0.01,
        "train.device": "cpu", "train.schedule": "cyclic", "train.cycle_epochs": 1.0,
        "train.workers": 0})      # items read as the run goes, so SlowFeatureDataset's marker says where it is


def main(argv: list[str]) -> None:
    """``python -c 'import trainkit; trainkit.main([WORK])'``: a slow run for the kill/resume tests.

    Like submitit, it installs a SIGUSR2 handler that calls ``TrainJob.checkpoint`` and exits; the
    TrainJob defers it to the end of the current optimiser step.
    """
    import signal
    import sys

    import torch

    from hpcvid.stages.train import TrainJob

    torch.set_num_threads(1)
    job = TrainJob(resume_config(argv[0]), data_factory=slow_lstm_data)

    def submitit_like_handler(signum, frame):
        job.checkpoint()
        sys.exit(7)

    signal.signal(signal.SIGUSR2, submitit_like_handler)
    job()
