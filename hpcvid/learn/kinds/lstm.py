"""The ``lstm`` kind: a stacked LSTM over per-frame CNN features (:class:`hpcvid.learn.models.LSTMModel`).

Sequences of ``train.seq_len`` frames are trained by truncated BPTT (:mod:`hpcvid.learn.tbptt`): one
optimiser step per chunk of ``train.chunk`` steps, the loss weighted toward the end of the sequence
(``train.loss_weighting``); validation uses the same weighted loss and the last step's logits.

Features are standardised with the training videos' mean/std and centred in time
(:func:`hpcvid.learn.datasets.prepare_features`); the checkpoint keeps both, and the feature set and folder.

Evaluation strategies (``*`` = the default, :class:`SequenceScorer`, which the end-to-end ``cnnlstm`` shares):
``windows``* (windows of seq_len frames every eval.window_stride frames, last-step softmax averaged),
``last_step``, ``mean`` (mean softmax over time) and ``end_weighted`` (linearly end-weighted mean) on the
centre window, which validation used, and ``full_length`` (the whole video in one pass, last step).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from hpcvid.config import Config
from hpcvid.errors import VideoError
from hpcvid.learn.clips import covering_starts
from hpcvid.learn.datasets import (FeatureDataset, feature_input_dim, hold_out, ping_pong_indices, prepare_features,
                                   sequence_indices)
from hpcvid.learn.kinds import DataBundle, EvalInputs, StepTools, TrainInputs
from hpcvid.learn.models import LSTMModel
from hpcvid.learn.tbptt import loss_weights, train_sequence, weighted_sequence_loss
from hpcvid.storage.manifest import VideoEntry

MODEL = LSTMModel


def build_data(config: Config, inputs: TrainInputs) -> DataBundle:
    t = config.train
    source = inputs.source
    train_items, val_items = hold_out(inputs.items, t.val_fraction, t.seed)
    if source.mean is None:
        source.fit_statistics(train_items)      # the training videos' mean/std, never validation or test
    dim = int(np.asarray(source.mean).shape[0])

    def make(items: list[Any], train: bool) -> FeatureDataset:
        return FeatureDataset(source, items, seq_len=t.seq_len, train=train, seed=t.seed, centring=t.temporal_centering)

    meta = {"classes": inputs.classes, "feature_set": inputs.feature_set, "feature_dim": dim,
            "trained_on": inputs.trained_on, "centring": t.temporal_centering, "seq_len": t.seq_len,
            "feature_mean": np.asarray(source.mean, np.float64), "feature_std": np.asarray(source.std, np.float64),
            "val_ids": [it.id for it in val_items]}
    return DataBundle(make(train_items, True), make(val_items, False) if val_items else None, inputs.classes,
                      {"input_dim": feature_input_dim(dim, t.temporal_centering)}, meta)


def init_args(config: Config, bundle: DataBundle) -> dict[str, Any]:
    t = config.train
    return {"num_classes": len(bundle.classes), "input_dim": bundle.model_args["input_dim"], "hidden": t.hidden,
            "layers": t.layers, "dropout": t.dropout, "input_norm": t.input_norm,
            "mean_scale": t.mean_scale if t.temporal_centering else 1.0}


def steps_per_batch(config: Config) -> int:
    """One optimiser step per truncated-BPTT chunk."""
    return math.ceil(config.train.seq_len / config.train.chunk)


def _weights(config: Config, steps: int) -> torch.Tensor:
    return loss_weights(steps, config.train.loss_weighting)


def train_step(model: LSTMModel, inputs: list[torch.Tensor], labels: torch.Tensor, config: Config,
               tools: StepTools) -> tuple[float, float]:
    """Truncated BPTT over the batch's sequences; accuracy at the last step."""
    result = train_sequence(model, inputs[0], labels, chunk=config.train.chunk,
                            weights=_weights(config, config.train.seq_len), after_backward=tools.optimiser_step,
                            backward=tools.backward, autocast=tools.autocast)
    return result.loss, float((result.logits[:, -1].argmax(-1) == labels).sum())


def validation_loss(logits: torch.Tensor, labels: torch.Tensor, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The end-weighted sequence loss of ``(B, T, C)`` logits, and the last step's logits."""
    return weighted_sequence_loss(logits.float(), labels, _weights(config, logits.shape[1])), logits[:, -1]


class SequenceScorer:
    """The inference strategies of a model with per-step logits ``(B, T, C)`` over a sequence of ``seq_len``.

    ``windows``: windows of ``seq_len`` steps every ``stride`` steps (one, ping-pong padded, when the video
    is shorter), the last step's softmax averaged; on the centre window (what validation used):
    ``last_step``, ``mean`` (mean softmax over time) and ``end_weighted`` (linear weights, as the loss);
    ``full_length``: the whole video in one pass, last step. Subclasses say how a video's whole sequence is
    read (:meth:`sequence`) and how a window of it becomes the model's input (:meth:`prepared`).
    """

    default = "windows"
    strategies = ["windows", "last_step", "mean", "end_weighted", "full_length"]

    def __init__(self, model: Any, device: Any, seq_len: int, stride: int) -> None:
        self.model, self.device, self.seq_len, self.stride = model, device, int(seq_len), int(stride)

    def sequence(self, video: VideoEntry) -> tuple[int, Any]:
        """(steps, the video's whole sequence as stored: indexable by a list of steps)."""
        raise NotImplementedError

    def prepared(self, window: Any) -> torch.Tensor:
        """One window (or the whole sequence) as the model's input for one video, ``(T, ...)``."""
        raise NotImplementedError

    def score(self, video: VideoEntry) -> dict[str, np.ndarray]:
        steps, whole = self.sequence(video)
        if steps <= self.seq_len:
            windows = [whole[ping_pong_indices(steps, self.seq_len)]]
        else:
            windows = [whole[s:s + self.seq_len] for s in covering_starts(steps, self.seq_len, self.stride)]
        centre = whole[sequence_indices(steps, self.seq_len, None)]    # what validation used
        batch = torch.stack([self.prepared(w) for w in [centre, *windows]]).to(self.device)
        probs = self.model(batch).float().softmax(-1).cpu().numpy()           # (1 + W, L, C)
        weights = loss_weights(self.seq_len, "linear").numpy()[:, None]
        full = self.model(self.prepared(whole)[None].to(self.device)).float().softmax(-1).cpu().numpy()
        return {
            "windows": probs[1:, -1].mean(axis=0),
            "last_step": probs[0, -1],
            "mean": probs[0].mean(axis=0),
            "end_weighted": (probs[0] * weights).sum(axis=0),
            "full_length": full[0, -1],
        }


class LSTMScorer(SequenceScorer):
    """The LSTM over prepared feature windows (standardised with the run's statistics, centred in time)."""

    def __init__(self, model: Any, meta: dict, run_config: Config, config: Config, device: Any,
                 inputs: EvalInputs) -> None:
        super().__init__(model, device, int(meta["seq_len"]), config.eval.window_stride)
        self.source, self.items = inputs.source, inputs.videos
        self.source.mean, self.source.std = meta.get("feature_mean"), meta.get("feature_std")
        self.centring = bool(meta.get("centring", True))

    def sequence(self, video: VideoEntry) -> tuple[int, np.ndarray]:
        if video.id not in self.items:
            raise VideoError("has no features in the feature shards (extraction failed or has not run for it)")
        item = self.items[video.id]
        return item.frames, self.source.window(item.index, 0, item.frames)

    def prepared(self, window: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(prepare_features(window, self.source.mean, self.source.std, self.centring))


Scorer = LSTMScorer
