"""Frame CNN backbones (the torchvision networks of :data:`ARCHITECTURES`), their weights and input.

:func:`build_backbone` splits a torchvision classifier into a *trunk* ((B, 3, H, W) -> (B, D) features; its
last classifier layer replaced by ``Identity``) and a *head* (that layer: ``fc`` of ResNet and GoogLeNet,
``classifier.6`` of VGG-16, ``classifier.3`` of MobileNetV3), so the extractor, the frame CNN, the flow
CNN, the segment networks and the CNN-LSTM share one definition. D is the input of that last layer:
ResNet-18 512, ResNet-50/101 2048, VGG-16 4096 (fc7), GoogLeNet 1024, MobileNetV3-large 1280, -small 1024.

Weights come only from a local file (nothing is downloaded), loaded with ``torch.load(weights_only=True)``:

* a plain state dict with torchvision's key names (e.g. ImageNet weights saved from torchvision, with
  or without the head's keys; GoogLeNet's ``aux1.*``/``aux2.*`` are ignored; a DDP ``module.`` prefix is
  stripped), or
* the file :func:`save_backbone` writes: ``{"hpcvid_backbone": name, "transform_input": bool,
  "state_dict": {...}}`` (a fine-tuned frame CNN from the trainer).

Without weights the network is randomly initialised (``trunk.random_init`` is True; callers record
this loudly). Untrained GoogLeNet (``init_weights=True``) gives features of magnitude ~1e-12 (measured):
they underflow in float16, so features are returned in float32 (see :mod:`hpcvid.learn.extractor`).

GoogLeNet's torchvision ImageNet weights were converted from TensorFlow and expect
``transform_input=True`` (it re-maps ImageNet-normalised input to the [-1, 1] range they were trained on);
a plain GoogLeNet state dict therefore switches it on, random initialisation leaves it off, and files
written by :func:`save_backbone` carry their own setting.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from hpcvid.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Architecture(NamedTuple):
    """A torchvision classifier as a backbone: its constructor, feature size and where its last layer is."""

    constructor: str      # the function of torchvision.models
    feature_dim: int      # D: the input of the last classifier layer
    head: str             # the last classifier layer's module path (its state-dict prefix)
    last_map: str         # the module whose output is the last spatial feature map (what Grad-CAM weighs)


ARCHITECTURES: dict[str, Architecture] = {
    "resnet18": Architecture("resnet18", 512, "fc", "layer4"),
    "resnet50": Architecture("resnet50", 2048, "fc", "layer4"),
    "resnet101": Architecture("resnet101", 2048, "fc", "layer4"),
    "vgg16": Architecture("vgg16", 4096, "classifier.6", "features.29"),     # the last ReLU, before the pool
    "googlenet": Architecture("googlenet", 1024, "fc", "inception5b"),
    "mobilenet_v3_large": Architecture("mobilenet_v3_large", 1280, "classifier.3", "features"),
    "mobilenet_v3_small": Architecture("mobilenet_v3_small", 1024, "classifier.3", "features"),
}
FEATURE_DIMS = {name: arch.feature_dim for name, arch in ARCHITECTURES.items()}
BACKBONES = tuple(ARCHITECTURES)


class Backbone(NamedTuple):
    """What :func:`build_backbone` returns; unpacks as ``trunk, head, feature_dim``."""

    trunk: Any  # torch.nn.Module: (B, 3, H, W) float -> (B, D)
    head: Any  # torch.nn.Module (D -> classes) or None
    feature_dim: int


def pick_device(name: str = "auto"):
    """``auto`` -> cuda when a GPU is visible, else cpu; ``cuda`` without a GPU is a ConfigError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but no CUDA GPU is visible; use device = 'auto' or 'cpu'")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"device {name!r} is unknown; choose auto, cpu or cuda")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 (AVX512-BF16 or AMX), where bf16 autocast is ~2x faster."""
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # noqa: BLE001 - a private probe that may change between torch versions
            continue
    return False


def _torchvision_model(name: str, transform_input: bool):
    import torchvision

    if name not in ARCHITECTURES:
        raise ConfigError(f"backbone {name!r} is unknown; choose one of {', '.join(BACKBONES)}")
    constructor = getattr(torchvision.models, ARCHITECTURES[name].constructor)
    if name == "googlenet":
        return constructor(weights=None, aux_logits=False, init_weights=True, transform_input=transform_input)
    return constructor(weights=None)


def _replace_module(model: Any, path: str, new: Any) -> None:
    """Put ``new`` at the dotted module ``path`` of ``model`` (``classifier.6``)."""
    *parents, last = path.split(".")
    setattr(model.get_submodule(".".join(parents)) if parents else model, last, new)


def last_feature_map(trunk: Any) -> Any:
    """The module of a trunk from :func:`build_backbone` whose output is its last spatial feature map."""
    return trunk.get_submodule(ARCHITECTURES[trunk.backbone_name].last_map)


def _weights_fix(name: str) -> str:
    return (f"give a local .pt/.pth state dict of torchvision's {name} (torch.save(model.state_dict(), F)), "
            "or leave weights empty for random initialisation")


