"""Dense optical flow between consecutive frames, and its compact storage.

Convention (OpenCV's): ``flow[t][y, x] = (dx, dy)`` moves pixel (x, y) of frame t to
(x + dx, y + dy) in frame t + 1; x is the column (to the right), y the row (downwards).

Algorithms (224x224 pairs/s on one core of this project's test machine):

* ``farneback`` — ``cv2.calcOpticalFlowFarneback`` with the parameters the two-stream studies used
  (pyr_scale 0.5, levels 3, winsize 15, iterations 3, poly_n 5, poly_sigma 1.2): ~150 pairs/s.
* ``dis`` — ``cv2.DISOpticalFlow`` presets ultrafast (~3,450), fast (~1,660, default), medium (~300).
* ``tvl1`` — ``cv2.optflow.DualTVL1OpticalFlow`` with fewer pyramid levels and warps than OpenCV's
  defaults (5 and 5 -> 3 and 3): OpenCV's defaults run ~1.3 pairs/s on a CPU core, which makes TV-L1
  a GPU-cluster job for UCF-101; the reduced setting is several times faster at a small quality cost
  (``hpcvid bench`` reports both speed and end-point error).
* ``tvl1_torch`` — the same TV-L1, same parameters and defaults, written with torch tensor operations
  (:mod:`hpcvid.media.tvl1_torch`): batches of frame pairs on a CUDA GPU, or on the CPU's threads, without
  an OpenCV built with CUDA.
* ``raft`` — torchvision's RAFT (:mod:`hpcvid.media.raft`) with weights from a local file (``weights``).

The torch algorithms take further options that change how they run, not what they compute:
``device`` (``auto``: CUDA when visible), ``batch_size`` (frame pairs per call) and, for tvl1_torch,
``compile`` (fuse each step with ``torch.compile``, for GPUs).

Storage (the field's JPEG-flow convention): clip to ±bound, map linearly to 0..255 (128 ≈ zero
motion), round. The largest error of a value inside ±bound after :func:`dequantise` is half a step,
``bound / 255`` (a step is ``2 * bound / 255 = bound / 127.5``); values outside ±bound are clipped.
``float16`` keeps 11 significant bits (relative error ≤ 2**-11) and no clipping.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from hpcvid.errors import ConfigError

ALGORITHMS = ("farneback", "dis", "tvl1", "tvl1_torch", "raft")
FARNEBACK_DEFAULTS: dict[str, Any] = {
    "pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2, "flags": 0,
}
DIS_DEFAULTS: dict[str, Any] = {"preset": "fast"}
TVL1_DEFAULTS: dict[str, Any] = {
    "tau": 0.25, "lambda_": 0.15, "theta": 0.3, "nscales": 3, "warps": 3, "epsilon": 0.01,
    "inner_iterations": 30, "outer_iterations": 10, "scale_step": 0.5, "median_filtering": 5,
}
"""Reduced TV-L1: 3 scales x 3 warps (OpenCV: 5 x 5, scale step 0.8); the rest as OpenCV."""
TORCH_OPTIONS: dict[str, Any] = {"device": "auto", "batch_size": 32}
DEFAULTS: dict[str, dict[str, Any]] = {
    "farneback": FARNEBACK_DEFAULTS, "dis": DIS_DEFAULTS, "tvl1": TVL1_DEFAULTS,
    "tvl1_torch": {**TVL1_DEFAULTS, "compile": False, **TORCH_OPTIONS},
    "raft": {"weights": "", "model": "raft_small", "iterations": 12, **TORCH_OPTIONS},
}
TORCH_ALGORITHMS = ("tvl1_torch", "raft")
STORAGES = ("uint8", "float16")
FlowFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(gray t, gray t+1) -> a new float32 (H, W, 2) array.

Never hand OpenCV a destination array: DIS reads the contents of a given ``flow`` argument even without
its use-initial-flow flag, so an uninitialised buffer changes the result or crashes the process
(seen here with ``np.empty``)."""
VideoFlowFn = Callable[[np.ndarray], np.ndarray]
"""uint8 (T, H, W, 3) RGB or (T, H, W) gray frames -> a new float32 (T-1, H, W, 2) array."""


def _unknown(algorithm: str, given: dict, defaults: dict) -> None:
    extra = sorted(set(given) - set(defaults))
    if extra:
        raise ConfigError(f"optical flow {algorithm!r}: unknown parameter(s) {extra}; valid: {sorted(defaults)}")


def flow_parameters(algorithm: str, **params: Any) -> dict[str, Any]:
    """The complete parameter set of ``algorithm`` (defaults updated by ``params``), for the record."""
    defaults = DEFAULTS.get(algorithm)
    if defaults is None:
        raise ConfigError(f"optical flow algorithm {algorithm!r} is unknown; choose one of {', '.join(ALGORITHMS)}")
    _unknown(algorithm, params, defaults)
    return {**defaults, **params}


