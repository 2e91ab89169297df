"""Input preparation on whole batches of tensors, on the CPU (in the DataLoader workers) or on a GPU.

Every function here works on a batch and on any device; the one-sample helpers of
:mod:`hpcvid.learn.datasets` (``prepare_flow``, ``prepare_features``, ``crop_resize``, ...) call them with a
batch of one, so training, validation and evaluation share one implementation and a sample comes out the
same alone or in a batch:

* :func:`decode_jpeg_batch` - JPEG bytes -> uint8 ``(B, 3, H, W)`` with torchvision's decoder (nvJPEG on a GPU).
* :func:`dequantise_flow`, :func:`compensate_camera_batch`, :func:`stack_flow` - stored flow -> pixels ->
  camera motion removed -> ``(B, 2L, H, W)``.
* :func:`crop_resize_batch` - each sample's own crop box, resized back, flipped (flow: vectors rescaled,
  u negated on a flip).
* :func:`prepare_feature_batch` - ``(B, T, D)`` -> standardised and centred in time.

What keeps the numbers independent of batch size, device threads and DataLoader workers: the median is
selected (``kthvalue``), never summed; means are summed in float64 and rounded once to float32; crops of
one size are resized together and every other sample's pixels are computed exactly as alone.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from hpcvid.learn.statistics import checked_std


# ------------------------------------------------------------------------------ frames
def decode_jpeg_batch(data: torch.Tensor, offsets: torch.Tensor, device: Any = "cpu") -> torch.Tensor:
    """Frames stored as JPEG, concatenated in ``data`` (frame i is ``data[offsets[i]:offsets[i+1]]``), decoded
    together on ``device`` -> uint8 ``(B, 3, H, W)`` RGB. On a GPU this is nvJPEG, which may differ from the
    CPU decoders by a few levels in a few pixels."""
    from torchvision.io import ImageReadMode, decode_jpeg

    bounds = offsets.tolist()
    rows = [data[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]
    return torch.stack(decode_jpeg(rows, mode=ImageReadMode.RGB, device=device))


def can_decode_jpeg() -> bool:
    """Whether torchvision's batched JPEG decoder is there (deprecated since torchvision 0.29 in favour of
    TorchCodec, which does not install everywhere): without it frames are decoded in the workers."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


