"""The networks of the model kinds; which kind uses which class is said by its module (:mod:`hpcvid.learn.kinds`).

Forward contracts (shared with evaluation; inputs are prepared by :mod:`hpcvid.learn.datasets`):

* ``frame``:     ``(B, 3, H, W)`` preprocessed RGB          -> ``(B, C)`` logits
* ``flow``:      ``(B, 2L, H, W)`` stacked, camera-compensated flow (u0, v0, u1, v1, ...) -> ``(B, C)``
* ``twostream``: ``(rgb (B, 3, H, W), flow (B, 2L, H, W))`` -> ``(B, C)``: mid-level fusion (the two trunks'
  feature maps concatenated, 1x1 conv, pool, classifier); :func:`late_fusion` combines scores instead.
* ``lstm``:      ``(B, T, D)`` prepared per-frame features  -> ``(B, T, C)`` per-step logits; with
  ``return_state=True`` also the ``(h, c)`` state, which truncated BPTT carries across chunks.
* ``tsn_*``:     ``(B, K, c, H, W)``: K snippets (c = 3 for one RGB frame, 2L for L flow fields, 3L for L
  RGB differences) -> ``(B, C)``: the segments' logits averaged (the consensus).
* ``c3d``:       ``(B, 3, T, H, W)`` a clip of T frames       -> ``(B, C)``.
* ``cnnlstm``:   ``(B, T, 3, H, W)`` T preprocessed frames    -> ``(B, T, C)`` per-step logits.

Every model records its constructor arguments in ``init_args`` so a checkpoint rebuilds the exact
architecture (:func:`build_from_args`). Backbones: ``"small"`` is a four-layer CNN with GroupNorm (fast on
a CPU, and independent of the per-process batch so DDP equals one big batch); the others (ResNet-18/50/101,
VGG-16, GoogLeNet, MobileNetV3) come from :func:`hpcvid.learn.backbones.build_backbone` (local weights or
random init). A trunk's :func:`cam_layer` is the module whose output Grad-CAM weighs.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


# ------------------------------------------------------------------------------------------ trunks
class SmallCNN(nn.Module):
    """A CPU-demo trunk: four strided conv blocks with GroupNorm; 4 * width channels out."""

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, 4 * width]
        blocks: list[nn.Module] = []
        for i in range(4):
            blocks += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1, bias=False),
                       nn.GroupNorm(min(8, chans[i + 1]), chans[i + 1]), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*blocks)
        self.out_channels = chans[-1]

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))


class PooledTrunk(nn.Module):
    """Wraps a backbone trunk ``(B, C, H, W) -> (B, D)``; its 'feature map' is the pooled vector as 1x1."""

    def __init__(self, trunk: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.out_channels = feature_dim

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).flatten(1)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).flatten(1)


def widen_first_conv(module: nn.Module, in_channels: int) -> None:
    """Replace the first 3-channel Conv2d by one taking ``in_channels``: RGB weights averaged and repeated.

    The cross-modality initialisation of the two-stream literature: a flow trunk starts from an RGB
    network by giving each flow channel the mean of the three RGB filters.
    """
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                wide = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride,
                                 child.padding, child.dilation, child.groups, child.bias is not None)
                with torch.no_grad():
                    mean = child.weight.mean(dim=1, keepdim=True)
                    wide.weight.copy_(mean.repeat(1, in_channels, 1, 1))
                    if child.bias is not None:
                        wide.bias.copy_(child.bias)
                setattr(parent, name, wide)
                return
    raise ValueError("the backbone has no 3-channel Conv2d to widen")


def build_trunk(backbone: str, weights: str = "", in_channels: int = 3) -> nn.Module:
    """A trunk with ``feature_map`` and pooled ``forward`` and an ``out_channels`` attribute.

    A trunk for other inputs than RGB (stacked flow, RGB differences) starts from the RGB network with
    its first convolution widened (:func:`widen_first_conv`); GoogLeNet's re-mapping of the three RGB
    channels (``transform_input``) is switched off for it, as it has no meaning there.
    """
    if backbone == "small":
        return SmallCNN(in_channels)
    from hpcvid.learn.backbones import build_backbone  # only when a torchvision backbone is asked for

    trunk, _head, feature_dim = build_backbone(backbone, weights or "")
    if in_channels != 3:
        widen_first_conv(trunk, in_channels)
        if hasattr(trunk, "transform_input"):
            trunk.transform_input = False
    return PooledTrunk(trunk, feature_dim)


def cam_layer(trunk: nn.Module) -> nn.Module:
    """The module of a trunk (:func:`build_trunk`) whose output is its last spatial feature map."""
    if isinstance(trunk, SmallCNN):
        return trunk.body
    from hpcvid.learn.backbones import last_feature_map

    return last_feature_map(trunk.trunk)


def freeze_bn_statistics(module: nn.Module, keep_first: bool = True) -> int:
    """Put every BatchNorm layer (but the first, with ``keep_first``) in eval mode; returns how many.

    Partial batch normalisation: with small batches (and few videos per class) the running statistics of
    a pretrained network are better than those re-estimated from the batch; the first layer's are still
    updated, because the input's distribution (flow, RGB differences, another dataset) differs from the
    pretraining's. Called after every ``train()``, which would otherwise switch them back to batch statistics.
    """
    frozen = 0
    for layer in (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        if keep_first:
            keep_first = False
            continue
        layer.eval()
        frozen += 1
    return frozen


def _frozen(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


# ------------------------------------------------------------------------------------------ models
class FrameModel(nn.Module):
    """Single-frame CNN: a trunk (fine-tuned or frozen) and a new head for the dataset's classes."""

    kind = "frame"

    def __init__(self, num_classes: int, backbone: str = "small", weights: str = "",
                 freeze_trunk: bool = False, dropout: float = 0.2) -> None:
        super().__init__()
        self.init_args = {"num_classes": num_classes, "backbone": backbone, "weights": weights,
                          "freeze_trunk": freeze_trunk, "dropout": dropout}
        self.trunk = build_trunk(backbone, weights, 3)
        if freeze_trunk:
            _frozen(self.trunk)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.trunk.out_channels, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.trunk.out_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled per-image features ``(B, D)`` (what refeature stores for the LSTM)."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.trunk(x)))


