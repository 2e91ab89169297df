"""Per-frame CNN features (and class scores) from uint8 RGB frames, batched.

``FeatureExtractor(backbone, weights)`` takes a backbone name (built by :mod:`hpcvid.learn.backbones`) or an
already-built trunk module (the trainer recomputes features with its fine-tuned frame CNN straight
from stored frames, without decoding videos again). It runs in ``torch.inference_mode``, with the model
and input in ``channels_last`` (1.8x on the test machine's CPU), in batches of ``batch_size``.

A trunk it builds from a name is only ever used for inference, so each batch normalisation that follows a
convolution is folded into that convolution's weights and bias (:func:`fold_batchnorm`): the same function
up to float rounding, one pass over every activation less (ResNet-18 at 224 px, bf16, one CPU thread:
13.0 -> 10.4 ms a frame here). A module given by the caller is used as it is: it may be a model in training.

Precision (``precision="auto"``): bf16 autocast where the hardware has it (AVX512-BF16/AMX CPUs, CUDA
GPUs with bf16), float16 autocast (classic AMP) on CUDA GPUs without bf16, else float32. float16 is
dangerous here: untrained GoogLeNet's features are ~1e-12 and underflow to exactly 0 (smallest float16
subnormal 6e-8). bf16 keeps float32's exponent range and keeps them (cosine to float32 0.99999 for both
backbones here, random or not) — measured with a scale-free epsilon: ``cosine_similarity``'s default
eps=1e-8 reports ~0 for vectors of norm 3e-11. So the extractor *calibrates* on its first batch: a few
frames in float32 and in the candidate precision; below ``CALIBRATION_MIN_COSINE`` (e.g. the zeros of
float16) it uses float32. ``describe()`` records the choice and why. An explicit ``precision`` ("bf16",
"fp16", "fp32") is used as given. A batch with a non-finite feature in low precision is recomputed in
float32; still non-finite -> CheckpointError. Features and scores are always returned as float32: store
them as float32 (or normalise first), never float16.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from hpcvid.learn.backbones import build_backbone, cpu_supports_bf16, pick_device, preprocess
from hpcvid.errors import CheckpointError

log = logging.getLogger(__name__)

CALIBRATION_MIN_COSINE = 0.995
CALIBRATION_FRAMES = 4
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


class FeatureExtractor:
    """Batched frame -> feature (and score) extraction; see the module docstring for precision."""

    def __init__(self, backbone: Any = "resnet18", weights: str | Path = "", device: str = "auto",
                 batch_size: int = 32, *, head: Any = None, precision: str = "auto",
                 num_classes: int | None = None) -> None:
        import torch

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = pick_device(device)
        self.batch_size = int(batch_size)
        if isinstance(backbone, str):
            trunk, built_head, self.feature_dim = build_backbone(backbone, weights, num_classes)
            self.name = backbone
            head = built_head if head is None else head
            self.random_init = bool(trunk.random_init)
            self.weights_source = trunk.weights_source
        else:
            trunk = backbone
            self.name = getattr(trunk, "backbone_name", type(trunk).__name__)
            self.random_init = bool(getattr(trunk, "random_init", False))
            self.weights_source = str(getattr(trunk, "weights_source", "a module given by the caller"))
            self.feature_dim = None
        self.batchnorm = "as built"
        if isinstance(backbone, str):
            trunk, self.batchnorm = fold_batchnorm(trunk)
        # a given module is moved to the device and channels_last in place (no copy of its weights)
        self.trunk = trunk.to(self.device).to(memory_format=torch.channels_last)
        self.head = head.to(self.device) if head is not None else None
        self.requested_precision = precision
        self.precision: str | None = None  # decided on the first batch
        self.precision_reason = ""

    # ----------------------------------------------------------------------------------- precision
    def _low_precision(self) -> str | None:
        """The faster precision this device offers: bf16 (AVX512-BF16/AMX CPUs, bf16 GPUs), else fp16 on
        older CUDA GPUs (classic AMP), else None. Either is used only if the calibration agrees."""
        import torch

        if self.device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else None

    def _forward(self, batch, precision: str):
        import torch

        if precision in _AUTOCAST_DTYPES:
            with torch.autocast(self.device.type, dtype=getattr(torch, _AUTOCAST_DTYPES[precision])):
                out = self.trunk(batch)
        else:
            out = self.trunk(batch)
        return out.float()

    def use_precision(self, precision: str, reason: str) -> None:
        """Run in ``precision`` from now on, decided elsewhere (another process's extractor of the same network
        decided it on its first batch)."""
        if precision not in _AUTOCAST_DTYPES and precision != "fp32":
            raise ValueError(f"precision must be one of {PRECISIONS[1:]}, got {precision!r}")
        self.precision, self.precision_reason = precision, reason

    def _decide_precision(self, batch) -> None:
        import torch

        if self.requested_precision != "auto":
            self.precision, self.precision_reason = self.requested_precision, "requested"
            return
        low = self._low_precision()
        if low is None:
            self.precision, self.precision_reason = "fp32", f"no bf16 support on {self.device.type}"
            return
        sample = batch[:CALIBRATION_FRAMES]
        reference = self._forward(sample, "fp32")
        candidate = self._forward(sample, low)
        cosine = float(torch.nn.functional.cosine_similarity(reference, candidate, dim=1, eps=1e-30).min())
        if np.isfinite(cosine) and cosine >= CALIBRATION_MIN_COSINE:
            self.precision = low
            self.precision_reason = f"{low} autocast agrees with fp32 (min cosine {cosine:.4f})"
        else:
            self.precision = "fp32"
            self.precision_reason = (f"{low} autocast disagrees with fp32 (min cosine {cosine:.4f} < "
                                     f"{CALIBRATION_MIN_COSINE}), e.g. tiny untrained-GoogLeNet features in fp16")
            log.info("features: %s -> float32", self.precision_reason)

    # ----------------------------------------------------------------------------------- extraction
    def extract(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (T, H, W, 3) RGB -> float32 (T, D) pooled features."""
        return self._run(frames, want_scores=False)[0]

    def extract_with_scores(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(features (T, D), class scores (T, C) as logits, or None when there is no head)."""
        return self._run(frames, want_scores=self.head is not None)

    def _run(self, frames: np.ndarray, want_scores: bool) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (T, H, W, 3) RGB, got {frames.dtype} {frames.shape}")
        features: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        modes = [(m, m.training) for m in (self.trunk, self.head) if m is not None]
        for module, _ in modes:
            module.eval()  # a trainer's module may be in training mode: restore it afterwards
        try:
            self._batches(frames, want_scores, features, scores)
        finally:
            for module, mode in modes:
                module.train(mode)
        if self.feature_dim is None and features:
            self.feature_dim = int(features[0].shape[1])
        dim = self.feature_dim or 0
        result = np.concatenate(features) if features else np.zeros((0, dim), np.float32)
        return result.astype(np.float32, copy=False), (np.concatenate(scores) if want_scores and scores else None)

    def _batches(self, frames: np.ndarray, want_scores: bool, features: list, scores: list) -> None:
        import torch

        with torch.inference_mode():
            for start in range(0, len(frames), self.batch_size):
                batch = preprocess(frames[start:start + self.batch_size], self.device)
                if self.precision is None:
                    self._decide_precision(batch)
                out = self._forward(batch, self.precision)
                if self.precision != "fp32" and not torch.isfinite(out).all():
                    out = self._forward(batch, "fp32")
                if not torch.isfinite(out).all():
                    raise CheckpointError(f"backbone {self.name} ({self.weights_source}) gives non-finite "
                                          "features: the weights are broken; give another weights file")
                if want_scores:
                    scores.append(self.head(out).float().cpu().numpy())
                features.append(out.cpu().numpy())

    def describe(self) -> dict[str, Any]:
        """What produced the features, for a record (say loudly when the weights are random)."""
        return {
            "backbone": self.name, "feature_dim": self.feature_dim, "weights": self.weights_source,
            "random_init": self.random_init, "device": str(self.device), "batch_size": self.batch_size,
            "precision": self.precision or f"undecided ({self.requested_precision})",
            "precision_reason": self.precision_reason, "memory_format": "channels_last", "batchnorm": self.batchnorm,
            "has_head": self.head is not None, "dtype_out": "float32",
        }


def fold_batchnorm(trunk: Any) -> tuple[Any, str]:
    """An inference copy of ``trunk`` with every batch normalisation that directly follows a convolution folded
    into it, and what was done (for the record). Traced with ``torch.fx``; a trunk that does not trace, or has
    nothing to fold, is returned as it is. The copy keeps the trunk's descriptive attributes."""
    from torch.fx.experimental.optimization import fuse

    norms = sum(1 for m in trunk.modules() if "BatchNorm" in type(m).__name__)
    if not norms:
        return trunk, "none in the trunk"
    try:
        folded = fuse(trunk.eval())
    except Exception as error:   # a trunk torch.fx cannot trace runs unfolded: slower, the same features
        log.info("features: batch normalisation not folded (%s: %s)", type(error).__name__, error)
        return trunk, f"not folded ({type(error).__name__})"
    for name in ("backbone_name", "random_init", "weights_source"):
        if hasattr(trunk, name):
            setattr(folded, name, getattr(trunk, name))
    left = sum(1 for m in folded.modules() if "BatchNorm" in type(m).__name__)
    return folded, f"{norms - left} of {norms} folded into their convolutions"
