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

from hpcvid.config import Config
from hpcvid.learn.checkpoints import check_compatible
from hpcvid.learn.datasets import TwoStreamDataset
from hpcvid.learn.kinds import DataBundle, EvalInputs, TrainInputs, cnn
from hpcvid.learn.models import TwoStreamModel, late_fusion
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


Scorer = TwoStreamScorer