class FlowModel(nn.Module):
    """CNN on a stack of ``stack`` flow fields (2 * stack channels)."""

    kind = "flow"

    def __init__(self, num_classes: int, stack: int = 10, backbone: str = "small", weights: str = "",
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.init_args = {"num_classes": num_classes, "stack": stack, "backbone": backbone,
                          "weights": weights, "dropout": dropout}
        self.stack = stack
        self.trunk = build_trunk(backbone, weights, 2 * stack)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.trunk.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.trunk(x)))


class TwoStreamModel(nn.Module):
    """Mid-level fusion: concatenate the RGB and flow trunks' feature maps, 1x1 conv, pool, classify.

    Start it from trained ``frame`` and ``flow`` models with :meth:`init_from`; the maps are brought to
    the smaller of the two spatial sizes by average pooling before concatenation.
    """

    kind = "twostream"

    def __init__(self, num_classes: int, stack: int = 10, backbone: str = "small", weights: str = "",
                 fused_channels: int = 128, dropout: float = 0.5) -> None:
        super().__init__()
        self.init_args = {"num_classes": num_classes, "stack": stack, "backbone": backbone, "weights": weights,
                          "fused_channels": fused_channels, "dropout": dropout}
        self.rgb = FrameModel(num_classes, backbone, weights, dropout=dropout)
        self.flow = FlowModel(num_classes, stack, backbone, weights, dropout=dropout)
        # the single-stream heads are kept (frozen) for late fusion; mid-level fusion does not use them
        _frozen(self.rgb.head)
        _frozen(self.flow.head)
        both = self.rgb.trunk.out_channels + self.flow.trunk.out_channels
        self.fuse = nn.Sequential(nn.Conv2d(both, fused_channels, 1), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(fused_channels, num_classes)

    def init_from(self, frame_state: dict[str, torch.Tensor] | None, flow_state: dict[str, torch.Tensor] | None) -> None:
        """Copy trained single-stream weights (state dicts of FrameModel / FlowModel) into the streams."""
        if frame_state is not None:
            self.rgb.load_state_dict(frame_state)
        if flow_state is not None:
            self.flow.load_state_dict(flow_state)

    def late(self, rgb: torch.Tensor, flow: torch.Tensor, weights: tuple[float, ...] = (1.0, 1.5)) -> torch.Tensor:
        """Late fusion with the streams' own heads (as trained in the frame and flow runs): probabilities."""
        return late_fusion(self.rgb(rgb), self.flow(flow), weights)

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        a = self.rgb.trunk.feature_map(rgb)
        b = self.flow.trunk.feature_map(flow)
        size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
        if a.shape[2:] != size:
            a = F.adaptive_avg_pool2d(a, size)
        if b.shape[2:] != size:
            b = F.adaptive_avg_pool2d(b, size)
        fused = self.fuse(torch.cat([a, b], dim=1)).mean(dim=(2, 3))
        return self.head(self.dropout(fused))


def late_fusion(rgb_scores: torch.Tensor, flow_scores: torch.Tensor,
                weights: tuple[float, ...] = (1.0, 1.5)) -> torch.Tensor:
    """Weighted average of the two streams' softmax scores (the two-stream paper weighs flow higher)."""
    w_rgb, w_flow = float(weights[0]), float(weights[1])
    total = w_rgb + w_flow
    return (w_rgb * rgb_scores.softmax(-1) + w_flow * flow_scores.softmax(-1)) / total


class LSTMModel(nn.Module):
    """Stacked LSTM over per-frame features with a classifier at every step."""

    kind = "lstm"

    def __init__(self, num_classes: int, input_dim: int, hidden: int = 256, layers: int = 2,
                 dropout: float = 0.2, input_norm: bool = False, mean_scale: float = 1.0) -> None:
        super().__init__()
        self.init_args = {"num_classes": num_classes, "input_dim": input_dim, "hidden": hidden,
                          "layers": layers, "dropout": dropout, "input_norm": input_norm, "mean_scale": mean_scale}
        self.input_norm = input_norm
        # Temporally centred input is [x_t - clip mean, clip mean]; the second half is multiplied by
        # mean_scale. At full scale the clip mean lets the LSTM memorise the training clips before it learns
        # any motion (synthetic set: 45 % -> 80-90 % test accuracy with 0.03-0.1).
        self.mean_scale = float(mean_scale)
        self.input_dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(input_dim, hidden, num_layers=layers, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None,
                return_state: bool = False) -> Any:
        if self.mean_scale != 1.0:
            half = x.shape[-1] // 2
            x = torch.cat([x[..., :half], x[..., half:] * self.mean_scale], dim=-1)
        if self.input_norm:
            x = relative_standardise(x, dim=-1)
        out, new_state = self.lstm(self.input_dropout(x), state)
        logits = self.head(out)
        return (logits, new_state) if return_state else logits


SNIPPET_CHANNELS = {"rgb": lambda stack: 3, "flow": lambda stack: 2 * stack, "diff": lambda stack: 3 * stack}


class TSNModel(nn.Module):
    """Temporal segment network: one trunk classifies each segment's snippet; the logits are averaged.

    ``modality`` says what a snippet is: one RGB frame (``rgb``), ``stack`` flow fields (``flow``, 2 *
    stack channels) or ``stack`` differences of consecutive RGB frames (``diff``, 3 * stack channels); the
    trunk's first convolution is widened for the last two. With ``partial_bn`` every BatchNorm layer but the
    first keeps its running statistics during training (:func:`freeze_bn_statistics`).
    """

    def __init__(self, num_classes: int, modality: str = "rgb", segments: int = 3, stack: int = 5,
                 backbone: str = "small", weights: str = "", dropout: float = 0.5, partial_bn: bool = False) -> None:
        super().__init__()
        if modality not in SNIPPET_CHANNELS:
            raise ValueError(f"unknown TSN modality {modality!r}; choose one of {', '.join(SNIPPET_CHANNELS)}")
        self.init_args = {"num_classes": num_classes, "modality": modality, "segments": segments, "stack": stack,
                          "backbone": backbone, "weights": weights, "dropout": dropout, "partial_bn": partial_bn}
        self.modality, self.segments, self.stack, self.partial_bn = modality, segments, stack, partial_bn
        self.trunk = build_trunk(backbone, weights, SNIPPET_CHANNELS[modality](stack))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.trunk.out_channels, num_classes)

    def snippet_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, K, c, H, W)`` -> each snippet's logits ``(B, K, C)``."""
        batch, segments = x.shape[:2]
        return self.head(self.dropout(self.trunk(x.flatten(0, 1)))).view(batch, segments, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.snippet_logits(x).mean(dim=1)

    def train(self, mode: bool = True) -> "TSNModel":
        super().train(mode)
        if mode and self.partial_bn:
            freeze_bn_statistics(self)
        return self


class C3DModel(nn.Module):
    """3D convolutions over a clip: C3D's eight 3x3x3 conv layers and five max-pools, two FC layers.

    ``width`` is the first layer's channels (C3D: 64; then 2x, 4x, 4x, 8x ... as in the paper) and ``fc`` the
    size of the two hidden FC layers (C3D: 4096), so the same architecture fits a CPU demo when narrowed.
    The first pool keeps time; the others halve time while it is longer than 1 (clips shorter than C3D's 16
    frames still fit). The FC layers read the globally pooled last map, so any crop size fits (C3D
    flattens the 4 x 4 map of its 112 px crops).
    """

    def __init__(self, num_classes: int, width: int = 64, fc: int = 4096, dropout: float = 0.5) -> None:
        super().__init__()
        self.init_args = {"num_classes": num_classes, "width": width, "fc": fc, "dropout": dropout}
        w = width
        # (out channels of each conv layer, then "pool") in C3D's order: conv1a pool1 conv2a pool2 ...
        plan = [w, "pool", 2 * w, "pool", 4 * w, 4 * w, "pool", 8 * w, 8 * w, "pool", 8 * w, 8 * w, "pool"]
        layers: list[nn.Module] = []
        channels = 3
        for step in plan:
            if step == "pool":
                layers.append(_ClipPool(keep_time=not any(isinstance(m, _ClipPool) for m in layers)))
            else:
                layers += [nn.Conv3d(channels, int(step), 3, padding=1), nn.ReLU(inplace=True)]
                channels = int(step)
        self.features = nn.Sequential(*layers[:-1])          # up to conv5b's ReLU: the last map (Grad-CAM)
        self.pool5 = layers[-1]
        self.classifier = nn.Sequential(nn.Linear(channels, fc), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                        nn.Linear(fc, fc), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                        nn.Linear(fc, num_classes))
        # He initialisation: eight ReLU layers without normalisation shrink the signal under torch's default
        # (on the demo set a narrow C3D stalled at 67 %, one appearance's three motions taken for one)
        for conv in (m for m in self.features if isinstance(m, nn.Conv3d)):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool5(self.features(x)).mean(dim=(2, 3, 4)))


