"""The ``frame`` kind: a single-frame CNN (:class:`hpcvid.learn.models.FrameModel`).

Training sees one random frame per video (augmented), validation the middle frame. Evaluation strategies
(``*`` = the default, what validation used): ``middle``* (frame T//2), ``mean_frames`` (eval.frame_samples
evenly spaced frames, mean of softmax), and the frame-position study ``pos_first``, ``pos_quarter``,
``pos_middle``, ``pos_three_quarter``, ``pos_last`` (a first frame can leak motion: a growing object starts
small).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hpcvid.config import Config
from hpcvid.learn.datasets import FrameDataset, prepare_frames
from hpcvid.learn.gradcam import Explanation, explanation, grad_cam, panels_of
from hpcvid.learn.kinds import DataBundle, EvalInputs, TrainInputs, cnn
from hpcvid.learn.models import FrameModel, cam_layer
from hpcvid.storage.manifest import VideoEntry

MODEL = FrameModel
FRAME_POSITIONS = ("first", "quarter", "middle", "three_quarter", "last")

steps_per_batch = cnn.steps_per_batch
train_step = cnn.train_step
validation_loss = cnn.validation_loss


def build_data(config: Config, inputs: TrainInputs) -> DataBundle:
    return cnn.video_bundle(config, inputs, FrameDataset, {})


def init_args(config: Config, bundle: DataBundle) -> dict[str, Any]:
    t = config.train
    return {"num_classes": len(bundle.classes), "backbone": t.backbone, "weights": t.weights,
            "freeze_trunk": t.freeze_trunk, "dropout": t.dropout}


class FrameScorer(cnn.VideoScorer):
    """Single-frame CNN at the middle frame, averaged over frames, and at five fixed positions."""

    default = "middle"

    def __init__(self, model: Any, meta: dict, run_config: Config, config: Config, device: Any,
                 inputs: EvalInputs) -> None:
        super().__init__(model, meta, inputs, device)
        self.samples, self.batch = config.eval.frame_samples, config.eval.batch_size
        self.strategies = ["middle", "mean_frames", *(f"pos_{p}" for p in FRAME_POSITIONS)]

    def score(self, video: VideoEntry) -> dict[str, np.ndarray]:
        from hpcvid.media.decode import count_indices, named_frame_indices

        item = self.item(video)
        middle = item.frames // 2                      # what FrameDataset validates on
        sampled = [int(i) for i in count_indices(item.frames, self.samples)]
        positions = named_frame_indices(item.frames)
        wanted = sorted({middle, *sampled, *(positions[p] for p in FRAME_POSITIONS)})
        images = prepare_frames(self.source.frames(item.id, wanted))
        probs = np.concatenate([cnn.softmax(self.model(images[i:i + self.batch].to(self.device)))
                                for i in range(0, len(wanted), self.batch)])
        row = {index: probs[k] for k, index in enumerate(wanted)}
        result = {"middle": row[middle], "mean_frames": np.mean([row[i] for i in sampled], axis=0)}
        result.update({f"pos_{p}": row[positions[p]] for p in FRAME_POSITIONS})
        return result

    def explain(self, video: VideoEntry, target: int | None, frames: int) -> Explanation:
        """Heat maps of ``frames`` evenly spaced frames, each classified on its own."""
        from hpcvid.media.decode import count_indices

        item = self.item(video)
        indices = [int(i) for i in count_indices(item.frames, frames)]
        images = self.source.frames(item.id, indices)
        x = prepare_frames(images).to(self.device)
        result = grad_cam(self.model, [x], [cam_layer(self.model.trunk)], target, x.shape[-2:])
        return explanation(video, result, panels_of(images, result.maps[0], [f"frame {i}" for i in indices]))


Scorer = FrameScorer
