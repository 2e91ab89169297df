"""RAFT optical flow (Teed & Deng 2020) from torchvision, with weights from a local file only.

Nothing is downloaded: the user names a state dict saved from torchvision's ``raft_small`` or ``raft_large``
(``torch.save(model.state_dict(), path)``, e.g. from ``raft_large(weights=Raft_Large_Weights.C_T_SKHT_V2)`` on
a machine with internet access). :func:`check_raft_weights` loads the file and fits it to the architecture
once, so a missing file, something that is not a state dict, or the other architecture's weights are refused
with one line on the login node, before any shard is queued.

RAFT sees frames at 1/8 of their size and its correlation pyramid needs at least 16 cells a side there, so
frames are padded (border replicated, as torchvision's reference scripts do) to a multiple of 8 and at least
128 pixels, and the flow is cropped back. Input is RGB in [-1, 1]; a grayscale frame is repeated to 3 channels.
Output convention as OpenCV's: ``flow[y, x] = (dx, dy)`` in pixels from frame t to frame t+1.
"""
from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Any

from hpcvid.errors import CheckpointError, ConfigError

ARCHITECTURES = ("raft_small", "raft_large")
MIN_SIDE = 128
"""Pixels: RAFT's correlation pyramid needs 16 cells a side at 1/8 resolution (torchvision raises below)."""


def _build(model: str) -> Any:
    from torchvision.models import optical_flow

    if model not in ARCHITECTURES:
        raise ConfigError(f"RAFT model {model!r} is unknown; choose one of {', '.join(ARCHITECTURES)}")
    return getattr(optical_flow, model)(weights=None, progress=False)


def _fix(model: str) -> str:
    return f"give a local state dict of torchvision's {model} (torch.save(model.state_dict(), F)) as extract.flow_weights"


def _read_state(path: Path, model: str) -> dict[str, Any]:
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError,
            ImportError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"RAFT weights file {path} cannot be loaded as a torch state dict ({first}): "
                              f"{_fix(model)}") from None
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(f"RAFT weights file {path} is not a state dict (a dict of tensors): {_fix(model)}")
    return {key.removeprefix("module."): value for key, value in payload.items()}


def _mismatch(network: Any, state: dict[str, Any]) -> str:
    """'' when ``state`` fits ``network`` exactly, else a short account of the first differences."""
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
             ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape")) if keys]
    return "; ".join(parts)


def check_raft_weights(path: str | Path, model: str = "raft_small") -> Path:
    """The weights file as a Path once it is known to fit ``model``; CheckpointError (one line) otherwise."""
    if not str(path):
        raise CheckpointError(f"extract.flow = 'raft' needs weights (nothing is downloaded, and an untrained "
                              f"RAFT gives meaningless flow): {_fix(model)}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"RAFT weights file {path} does not exist: {_fix(model)}")
    _loaded(str(path.resolve()), path.stat().st_mtime_ns, model)
    return path


@functools.lru_cache(maxsize=4)
def _loaded(path: str, mtime_ns: int, model: str) -> Any:
    """The CPU model with the file's weights, built once per (file version, architecture) and process."""
    network = _build(model)
    state = _read_state(Path(path), model)
    problem = _mismatch(network, state)
    if problem:
        other = next((m for m in ARCHITECTURES if m != model and not _mismatch(_build(m), state)), None)
        hint = (f"it holds {other} weights: set extract.raft_model = '{other}'" if other else
                f"{_fix(model)}, or set extract.raft_model to the architecture the file was saved from")
        raise CheckpointError(f"RAFT weights file {path} does not fit {model} ({problem}): {hint}")
    network.load_state_dict(state)
    return network.eval()


class RaftFlow:
    """Batched RAFT: uint8 (N, H, W, 3) RGB or (N, H, W) gray pairs -> float32 (N, H, W, 2) on ``device``."""

    def __init__(self, weights: str | Path, model: str = "raft_small", iterations: int = 12,
                 device: str = "auto") -> None:
        import copy

        from hpcvid.learn.backbones import pick_device

        if iterations < 1:
            raise ConfigError(f"RAFT iterations = {iterations} must be at least 1")
        path = check_raft_weights(weights, model)
        self.device = pick_device(device)
        self.iterations = iterations
        # a copy: the cached CPU model stays untouched whatever device this one moves to
        self.network = copy.deepcopy(_loaded(str(path.resolve()), path.stat().st_mtime_ns, model)).to(self.device)

    def __call__(self, first: Any, second: Any) -> Any:
        """Flow of each pair (first[n] -> second[n]); tensors in, a tensor on ``self.device`` out."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            images = [self._prepare(x) for x in (first, second)]
            h, w = images[0].shape[-2:]
            pad_h, pad_w = max(MIN_SIDE, -(-h // 8) * 8) - h, max(MIN_SIDE, -(-w // 8) * 8) - w
            if pad_h or pad_w:
                images = [F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") for x in images]
            flow = self.network(*images, num_flow_updates=self.iterations)[-1]
            return flow[:, :, :h, :w].permute(0, 2, 3, 1).contiguous()

    def _prepare(self, frames: Any) -> Any:
        """uint8 (N, H, W[, 3]) -> float (N, 3, H, W) in [-1, 1] on the device."""
        x = frames.to(self.device)
        x = x[..., None].expand(*x.shape, 3) if x.dim() == 3 else x
        return x.permute(0, 3, 1, 2).float().mul_(2.0 / 255.0).sub_(1.0)
