"""The ``c3d`` kind: 3D convolutions over clips of consecutive frames (:class:`hpcvid.learn.models.C3DModel`).

C3D's recipe, trained from scratch: clips of ``train.clip_frames`` (16) consecutive stored frames, a square
crop of ``train.c3d_crop`` of the short side (112 px of frames stored at short side 128; 56 px of the demo's
64 px frames), at a random place in training and at the centre otherwise (:class:`hpcvid.learn.clips.
ClipDataset`), flipped when ``train.flip``. The network's width is ``train.c3d_width`` / ``train.c3d_fc``.

Evaluation strategies (``*`` = the default): ``video``* (video level: clips starting every
eval.clip_stride frames over the whole video, their softmax averaged, as C3D reports) and ``clip`` (clip
level: the centre clip alone, which validation used).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from hpcvid.config import Config
from hpcvid.learn.clips import ClipDataset, batches, covering_starts, square_crop
from hpcvid.learn.datasets import sequence_indices
from hpcvid.learn.gradcam import Explanation, explanation, grad_cam, panels_of
from hpcvid.learn.kinds import DataBundle, EvalInputs, TrainInputs, cnn
from hpcvid.learn.models import C3DModel
from hpcvid.media.decode import count_indices
from hpcvid.storage.manifest import VideoEntry

MODEL = C3DModel

steps_per_batch = cnn.steps_per_batch
train_step = cnn.train_step
validation_loss = cnn.validation_loss


def build_data(config: Config, inputs: TrainInputs) -> DataBundle:
    t = config.train
    bundle = cnn.video_bundle(config, inputs, functools.partial(_clips, length=t.clip_frames, crop=t.c3d_crop,
                                                                flip=t.flip), {})
    bundle.meta.update(clip_frames=t.clip_frames, crop=t.c3d_crop)
    return bundle


def _clips(source: Any, items: list, *, train: bool, seed: int, augment: Any, length: int, crop: float,
           flip: bool) -> ClipDataset:
    """C3D crops without rescaling: the scale-jittering ``augment`` of the 2D kinds is not used."""
    return ClipDataset(source, items, length=length, crop=crop, train=train, seed=seed, flip=flip)


def init_args(config: Config, bundle: DataBundle) -> dict[str, Any]:
    t = config.train
    return {"num_classes": len(bundle.classes), "width": t.c3d_width, "fc": t.c3d_fc, "dropout": t.dropout}


class C3DScorer(cnn.VideoScorer):
    """Video level (every clip of the video, averaged) and clip level (the centre clip)."""

    default = "video"
    strategies = ["video", "clip"]

    def __init__(self, model: C3DModel, meta: dict, run_config: Config, config: Config, device: Any,
                 inputs: EvalInputs) -> None:
        super().__init__(model, meta, inputs, device)
        self.length, self.stride, self.batch = int(meta["clip_frames"]), config.eval.clip_stride, config.eval.batch_size
        self.dataset = ClipDataset(self.source, [], length=self.length, crop=float(meta["crop"]), train=False)

    def score(self, video: VideoEntry) -> dict[str, np.ndarray]:
        item = self.item(video)
        centre = self.dataset.clip(item, sequence_indices(item.frames, self.length))
        clips = [self.dataset.clip(item, _window(item.frames, s, self.length))
                 for s in covering_starts(item.frames, self.length, self.stride)]
        probs = np.concatenate([cnn.softmax(self.model(torch.stack(group).to(self.device)))
                                for group in batches([centre, *clips], self.batch)])
        return {"video": probs[1:].mean(axis=0), "clip": probs[0]}

    def explain(self, video: VideoEntry, target: int | None, frames: int) -> Explanation:
        """3D Grad-CAM on the last conv layer of the centre clip: a heat map per frame, ``frames`` of them shown."""
        item = self.item(video)
        indices = sequence_indices(item.frames, self.length)
        clip = self.dataset.clip(item, indices).to(self.device)
        result = grad_cam(lambda x: self.model(x[None]), [clip], [self.model.features], target, clip.shape[1:])
        shown = [int(k) for k in count_indices(len(indices), frames)]
        images = self.source.frames(item.id, [indices[k] for k in shown])
        top, left, side = square_crop(images.shape[1], images.shape[2], self.dataset.crop, None)   # as the clip
        crops = images[:, top:top + side, left:left + side]
        return explanation(video, result, panels_of(crops, result.maps[0][0][shown],
                                                    [f"frame {indices[k]}" for k in shown]))


def _window(frames: int, start: int, length: int) -> list[int]:
    """The clip starting at ``start``; a video shorter than a clip is played backwards and forwards."""
    return sequence_indices(frames, length) if frames <= length else list(range(start, start + length))


Scorer = C3DScorer