def make_flow(algorithm: str, **params: Any) -> FlowFn:
    """A function (gray uint8 frame t, gray frame t+1) -> float32 (H, W, 2) flow; built once, reused."""
    import cv2

    settings = flow_parameters(algorithm, **params)
    if algorithm in TORCH_ALGORITHMS:
        video = make_video_flow(algorithm, **params)
        return lambda prev, nxt: video(np.stack([prev, nxt]))[0]
    if algorithm == "farneback":
        def farneback(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
            return cv2.calcOpticalFlowFarneback(
                prev, nxt, None, settings["pyr_scale"], settings["levels"], settings["winsize"],
                settings["iterations"], settings["poly_n"], settings["poly_sigma"], settings["flags"])
        return farneback
    if algorithm == "dis":
        presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                   "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
        if settings["preset"] not in presets:
            raise ConfigError(f"DIS preset {settings['preset']!r} is unknown; choose one of {', '.join(presets)}")
        dis = cv2.DISOpticalFlow_create(presets[settings["preset"]])
        return lambda prev, nxt: dis.calc(prev, nxt, None)
    if not hasattr(cv2, "optflow"):
        raise ConfigError("TV-L1 needs cv2.optflow: install opencv-contrib-python-headless (not opencv-python)")
    tvl1 = cv2.optflow.DualTVL1OpticalFlow_create(
        tau=settings["tau"], lambda_=settings["lambda_"], theta=settings["theta"], nscales=settings["nscales"],
        warps=settings["warps"], epsilon=settings["epsilon"], innnerIterations=settings["inner_iterations"],
        outerIterations=settings["outer_iterations"], scaleStep=settings["scale_step"],
        medianFiltering=settings["median_filtering"])
    return lambda prev, nxt: tvl1.calc(prev, nxt, None)


def make_video_flow(algorithm: str, **params: Any) -> VideoFlowFn:
    """A function frames -> the flow of every consecutive pair; built once, reused across videos.

    OpenCV's algorithms take the pairs one by one; the torch ones take ``batch_size`` pairs per call on their
    device, which is where a GPU earns its speed.
    """
    settings = flow_parameters(algorithm, **params)
    if algorithm in TORCH_ALGORITHMS:
        return _torch_video_flow(algorithm, settings)
    pair = make_flow(algorithm, **params)

    def video(frames: np.ndarray) -> np.ndarray:
        gray = to_gray(frames)
        out = np.empty((max(len(gray) - 1, 0), gray.shape[1], gray.shape[2], 2), dtype=np.float32)
        for t in range(len(gray) - 1):
            out[t] = pair(gray[t], gray[t + 1])
        return out
    return video


def _torch_video_flow(algorithm: str, settings: dict[str, Any]) -> VideoFlowFn:
    import torch

    from hpcvid.learn.backbones import pick_device

    device = pick_device(settings["device"])
    batch = int(settings["batch_size"])
    if batch < 1:
        raise ConfigError(f"optical flow {algorithm!r}: batch_size = {batch} must be at least 1")
    if algorithm == "tvl1_torch":
        from hpcvid.media.tvl1_torch import check_parameters, tvl1_flow

        options = {name: settings[name] for name in TVL1_DEFAULTS}
        check_parameters(options)
        compiled = bool(settings["compile"])
        estimate: Callable[[Any, Any], Any] = lambda first, second: tvl1_flow(first, second, **options,
                                                                               compile=compiled)
        prepare: Callable[[np.ndarray], np.ndarray] = to_gray
    else:
        from hpcvid.media.raft import RaftFlow

        estimate = RaftFlow(settings["weights"], settings["model"], int(settings["iterations"]), str(device))
        prepare = np.asarray  # RAFT sees colour when there is colour

    def video(frames: np.ndarray) -> np.ndarray:
        frames = np.ascontiguousarray(prepare(frames))
        pairs = max(len(frames) - 1, 0)
        out = np.empty((pairs, frames.shape[1], frames.shape[2], 2), dtype=np.float32)
        for start in range(0, pairs, batch):
            stop = min(start + batch, pairs)
            # one batch's frames at a time on the device: a long clip need not fit in its memory
            chunk = torch.from_numpy(frames[start:stop + 1]).to(device)
            out[start:stop] = estimate(chunk[:-1], chunk[1:]).cpu().numpy()
        return out
    return video


_ESTIMATORS = threading.local()


def _cached_flow(algorithm: str, params: dict[str, Any]) -> VideoFlowFn:
    """One estimator per (algorithm, parameters) and thread, reused across videos.

    Why: a fresh DIS/TV-L1 object allocates its pyramids on the first pair; over a whole shard of
    ~30-pair clips that cost 10-25 % of DIS's speed (and RAFT would load its weights per video).
    OpenCV's objects are not thread-safe, hence per thread.
    """
    cache = getattr(_ESTIMATORS, "cache", None)
    if cache is None:
        cache = _ESTIMATORS.cache = {}
    key = (algorithm, tuple(sorted((k, repr(v)) for k, v in params.items())))
    if key not in cache:
        cache[key] = make_video_flow(algorithm, **params)
    return cache[key]


def to_gray(frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB -> uint8 (T, H, W) luma (the input every OpenCV flow takes)."""
    import cv2

    if frames.ndim == 3:
        return np.ascontiguousarray(frames, dtype=np.uint8)
    return np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames])


def compute_flow(frames: np.ndarray, algorithm: str = "farneback", **params: Any) -> np.ndarray:
    """Flow between each pair of consecutive frames: float32 (T-1, H, W, 2); T < 2 gives (0, H, W, 2).

    ``frames`` is uint8 (T, H, W, 3) RGB or (T, H, W) gray. ``params`` override the algorithm's defaults.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4):
        raise ValueError(f"frames must be uint8 (T, H, W, 3) or (T, H, W), got {frames.dtype} {frames.shape}")
    return _cached_flow(algorithm, params)(frames)


class FlowStream:
    """The flow of one video's consecutive pairs, computed as its frames arrive in chunks.

    :meth:`push` takes the next chunk of frames and returns the flow of every pair it completes, including
    the pair that spans the previous chunk and this one (computed once: the last frame of a chunk is kept
    for it). The torch algorithms take their pairs in batches of ``batch_size`` counted from the video's
    first pair, exactly as :func:`compute_flow` takes them on the whole video, so the concatenated output is
    the whole video's flow whatever the chunks are (a batch's numbers may depend on what else is in it);
    their frames wait until a batch is complete, and :meth:`finish` computes the last, partial one.
    """

    def __init__(self, algorithm: str = "farneback", **params: Any) -> None:
        self._video = _cached_flow(algorithm, params)
        settings = flow_parameters(algorithm, **params)
        self._batch = int(settings["batch_size"]) if algorithm in TORCH_ALGORITHMS else 0
        self._pending: np.ndarray | None = None  # frames not yet the first frame of a computed pair

    def push(self, frames: np.ndarray) -> np.ndarray:
        """The next frames (uint8 (n, H, W, 3) RGB or (n, H, W) gray) -> float32 (m, H, W, 2), the pairs completed."""
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim not in (3, 4):
            raise ValueError(f"frames must be uint8 (T, H, W, 3) or (T, H, W), got {frames.dtype} {frames.shape}")
        pending = frames if self._pending is None else np.concatenate([self._pending, frames])
        pairs = len(pending) - 1
        if self._batch:  # whole batches only, counted from the first pair
            pairs -= pairs % self._batch
        self._pending = pending[pairs:]
        return self._flow(pending[:pairs + 1])

    def finish(self) -> np.ndarray:
        """The flow of the pairs still waiting (a torch algorithm's last, partial batch); the stream is done."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise ValueError("FlowStream.finish() without any frame pushed")
        return self._flow(pending)

    def _flow(self, frames: np.ndarray) -> np.ndarray:
        if len(frames) < 2:
            return np.zeros((0,) + frames.shape[1:3] + (2,), dtype=np.float32)
        return self._video(frames)


# --------------------------------------------------------------------------------------------- storage
def quantise(flow: np.ndarray, bound: float) -> np.ndarray:
    """float flow -> uint8: clip to ±bound, map linearly to 0..255 (0 -> 127.5 -> 128), round."""
    if bound <= 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    scaled = (np.clip(flow, -bound, bound) + bound) * (255.0 / (2.0 * bound))
    return np.rint(scaled).astype(np.uint8)


def dequantise(q: np.ndarray, bound: float) -> np.ndarray:
    """uint8 -> float32 flow; inverse of :func:`quantise` within ``max_quantisation_error(bound)``."""
    return (q.astype(np.float32) * np.float32(2.0 * bound / 255.0) - np.float32(bound)).astype(np.float32)


def max_quantisation_error(bound: float) -> float:
    """Largest |dequantise(quantise(f)) - f| for f inside ±bound: half a step, bound / 255."""
    return bound / 255.0


def encode_flow(flow: np.ndarray, storage: str = "uint8", bound: float = 20.0) -> tuple[np.ndarray, dict[str, Any]]:
    """(array to store, attributes to store beside it); :func:`decode_flow` undoes it from the attributes."""
    if storage == "uint8":
        return quantise(flow, bound), {"flow_storage": "uint8", "flow_bound": float(bound)}
    if storage == "float16":
        return np.asarray(flow, dtype=np.float16), {"flow_storage": "float16"}
    raise ConfigError(f"flow storage {storage!r} is unknown; choose one of {', '.join(STORAGES)}")


def decode_flow(data: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    """Stored flow (uint8 or float16) -> float32 (…, 2), whichever way it was stored."""
    storage = attrs.get("flow_storage", "float16" if np.asarray(data).dtype == np.float16 else "uint8")
    if storage == "uint8":
        return dequantise(np.asarray(data), float(attrs["flow_bound"]))
    return np.asarray(data, dtype=np.float32)


# --------------------------------------------------------------------------------------------- quality
def endpoint_error(flow: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean Euclidean distance between estimated and true flow vectors (over ``mask`` when given)."""
    error = np.linalg.norm(np.asarray(flow, np.float32) - np.asarray(truth, np.float32), axis=-1)
    if mask is not None:
        mask = np.broadcast_to(np.asarray(mask, bool), error.shape)
        if not mask.any():
            raise ValueError("the mask selects no pixel")
        return float(error[mask].mean())
    return float(error.mean())
