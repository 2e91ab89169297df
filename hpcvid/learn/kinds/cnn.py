"""What the CNN kinds (frame, flow, twostream, the TSN kinds, c3d) share: one prediction per input, trained with
cross-entropy.

Their kind modules take these parts as they are (one optimiser step per batch, the plain training step,
cross-entropy validation) and build their data bundles and scorers with the helpers below.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hpcvid.config import Config
from hpcvid.errors import VideoError
from hpcvid.learn.datasets import Augment, FlowDataset, VideoItem, hold_out, prepare_flow, window_starts
from hpcvid.learn.kinds import FLOW, FRAMES, DataBundle, EvalInputs, StepTools, TrainInputs, get_kind
from hpcvid.storage.manifest import VideoEntry


# ------------------------------------------------------------------------------ training
def steps_per_batch(config: Config) -> int:
    return 1


def train_step(model: nn.Module, inputs: list[torch.Tensor], labels: torch.Tensor, config: Config,
               tools: StepTools) -> tuple[float, float]:
    """Forward, cross-entropy, backward, one optimiser step."""
    with tools.autocast():
        logits = model(*inputs)
        loss = F.cross_entropy(logits.float(), labels)
    tools.backward(loss)
    tools.optimiser_step()
    return float(loss.detach()), float((logits.detach().argmax(-1) == labels).sum())


def validation_loss(logits: torch.Tensor, labels: torch.Tensor, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    return F.cross_entropy(logits.float(), labels), logits


# ------------------------------------------------------------------------------ data
def video_bundle(config: Config, inputs: TrainInputs, dataset: Callable[..., Any],
                 model_args: dict[str, Any]) -> DataBundle:
    """Hold out validation videos and build ``dataset(source, items, train=, seed=, augment=)`` for both parts."""
    t = config.train
    train_items, val_items = hold_out(inputs.items, t.val_fraction, t.seed)
    augment = Augment(tuple(t.scale_jitter), t.flip) if t.augment else None

    def make(items: list[VideoItem], train: bool) -> Any:
        return dataset(inputs.source, items, train=train, seed=t.seed, augment=augment)

    meta = {"classes": inputs.classes, "flow_stack": t.flow_stack, "compensation": t.flow_camera_compensation,
            "val_ids": [it.id for it in val_items], "trained_on": inputs.trained_on}
    return DataBundle(make(train_items, True), make(val_items, False) if val_items else None, inputs.classes,
                      model_args, meta)


def flow_bundle(config: Config, inputs: TrainInputs, dataset: Callable[..., Any]) -> DataBundle:
    """:func:`video_bundle` of a dataset of flow stacks (flow, twostream), stacked and compensated as configured."""
    t = config.train
    stacked = functools.partial(dataset, stack=t.flow_stack, compensation=t.flow_camera_compensation)
    return video_bundle(config, inputs, stacked, {"stack": t.flow_stack})


def flow_init_args(config: Config, bundle: DataBundle) -> dict[str, Any]:
    """Constructor arguments of the models with a flow trunk (flow, twostream)."""
    t = config.train
    return {"num_classes": len(bundle.classes), "stack": bundle.model_args.get("stack", t.flow_stack),
            "backbone": t.backbone, "weights": t.weights, "dropout": t.dropout}


# ------------------------------------------------------------------------------ evaluation
class VideoScorer:
    """What the CNN kinds' scorers share: the model, the test videos, and what the kind reads of them."""

    def __init__(self, model: nn.Module, meta: dict[str, Any], inputs: EvalInputs, device: Any) -> None:
        self.model, self.source, self.videos, self.device = model, inputs.source, inputs.videos, device
        self.reads = get_kind(meta["kind"]).reads

    def item(self, video: VideoEntry) -> VideoItem:
        """The test video as the datasets see it; one whose shard lacks what the model reads is refused."""
        if video.id not in self.videos:
            raise VideoError("not in the extraction shards (extraction failed or has not run for it)")
        entry = self.videos[video.id]
        if FRAMES in self.reads and not entry.get("has_frames", True):
            raise VideoError("its shard holds no frames: re-extract with frames stored")
        if FLOW in self.reads and not entry.get("has_flow"):
            raise VideoError("its shard holds no optical flow: re-extract with extract.flow set")
        return VideoItem(video.id, video.label, int(entry["frames"]), "test")

    def pictures(self, item: VideoItem, indices: list[int]) -> np.ndarray:
        """The RGB frames a flow model's heat maps are drawn over; the flow's magnitude when none are stored."""
        if self.videos.get(item.id, {}).get("has_frames", True):
            return self.source.frames(item.id, indices)
        fields = [self.source.flow(item.id, min(i, item.frames - 2), min(i, item.frames - 2) + 1)[0] for i in indices]
        return np.stack([flow_picture(field) for field in fields])


def flow_stacks(source: Any, item: VideoItem, stack: int, compensation: str,
                count: int) -> tuple[list[int], list[torch.Tensor]]:
    """(starts, prepared stacks) of ``count`` evenly spaced flow stacks; the centre stack alone when the video
    has no more flow pairs than one stack (then ping-pong padded, as in training)."""
    pairs = max(1, item.frames - 1)
    if pairs <= stack:
        centre, _ = FlowDataset(source, [item], stack=stack, train=False, compensation=compensation)[0]
        return [0], [centre]
    starts = window_starts(pairs, stack, count)
    return starts, [torch.from_numpy(prepare_flow(source.flow(item.id, s, s + stack), compensation)) for s in starts]


def flow_picture(field: np.ndarray) -> np.ndarray:
    """A flow field ``(H, W, 2)`` as a grey uint8 RGB picture of its magnitude (brighter = faster)."""
    magnitude = np.linalg.norm(np.asarray(field, np.float32), axis=-1)
    grey = (255 * magnitude / max(float(magnitude.max()), 1e-6)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def softmax(logits: torch.Tensor) -> np.ndarray:
    return logits.float().softmax(-1).cpu().numpy().astype(np.float32)
