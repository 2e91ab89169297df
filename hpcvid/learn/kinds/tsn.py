"""The temporal segment network kinds ``tsn_rgb``, ``tsn_flow`` and ``tsn_diff`` (:class:`hpcvid.learn.models.TSNModel`).

One module serves the three modalities; the kind's name says which (:data:`MODALITIES`). A video is cut
into ``train.tsn_segments`` segments and one snippet is sampled from each (:class:`hpcvid.learn.clips.
SegmentDataset`): one RGB frame, ``train.tsn_stack`` camera-compensated flow fields, or the differences of
``tsn_stack`` + 1 consecutive frames. The trunk classifies each snippet and the segments' logits are averaged
(the consensus). Training uses corner cropping with scale and aspect jittering (``train.scale_jitter``: the
crop's height and width drawn from those fractions of the short side, at the centre or a corner, resized
back), the same box for every segment of a video, and partial BatchNorm (``train.partial_bn``).

Evaluation strategies (``*`` = the default, what validation used): ``segments``* (the centre snippet of
each of the K segments) and ``dense`` (eval.tsn_snippets evenly spaced snippets, TSN's test protocol, their
logits averaged). The modalities are fused by the reducer (``report.fusion``, ``hpcvid collect --fuse``).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from hpcvid.config import Config
from hpcvid.learn.clips import SegmentDataset, snippet_extent
from hpcvid.learn.gradcam import Explanation, explanation, grad_cam, panels_of
from hpcvid.learn.kinds import DataBundle, EvalInputs, TrainInputs, cnn
from hpcvid.learn.models import TSNModel, cam_layer
from hpcvid.storage.manifest import VideoEntry

MODEL = TSNModel
MODALITIES = {"tsn_rgb": "rgb", "tsn_flow": "flow", "tsn_diff": "diff"}

steps_per_batch = cnn.steps_per_batch
train_step = cnn.train_step
validation_loss = cnn.validation_loss


def build_data(config: Config, inputs: TrainInputs) -> DataBundle:
    t = config.train
    modality = MODALITIES[t.model]
    dataset = functools.partial(SegmentDataset, modality=modality, segments=t.tsn_segments, stack=t.tsn_stack,
                                compensation=t.flow_camera_compensation)
    bundle = cnn.video_bundle(config, inputs, dataset, {})
    bundle.meta.update(modality=modality, segments=t.tsn_segments, tsn_stack=t.tsn_stack)
    return bundle


def init_args(config: Config, bundle: DataBundle) -> dict[str, Any]:
    t = config.train
    partial_bn = t.partial_bn == "on" or (t.partial_bn == "auto" and bool(t.weights))
    return {"num_classes": len(bundle.classes), "modality": MODALITIES[t.model], "segments": t.tsn_segments,
            "stack": t.tsn_stack, "backbone": t.backbone, "weights": t.weights, "dropout": t.dropout,
            "partial_bn": partial_bn}


class TSNScorer(cnn.VideoScorer):
    """The consensus of the K segment centres (as validated) and of eval.tsn_snippets evenly spaced snippets."""

    default = "segments"
    strategies = ["segments", "dense"]

    def __init__(self, model: TSNModel, meta: dict, run_config: Config, config: Config, device: Any,
                 inputs: EvalInputs) -> None:
        super().__init__(model, meta, inputs, device)
        self.dataset = SegmentDataset(self.source, [], modality=model.modality, segments=model.segments,
                                      stack=model.stack, train=False, compensation=meta.get("compensation", "median"))
        self.snippets, self.batch = config.eval.tsn_snippets, config.eval.batch_size

    def score(self, video: VideoEntry) -> dict[str, np.ndarray]:
        item = self.item(video)
        segments = self.dataset.snippets(item, self.dataset.starts(item, self.model.segments))
        dense = self.dataset.snippets(item, self.dataset.starts(item, self.snippets))
        logits = torch.cat([self.model.snippet_logits(chunk[None].to(self.device))[0]
                            for chunk in dense.split(self.batch)])
        return {"segments": cnn.softmax(self.model(segments[None].to(self.device)))[0],
                "dense": cnn.softmax(logits.mean(dim=0))}

    def explain(self, video: VideoEntry, target: int | None, frames: int) -> Explanation:
        """Heat maps of ``frames`` snippets spread over the video, read by the consensus as segments."""
        item = self.item(video)
        starts = self.dataset.starts(item, frames)
        snippets = self.dataset.snippets(item, starts).to(self.device)
        result = grad_cam(lambda x: self.model(x[None]), [snippets], [cam_layer(self.model.trunk)], target,
                          snippets.shape[-2:])
        # the frame shown under a snippet's map: its first frame (RGB, differences) or its stack's middle (flow)
        middle = snippet_extent(self.model.modality, self.model.stack) // 2 if self.model.modality == "flow" else 0
        shown = [min(item.frames - 1, s + middle) for s in starts]
        images = self.source.frames(item.id, shown)
        return explanation(video, result, panels_of(images, result.maps[0], [f"segment {k + 1}: frame {f}"
                                                                            for k, f in enumerate(shown)]))


Scorer = TSNScorer