class _ClipPool(nn.Module):
    """C3D's max-pool: 1x2x2 for the first (time kept), else 2x2x2 while time is longer than 1."""

    def __init__(self, keep_time: bool) -> None:
        super().__init__()
        self.keep_time = keep_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time = 1 if self.keep_time or x.shape[2] < 2 else 2
        kernel = (time, min(2, x.shape[3]), min(2, x.shape[4]))
        return F.max_pool3d(x, kernel, kernel)


def temporal_centring(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, D)`` -> ``(B, T, 2D)``: each step minus the clip's mean, with the clip's mean appended.

    The same input as :func:`hpcvid.learn.datasets.centre_in_time` gives the feature LSTM, computed
    inside the model so that gradients reach the CNN.
    """
    mean = x.mean(dim=1, keepdim=True)
    return torch.cat([x - mean, mean.expand_as(x)], dim=-1)


class CNNLSTMModel(nn.Module):
    """End-to-end CNN + LSTM: a trunk on every frame, an LSTM over the frames' features, trained jointly.

    The recurrent part is :class:`LSTMModel` (its input dropout, stacked layers, per-step classifier and
    the weight ``mean_scale`` of the appended clip mean); with ``centring`` its input is the trunk's
    features centred in time (:func:`temporal_centring`), which kept the feature LSTM from memorising clips.
    """

    def __init__(self, num_classes: int, backbone: str = "small", weights: str = "", hidden: int = 256,
                 layers: int = 1, dropout: float = 0.2, centring: bool = True, mean_scale: float = 0.05) -> None:
        super().__init__()
        self.init_args = {"num_classes": num_classes, "backbone": backbone, "weights": weights, "hidden": hidden,
                          "layers": layers, "dropout": dropout, "centring": centring, "mean_scale": mean_scale}
        self.centring = centring
        self.trunk = build_trunk(backbone, weights, 3)
        dim = self.trunk.out_channels
        self.lstm = LSTMModel(num_classes, 2 * dim if centring else dim, hidden, layers, dropout,
                              mean_scale=mean_scale if centring else 1.0)

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` -> the trunk's features ``(B, T, D)``."""
        batch, steps = x.shape[:2]
        return self.trunk(x.flatten(0, 1)).view(batch, steps, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.frame_features(x)
        return self.lstm(temporal_centring(features) if self.centring else features)


def relative_standardise(x: torch.Tensor, dim: int = -1, rel_eps: float = 1e-3) -> torch.Tensor:
    """(x - mean) / (std + eps) with eps relative to the data's own scale (features may be ~1e-12)."""
    centred = x - x.mean(dim=dim, keepdim=True)
    std = centred.pow(2).mean(dim=dim, keepdim=True).sqrt()
    eps = rel_eps * std.mean() + torch.finfo(x.dtype).tiny
    return centred / (std + eps)


def build_from_args(kind: str, init_args: dict[str, Any], *, keep_weights_path: bool = False) -> nn.Module:
    """Rebuild a model of ``kind`` from a checkpoint's ``init_args`` (weights come from the checkpoint, not the file)."""
    from hpcvid.learn.kinds import get_kind

    args = dict(init_args)
    if not keep_weights_path and "weights" in args:
        args["weights"] = ""
    return get_kind(kind).implementation().MODEL(**args)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel (or the model itself)."""
    return getattr(model, "module", model)