def normalise_frames(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32, ImageNet mean/std: the extraction's own preprocessing."""
    from hpcvid.learn.backbones import preprocess

    return preprocess(pixels.permute(0, 2, 3, 1), channels_last=False)


def resize_to(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, C, *size)``, bilinear (the two-stream RGB frame to its flow's size)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------ flow
def dequantise_flow(values: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Stored flow ``(B, L, H, W, 2)`` -> float32 pixels: ``value * scale - offset`` per sample for quantised
    uint8 (the float32 operations of :func:`hpcvid.media.flow.dequantise`), the values as they are otherwise."""
    if values.dtype != torch.uint8:
        return values.float()
    shape = (-1,) + (1,) * (values.ndim - 1)
    return values.float() * scale.to(values.device).view(shape) - offset.to(values.device).view(shape)


def compensate_camera_batch(flow: torch.Tensor, mode: str = "median", stored: torch.Tensor | None = None,
                            scale: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Subtract each pair's median (or mean) displacement from float32 flow ``(B, ..., H, W, 2)``: removes
    camera motion. The median is numpy's (the mean of the two middle values for an even count).

    Given the quantised uint8 values the flow came from (``stored``, with each sample's ``scale`` and
    ``offset``), the two middle values are found by counting the 256 codes instead of selecting among the
    floats (several times faster on a CPU); dequantisation is increasing, so they are the same two values.
    """
    if mode == "none":
        return flow
    if mode not in ("median", "mean"):
        raise ValueError(f"unknown camera compensation {mode!r}; choose median, mean or none")
    if mode == "mean":
        return flow - flow.double().mean(dim=(-3, -2), keepdim=True).float()
    *lead, height, width, channels = flow.shape
    count = height * width
    if stored is not None and stored.dtype == torch.uint8 and scale is not None and offset is not None:
        lower, upper = _middle_codes(stored.reshape(-1, count, channels))
        shape = (flow.shape[0], -1)
        lower = dequantise_flow(lower.view(shape), scale, offset)
        upper = dequantise_flow(upper.view(shape), scale, offset)
    else:
        values = flow.reshape(-1, count, channels).transpose(1, 2)     # (pairs, 2, H*W)
        upper = values.kthvalue(count // 2 + 1, dim=-1).values
        lower = values.kthvalue(count // 2, dim=-1).values if count % 2 == 0 else upper
    median = upper if count % 2 else (lower + upper) / 2
    return flow - median.reshape(*lead, 1, 1, channels)


def _middle_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (count // 2)-th and (count // 2 + 1)-th smallest uint8 code of each pair and channel of ``codes``
    ``(pairs, count, channels)`` -> two ``(pairs, channels)`` uint8, from histograms of the 256 codes. One
    row of codes per pair and channel: 3x faster than counting the channels' interleaved codes in place."""
    pairs, count, channels = codes.shape
    rows = codes.transpose(1, 2).reshape(-1, count).long()
    histogram = torch.zeros(rows.shape[0], 256, dtype=torch.int32, device=codes.device)
    histogram.scatter_add_(1, rows, torch.ones_like(rows, dtype=torch.int32))
    below = histogram.cumsum(1)
    upper = (below < count // 2 + 1).sum(1)
    lower = (below < max(1, count // 2)).sum(1)
    return lower.to(torch.uint8).view(pairs, channels), upper.to(torch.uint8).view(pairs, channels)


def stack_flow(flow: torch.Tensor) -> torch.Tensor:
    """``(B, L, H, W, 2)`` -> ``(B, 2L, H, W)``, channels u0, v0, u1, v1, ..."""
    batch, steps, height, width, _ = flow.shape
    return flow.permute(0, 1, 4, 2, 3).reshape(batch, 2 * steps, height, width).contiguous()


# ------------------------------------------------------------------------------ augmentation
def crop_resize_batch(x: torch.Tensor, boxes: torch.Tensor, flow_channels: bool = False) -> torch.Tensor:
    """Apply each sample's box ``(top, left, crop_h, crop_w, flip)`` (rows of ``boxes``, on the CPU) to
    ``(B, C, H, W)``: crop, resize back to ``(H, W)``, flip. Samples with crops of one size are resized in one
    call. For flow (``flow_channels``), vectors are rescaled by the zoom and u is negated on a flip."""
    batch, channels, height, width = x.shape
    rows = [tuple(int(v) for v in row) for row in boxes.tolist()]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (_, _, crop_h, crop_w, _) in enumerate(rows):
        by_size.setdefault((crop_h, crop_w), []).append(i)
    for (crop_h, crop_w), members in by_size.items():
        crops = torch.stack([x[i, :, rows[i][0]:rows[i][0] + crop_h, rows[i][1]:rows[i][1] + crop_w]
                             for i in members])
        if (crop_h, crop_w) != (height, width):
            crops = F.interpolate(crops, size=(height, width), mode="bilinear", align_corners=False)
        out[members] = crops
    flipped = [i for i, row in enumerate(rows) if row[4]]
    if flipped:
        out[flipped] = out[flipped].flip(-1)
    if flow_channels:
        # the zoom of each axis as float32, u negated on a flip: the same numbers whatever the batch
        factors = torch.tensor([[(-1.0 if flip else 1.0) * np.float32(width / crop_w), np.float32(height / crop_h)]
                                for _, _, crop_h, crop_w, flip in rows], dtype=out.dtype)
        out = out * factors.repeat(1, channels // 2).view(batch, channels, 1, 1).to(out.device)
    return out


# ------------------------------------------------------------------------------ features
def prepare_feature_batch(x: torch.Tensor, mean: Any, std: Any, centring: bool = True) -> torch.Tensor:
    """The LSTM's input ``(B, T, D)`` -> float32: standardised with the train ``mean``/``std`` (in float64, as
    :func:`hpcvid.learn.statistics.normalise_features`), then, with ``centring``, each step minus its clip's
    mean with that mean appended: ``(B, T, 2D)``."""
    z = x.float()
    if mean is not None and std is not None:
        mean64 = torch.as_tensor(np.asarray(mean, dtype=np.float64), device=x.device)
        std64 = torch.as_tensor(checked_std(std), device=x.device)
        z = ((z.double() - mean64) / std64).float()
    if not centring:
        return z
    clip_mean = z.double().mean(dim=-2, keepdim=True).float()
    return torch.cat([z - clip_mean, clip_mean.expand_as(z)], dim=-1)
