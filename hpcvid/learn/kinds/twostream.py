"""The ``twostream`` kind: RGB and flow CNNs joined by mid-level fusion (:class:`hpcvid.learn.models.TwoStreamModel`).

Each sample is a flow stack and the RGB frame in its middle, cropped and flipped together. With
``train.init_from_runs`` the two streams start from the trained ``frame`` and ``flow`` runs of the work
folder (:func:`warm_start`). Evaluation strategies (``*`` = the default, what validation used):
``midfusion``* (the model's 1x1-conv fusion), ``late_1:1`` and ``late_1:<w>`` (weighted softmax average of
the two streams' own heads, weights from train.fusion_weights), ``rgb_stream``, ``flow_stream``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import torch
from torch.nn import functional as F

from hpcvid.config import Config
from hpcvid.learn.checkpoints import check_compatible
from hpcvid.learn.datasets import TwoStreamDataset, prepare_frames
from hpcvid.learn.gradcam import Explanation, explanation, grad_cam, panels_of
from hpcvid.learn.kinds import DataBundle, EvalInputs, TrainInputs, cnn
from hpcvid.learn.models import TwoStreamModel, cam_layer, late_fusion
from hpcvid.storage.manifest import VideoEntry

log = logging.getLogger(__name__)

MODEL = TwoStreamModel

steps_per_batch = cnn.steps_per_batch
train_step = cnn.train_step
validation_loss = cnn.validation_loss
init_args = cnn.flow_init_args


def build_data(config: Config, inputs: TrainInputs) -> DataBundle:
    return cnn.flow_bundle(config, inputs, TwoStreamDataset)


def warm_start(model: TwoStreamModel, found: Mapping[str, tuple[Path, dict[str, Any]]]) -> None:
    """Copy trained ``frame`` and ``flow`` runs into the streams (a stream without one starts from scratch)."""
    states = {}
    for kind, stream in (("frame", model.rgb), ("flow", model.flow)):
        if kind not in found:
            continue
        path, payload = found[kind]
        # dropout and a frozen trunk change training, not the weights, so they may differ
        check_compatible(payload, path, kind, {k: v for k, v in stream.init_args.items()
                                               if k not in ("dropout", "freeze_trunk")})
        states[kind] = payload["model"]
        log.info("twostream: %s stream from %s", kind, path)
    model.init_from(states.get("frame"), states.get("flow"))


class TwoStreamScorer(cnn.VideoScorer):
    """Mid-level fusion beside late fusion of the two streams' own heads (1:1 and the configured weights)."""

    default = "midfusion"

    def __init__(self, model: Any, meta: dict, run_config: Config, config: Config, device: Any,
                 inputs: EvalInputs) -> None:
        super().__init__(model, meta, inputs, device)
        self.stack = int(meta.get("flow_stack") or model.flow.stack)
        self.compensation = meta.get("compensation", "median")
        weights = tuple(run_config.train.fusion_weights)[:2]
        self.fusions = {"late_1:1": (1.0, 1.0)}
        if len(weights) == 2 and weights[0] > 0:
            ratio = weights[1] / weights[0]
            self.fusions[f"late_1:{ratio:g}"] = (1.0, ratio)
        self.strategies = ["midfusion", *self.fusions, "rgb_stream", "flow_stream"]

    def score(self, video: VideoEntry) -> dict[str, np.ndarray]:
        item = self.item(video)
        image, stack, _ = TwoStreamDataset(self.source, [item], stack=self.stack, train=False,
                                           compensation=self.compensation)[0]
        image, stack = image[None].to(self.device), stack[None].to(self.device)
        rgb_logits, flow_logits = self.model.rgb(image), self.model.flow(stack)
        result = {"midfusion": cnn.softmax(self.model(image, stack))[0],
                  "rgb_stream": cnn.softmax(rgb_logits)[0], "flow_stream": cnn.softmax(flow_logits)[0]}
        for name, weights in self.fusions.items():
            result[name] = late_fusion(rgb_logits, flow_logits, weights).float().cpu().numpy()[0]
        return result

    def explain(self, video: VideoEntry, target: int | None, frames: int) -> Explanation:
        """Both streams' heat maps of the fused class for ``frames`` evenly spaced (frame, stack) pairs."""
        item = self.item(video)
        starts, stacks = cnn.flow_stacks(self.source, item, self.stack, self.compensation, frames)
        flow = torch.stack(stacks).to(self.device)
        middles = [min(item.frames - 1, s + self.stack // 2) for s in starts]
        pictures = self.pictures(item, middles)
        rgb = prepare_frames(pictures).to(self.device)
        if rgb.shape[-2:] != flow.shape[-2:]:        # as the dataset: the frame brought to the flow's size
            rgb = F.interpolate(rgb, size=tuple(flow.shape[-2:]), mode="bilinear", align_corners=False)
        layers = [cam_layer(self.model.rgb.trunk), cam_layer(self.model.flow.trunk)]
        result = grad_cam(self.model, [rgb, flow], layers, target, flow.shape[-2:])
        panels = panels_of(pictures, result.maps[0], [f"RGB stream, frame {m}" for m in middles])
        panels += panels_of(pictures, result.maps[1], [f"flow stream, flow {s}-{s + self.stack}" for s in starts])
        return explanation(video, result, panels)


Scorer = TwoStreamScorer
