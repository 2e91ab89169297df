"""A throw-away model kind for tests: a linear classifier of one frame's mean colour.

Its data and its scorer are the frame kind's; the tests register it in ``hpcvid.learn.kinds.KINDS`` to show
that a new kind is a table entry plus a module like this one.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpcvid.config import Config
from hpcvid.learn.kinds import DataBundle, ModelKind, FRAMES, cnn, frame

KIND = ModelKind("toy", "mean colour of one frame, linear", (FRAMES,), "toykind")


class MeanColour(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.init_args = {"num_classes": num_classes}
        self.head = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


MODEL = MeanColour
build_data = frame.build_data
steps_per_batch = cnn.steps_per_batch
train_step = cnn.train_step
validation_loss = cnn.validation_loss
Scorer = frame.FrameScorer


def init_args(config: Config, bundle: DataBundle) -> dict[str, Any]:
    return {"num_classes": len(bundle.classes)}
