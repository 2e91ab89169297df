"""Grad-CAM: where in the picture a trained model found the evidence for a class.

For a layer with feature maps ``A`` (channels ``k``), the class score ``y`` is differentiated with respect to
``A``; each channel's weight is its gradient averaged over the map, and the heat map is
``ReLU(sum_k weight_k * A_k)``, brought up to the input's size. Channels that raise the class score where
they fire light up; positions where nothing raises it stay dark. Any number of spatial dimensions works,
so C3D's (time, height, width) maps give one heat map per frame.

Each kind's scorer draws its own explanation (``Scorer.explain``, see :mod:`hpcvid.learn.kinds`): it builds
the input as evaluation does and names the layer(s) to weigh (:func:`hpcvid.learn.models.cam_layer`); this
module does the arithmetic and the colouring. torch is imported by the callers; nothing here downloads or
writes files (the report and ``hpcvid explain`` draw the :class:`Explanation`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Panel:
    """One picture of an explanation: the frame the model saw and the heat map over it."""

    image: np.ndarray        # uint8 (H, W, 3)
    heat: np.ndarray         # float32 (H, W), in [0, 1]
    caption: str


@dataclass
class Explanation:
    """The heat maps of one video for one class, with what the model predicted from the same input."""

    video: str
    label: int               # the true class
    target: int              # the class whose evidence is shown
    predicted: int           # argmax of the mean softmax of the explained input(s)
    probabilities: np.ndarray
    panels: list[Panel] = field(default_factory=list)


@dataclass
class CamResult:
    """What :func:`grad_cam` returns: the prediction and one stack of heat maps per layer."""

    probabilities: np.ndarray
    predicted: int
    target: int
    maps: list[torch.Tensor]     # per layer: (n, *input spatial size) in [0, 1]


def grad_cam(forward: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], layers: Sequence[nn.Module],
             target: int | None, size: Sequence[int]) -> CamResult:
    """Grad-CAM of ``layers`` for class ``target`` (None: the predicted class) of ``forward(*inputs)``'s logits.

    ``forward`` returns logits ``(n, C)`` (n inputs explained together: each row's score is summed, so each
    input gets its own map); the prediction is the argmax of their mean softmax. The inputs are made to
    require gradients, so a frozen trunk is explained too. Each layer's maps are brought to ``size`` (the
    input's spatial size) and scaled together so that their largest value is 1 (inputs of one explanation
    stay comparable).
    """
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    gradients: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}

    def keep(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            captured[index].append(output)
            output.register_hook(lambda grad: gradients[index].append(grad))
        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            logits = forward(*(x.detach().requires_grad_(True) for x in inputs)).float()
            probabilities = logits.detach().softmax(-1).mean(0)
            predicted = int(probabilities.argmax())
            chosen = predicted if target is None else int(target)
            logits[:, chosen].sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    maps = []
    for index in range(len(layers)):
        if len(captured[index]) != 1 or len(gradients[index]) != 1:
            raise RuntimeError(f"Grad-CAM expects layer {index} to run once per forward pass, "
                               f"it ran {len(captured[index])} times")
        activation, gradient = captured[index][0].detach().float(), gradients[index][0].float()
        spatial = tuple(range(2, activation.ndim))
        weights = gradient.mean(dim=spatial, keepdim=True)
        cam = F.relu((weights * activation).sum(dim=1))
        maps.append(_normalised(_resized(cam, size)))
    return CamResult(probabilities.cpu().numpy(), predicted, chosen, maps)


def _resized(cam: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(n, *spatial)`` -> ``(n, *size)`` by (bi/tri)linear interpolation."""
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[cam.ndim - 1]
    return F.interpolate(cam[:, None], size=tuple(int(s) for s in size), mode=mode, align_corners=False)[:, 0]


def _normalised(cam: torch.Tensor) -> torch.Tensor:
    top = cam.max()
    return cam / top if top > 0 else cam


# ------------------------------------------------------------------------------ colouring
def colour_map(heat: np.ndarray) -> np.ndarray:
    """``(H, W)`` in [0, 1] -> uint8 RGB, blue (0) through green and yellow to red (1): the 'jet' ramp."""
    h = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)[..., None]
    channels = np.concatenate([1.5 - np.abs(4 * h - 3), 1.5 - np.abs(4 * h - 2), 1.5 - np.abs(4 * h - 1)], -1)
    return (255 * np.clip(channels, 0.0, 1.0)).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heat map's colours blended over the frame (uint8 RGB of the frame's size)."""
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colour_map(heat).astype(np.float32)
    return np.clip(blended, 0, 255).astype(np.uint8)


def explanation(video: Any, result: CamResult, panels: list[Panel]) -> Explanation:
    """An :class:`Explanation` of ``video`` (a manifest entry) from a Grad-CAM result and its panels."""
    return Explanation(video.id, int(video.label), result.target, result.predicted, result.probabilities, panels)


def panels_of(images: Sequence[np.ndarray], maps: torch.Tensor, captions: Sequence[str]) -> list[Panel]:
    """Pair each frame with its heat map (resized to the frame when the model saw another size)."""
    out = []
    for image, cam, caption in zip(images, maps, captions):
        heat = cam
        if tuple(heat.shape) != tuple(image.shape[:2]):
            heat = _resized(heat[None], image.shape[:2])[0]
        out.append(Panel(np.ascontiguousarray(image, dtype=np.uint8), heat.cpu().numpy().astype(np.float32), caption))
    return out
