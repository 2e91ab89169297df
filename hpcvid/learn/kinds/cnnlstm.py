"""The ``cnnlstm`` kind: a CNN on every frame and an LSTM over them, trained end to end
(:class:`hpcvid.learn.models.CNNLSTMModel`).

Unlike ``lstm``, which reads features saved by another network, this model reads ``train.clip_frames``
consecutive stored frames per video (a random window in training, the centre one in validation, played
backwards and forwards when the video is shorter; one ``Augment`` box for all of them:
:class:`hpcvid.learn.clips.FrameSequenceDataset`) and the gradient of the sequence loss trains the CNN
too. The trunk is ``train.backbone`` (``small``, or a torchvision network from ``train.weights``); the LSTM
takes ``hidden``, ``layers``, ``dropout``, ``temporal_centering`` and ``mean_scale`` as the feature LSTM
does. One optimiser step per batch over the whole sequence (the clip mean of temporal centring needs
every frame), the loss weighted toward the end (``train.loss_weighting``), as the feature LSTM's.

Evaluation: the feature LSTM's strategies (:class:`hpcvid.learn.kinds.lstm.SequenceScorer`), with windows
of ``clip_frames`` frames every eval.window_stride frames.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from hpcvid.config import Config
from hpcvid.learn.clips import FrameSequenceDataset
from hpcvid.learn.datasets import prepare_frames, sequence_indices
from hpcvid.learn.gradcam import Explanation, explanation, grad_cam, panels_of
from hpcvid.learn.kinds import DataBundle, EvalInputs, StepTools, TrainInputs, cnn, lstm
from hpcvid.learn.models import CNNLSTMModel, cam_layer
from hpcvid.media.decode import count_indices
from hpcvid.storage.manifest import VideoEntry

MODEL = CNNLSTMModel

steps_per_batch = cnn.steps_per_batch
validation_loss = lstm.validation_loss


def build_data(config: Config, inputs: TrainInputs) -> DataBundle:
    t = config.train
    bundle = cnn.video_bundle(config, inputs, functools.partial(FrameSequenceDataset, length=t.clip_frames), {})
    bundle.meta.update(seq_len=t.clip_frames)
    return bundle


def init_args(config: Config, bundle: DataBundle) -> dict[str, Any]:
    t = config.train
    return {"num_classes": len(bundle.classes), "backbone": t.backbone, "weights": t.weights, "hidden": t.hidden,
            "layers": t.layers, "dropout": t.dropout, "centring": t.temporal_centering,
            "mean_scale": t.mean_scale if t.temporal_centering else 1.0}


def train_step(model: CNNLSTMModel, inputs: list[torch.Tensor], labels: torch.Tensor, config: Config,
               tools: StepTools) -> tuple[float, float]:
    """The whole sequence forward, the end-weighted loss, one optimiser step; accuracy at the last step."""
    with tools.autocast():
        logits = model(*inputs)
    loss, last = validation_loss(logits, labels, config)
    tools.backward(loss)
    tools.optimiser_step()
    return float(loss.detach()), float((last.detach().argmax(-1) == labels).sum())


class CNNLSTMScorer(lstm.SequenceScorer, cnn.VideoScorer):
    """The feature LSTM's strategies over windows of stored frames."""

    def __init__(self, model: CNNLSTMModel, meta: dict, run_config: Config, config: Config, device: Any,
                 inputs: EvalInputs) -> None:
        cnn.VideoScorer.__init__(self, model, meta, inputs, device)
        lstm.SequenceScorer.__init__(self, model, device, int(meta["seq_len"]), config.eval.window_stride)

    def sequence(self, video: VideoEntry) -> tuple[int, np.ndarray]:
        item = self.item(video)
        return item.frames, self.source.frames(item.id, range(item.frames))

    def prepared(self, window: np.ndarray) -> torch.Tensor:
        return prepare_frames(window)

    def explain(self, video: VideoEntry, target: int | None, frames: int) -> Explanation:
        """Heat maps of the centre window's frames for the last step's class; ``frames`` of them shown."""
        item = self.item(video)
        indices = sequence_indices(item.frames, self.seq_len)
        images = self.source.frames(item.id, indices)
        x = prepare_frames(images).to(self.device)
        with torch.backends.cudnn.flags(enabled=False):      # cuDNN's LSTM has no backward in eval mode
            result = grad_cam(lambda v: self.model(v[None])[:, -1], [x], [cam_layer(self.model.trunk)], target,
                              x.shape[-2:])
        shown = [int(k) for k in count_indices(len(indices), frames)]
        return explanation(video, result, panels_of(images[shown], result.maps[0][shown],
                                                    [f"frame {indices[k]}" for k in shown]))


Scorer = CNNLSTMScorer
