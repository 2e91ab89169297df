"""The ``flow`` kind: a CNN on a stack of optical-flow fields (:class:`hpcvid.learn.models.FlowModel`).

Training sees a random window of ``train.flow_stack`` camera-compensated fields, validation the centre one.
Evaluation strategies (``*`` = the default, what validation used): ``centre_stack``* (the centre stack) and
``mean_stacks`` (eval.flow_windows evenly spaced stacks, mean of softmax).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hpcvid.config import Config
from hpcvid.learn.datasets import FlowDataset
from hpcvid.learn.gradcam import Explanation, explanation, grad_cam, panels_of
from hpcvid.learn.kinds import DataBundle, EvalInputs, TrainInputs, cnn
from hpcvid.learn.models import FlowModel, cam_layer
from hpcvid.storage.manifest import VideoEntry

MODEL = FlowModel

steps_per_batch = cnn.steps_per_batch
train_step = cnn.train_step
validation_loss = cnn.validation_loss
init_args = cnn.flow_init_args


def build_data(config: Config, inputs: TrainInputs) -> DataBundle:
    return cnn.flow_bundle(config, inputs, FlowDataset)


class FlowScorer(cnn.VideoScorer):
    """Flow CNN on the centre stack (as validated) and averaged over several stacks."""

    default = "centre_stack"
    strategies = ["centre_stack", "mean_stacks"]

    def __init__(self, model: Any, meta: dict, run_config: Config, config: Config, device: Any,
                 inputs: EvalInputs) -> None:
        super().__init__(model, meta, inputs, device)
        self.stack = int(meta.get("flow_stack") or model.stack)
        self.compensation = meta.get("compensation", "median")
        self.windows = config.eval.flow_windows

    def score(self, video: VideoEntry) -> dict[str, np.ndarray]:
        item = self.item(video)
        centre, _ = FlowDataset(self.source, [item], stack=self.stack, train=False,
                                compensation=self.compensation)[0]
        _, stacks = cnn.flow_stacks(self.source, item, self.stack, self.compensation, self.windows)
        probs = cnn.softmax(self.model(torch.stack([centre, *stacks]).to(self.device)))
        return {"centre_stack": probs[0], "mean_stacks": probs[1:].mean(axis=0)}

    def explain(self, video: VideoEntry, target: int | None, frames: int) -> Explanation:
        """Heat maps of ``frames`` evenly spaced stacks, over the RGB frame in the middle of each."""
        item = self.item(video)
        starts, stacks = cnn.flow_stacks(self.source, item, self.stack, self.compensation, frames)
        x = torch.stack(stacks).to(self.device)
        result = grad_cam(self.model, [x], [cam_layer(self.model.trunk)], target, x.shape[-2:])
        middles = [min(item.frames - 1, s + self.stack // 2) for s in starts]
        return explanation(video, result, panels_of(self.pictures(item, middles), result.maps[0],
                                                    [f"flow {s}-{s + self.stack}" for s in starts]))


Scorer = FlowScorer