def require_weights_file(path: Path | str, name: str) -> Path:
    """The weights file as a Path; CheckpointError naming it and the fix when it does not exist.

    Cheap (no torch import), so launchers call it on the login node before anything is queued.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist: {_weights_fix(name)}")
    return path


def load_weights_file(path: Path | str, name: str) -> tuple[dict[str, Any], bool | None]:
    """(state dict with torchvision key names, transform_input or None) from a local weights file."""
    import pickle

    import torch

    path = require_weights_file(path, name)
    fix = _weights_fix(name)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError,
            ImportError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"weights file {path} cannot be loaded as a torch state dict ({first}): {fix}") from exc
    transform_input = None
    if isinstance(payload, dict) and "hpcvid_backbone" in payload:
        if payload["hpcvid_backbone"] != name:
            raise CheckpointError(f"weights file {path} holds a {payload['hpcvid_backbone']} backbone, not {name}: "
                                  f"set backbone = '{payload['hpcvid_backbone']}' or give {name} weights")
        transform_input = bool(payload.get("transform_input", False))
        payload = payload.get("state_dict")
    elif isinstance(payload, dict):
        for key in ("state_dict", "model"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(f"weights file {path} is not a state dict (a dict of tensors): {fix}")
    state = {}
    for key, value in payload.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith(("aux1.", "aux2.")):
            continue
        state[key] = value
    return state, transform_input


def build_backbone(name: str, weights: str | Path = "", num_classes: int | None = None) -> Backbone:
    """(trunk, head, feature_dim) of ``name``, one of :data:`BACKBONES`.

    ``weights``: a local file (see module docstring) or "" for random initialisation.
    ``num_classes``: None keeps the file's own classifier as head (e.g. ImageNet's 1000 classes, for
    per-frame scores) or no head when the file has none / there is no file; an int gives a head with
    that many outputs, loaded from the file when its last layer has exactly that shape, else newly
    initialised.
    The trunk carries ``random_init`` (bool) and ``weights_source`` (str) for the record.
    """
    from torch import nn

    if name not in ARCHITECTURES:
        raise ConfigError(f"backbone {name!r} is unknown; choose one of {', '.join(BACKBONES)}")
    dim, prefix = FEATURE_DIMS[name], ARCHITECTURES[name].head + "."
    state: dict[str, Any] = {}
    transform_input = False
    if weights:
        state, saved_transform = load_weights_file(weights, name)
        transform_input = (name == "googlenet") if saved_transform is None else saved_transform
    model = _torchvision_model(name, transform_input)
    fc_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    trunk_state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    _replace_module(model, ARCHITECTURES[name].head, nn.Identity())
    if weights:
        try:
            model.load_state_dict(trunk_state, strict=True)
        except RuntimeError as exc:
            missing = [k for k in model.state_dict() if k not in trunk_state]
            unexpected = [k for k in trunk_state if k not in model.state_dict()]
            detail = (f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                      f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
            if not missing and not unexpected:
                detail = (str(exc).strip().splitlines() or [""])[-1].strip()
            raise CheckpointError(f"weights file {weights} does not fit torchvision's {name} ({detail}): "
                                  f"was it saved from a different network? Give {name} weights or set "
                                  "backbone to match the file") from exc
    head = _build_head(dim, num_classes, fc_state, weights)
    model.random_init = not weights
    model.weights_source = str(weights) if weights else "random initialisation"
    model.backbone_name = name
    if not weights:
        log.warning("backbone %s: RANDOM INITIALISATION (no weights file given)", name)
    return Backbone(model, head, dim)


def _build_head(dim: int, num_classes: int | None, fc_state: dict[str, Any], weights: str | Path):
    from torch import nn

    saved_classes = int(fc_state["weight"].shape[0]) if "weight" in fc_state else None
    if num_classes is None:
        if saved_classes is None:
            return None
        num_classes = saved_classes
    head = nn.Linear(dim, num_classes)
    if saved_classes == num_classes and "bias" in fc_state:
        if tuple(fc_state["weight"].shape) != (num_classes, dim):
            raise CheckpointError(f"weights file {weights}: the last layer's weight has shape "
                                  f"{tuple(fc_state['weight'].shape)}, expected ({num_classes}, {dim}): was it "
                                  "saved from a different network?")
        head.load_state_dict({"weight": fc_state["weight"], "bias": fc_state["bias"]})
    return head


def save_backbone(trunk, head, path: Path | str, name: str | None = None) -> Path:
    """Write trunk (+ head under its architecture's name) atomically in the format :func:`build_backbone` reads."""
    import torch

    from hpcvid.fileio import atomic_path

    name = name or getattr(trunk, "backbone_name", None)
    if name not in ARCHITECTURES:
        raise ValueError(f"cannot tell which backbone this is ({name!r}); pass name=")
    state = {k: v.detach().cpu() for k, v in trunk.state_dict().items()}
    if head is not None:
        prefix = ARCHITECTURES[name].head
        state.update({f"{prefix}.{k}": v.detach().cpu() for k, v in head.state_dict().items()})
    payload = {"hpcvid_backbone": name, "transform_input": bool(getattr(trunk, "transform_input", False)),
               "state_dict": state}
    path = Path(path)
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return path


def preprocess(frames, device=None, channels_last: bool = True):
    """uint8 (T, H, W, 3) RGB (numpy or tensor) -> float32 (T, 3, H, W) ImageNet-normalised tensor."""
    import numpy as np
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {tensor.dtype} {tuple(tensor.shape)}")
    if device is not None:
        tensor = tensor.to(device, non_blocking=True)
    mean = torch.tensor(IMAGENET_MEAN, device=tensor.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=tensor.device).view(1, 3, 1, 1) * 255.0
    batch = (tensor.permute(0, 3, 1, 2).float() - mean) / std
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch.contiguous()
