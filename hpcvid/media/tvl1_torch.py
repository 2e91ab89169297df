"""TV-L1 optical flow written with torch tensor operations, batched over frame pairs, on the CPU or a GPU.

The method is the dual TV-L1 of Zach, Pock and Bischof (2007) as described by Sánchez, Meinhardt-Llopis and
Facciolo (IPOL 2013) and as ``cv2.optflow.DualTVL1OpticalFlow`` runs it, step for step and with the same
parameters, so that a flow field computed here can stand in for OpenCV's in the two-stream recipe:

* a pyramid of ``nscales`` levels, each ``scale_step`` times the previous one (bilinear, OpenCV's pixel-centre
  convention), stopping before a side would drop under 16 pixels; the flow starts at zero on the coarsest
  level and is resized (bilinear) and multiplied by ``1 / scale_step`` on the way down;
* per level, ``warps`` times: the second frame and its centred gradient are warped by the current flow
  (bicubic, zero outside the frame, as ``cv2.remap(INTER_CUBIC)`` with its default constant border);
* per warp, up to ``outer_iterations`` blocks of up to ``inner_iterations`` primal-dual (Chambolle) steps:
  the pointwise thresholding of the linearised data term (the TH step), the primal update
  ``u = v + theta * div(p)`` and the dual update ``p = (p + tau/theta * grad u) / (1 + tau/theta * |grad u|)``;
  a ``median_filtering`` x ``median_filtering`` median filter of the flow before each block (OpenCV's
  outlier removal); the warp ends early once a step moves the flow by less than ``epsilon`` pixels
  (root mean square), OpenCV's stopping rule.

Batching: every tensor carries the pair as its first dimension and the stopping rule is kept per pair (a
pair that has converged is frozen while the others go on), so a batch gives the same flow as its pairs one
by one. Convention and units as OpenCV: ``flow[n, y, x] = (dx, dy)`` in pixels, from frame t to frame t+1.

Where this differs from OpenCV: ``cv2.remap`` rounds sampling positions to 1/32 pixel and tabulates its cubic
weights, and OpenCV's thresholding treats ``|grad I1w|^2`` below float epsilon as a third case (the two agree
wherever the gradient is not ~0, and there the update is ~0 either way). With float rounding, that leaves the
two flows ~0.01-0.02 px apart on average (at most ~0.1 px) on the synthetic set and on textured test images,
far below either method's error against the true motion.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hpcvid.errors import ConfigError

MIN_LEVEL_SIDE = 16
"""OpenCV stops building the pyramid before a level narrower or lower than this (pixels)."""
_FLOAT_EPSILON = float(np.finfo(np.float32).eps)


def _cv_round(value: float) -> int:
    """OpenCV's ``cvRound`` (half to even), which sizes a level resized by a factor."""
    return int(round(value))


def resize_matrix(n_in: int, n_out: int, src_per_dst: float, device: Any = None) -> torch.Tensor:
    """(n_out, n_in) weights of OpenCV's bilinear resize along one axis.

    OpenCV maps output pixel d to input position ``(d + 0.5) * src_per_dst - 0.5`` and clamps at the
    borders; a matrix product applies it to a whole batch at once (on a GPU that is one GEMM per axis).
    """
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    for d in range(n_out):
        position = (d + 0.5) * src_per_dst - 0.5
        left = math.floor(position)
        frac = position - left
        if left < 0:
            left, frac = 0, 0.0
        if left >= n_in - 1:
            left, frac = n_in - 1, 0.0
        weights[d, left] += 1.0 - frac
        if frac:
            weights[d, left + 1] += frac
    return weights.to(device=device, dtype=torch.float32)


def _resize(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of (..., H, W) with the matrices of :func:`resize_matrix`."""
    return rows @ images @ cols.T


def pyramid_sizes(height: int, width: int, nscales: int, scale_step: float) -> list[tuple[int, int]]:
    """The (height, width) of each pyramid level, finest first, as OpenCV sizes them."""
    sizes = [(height, width)]
    for _ in range(1, nscales):
        h, w = _cv_round(sizes[-1][0] * scale_step), _cv_round(sizes[-1][1] * scale_step)
        if h < MIN_LEVEL_SIDE or w < MIN_LEVEL_SIDE:
            break
        sizes.append((h, w))
    return sizes


def _centred_gradient(image: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, 2, H, W) central differences, one-sided (halved) at the borders, as OpenCV."""
    padded = F.pad(image[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    dx = 0.5 * (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2])
    dy = 0.5 * (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1])
    return torch.stack((dx, dy), dim=1)


def _forward_gradient(u: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> ``out`` (N, C, 2, H, W): forward differences, zero on the last column / row.

    ``out`` is reused across steps (its last column and row are zero once and stay so), which spares an
    allocation and a fill per step."""
    torch.sub(u[..., 1:], u[..., :-1], out=out[:, :, 0, :, :-1])
    torch.sub(u[..., 1:, :], u[..., :-1, :], out=out[:, :, 1, :-1, :])
    return out


def _divergence(p: torch.Tensor) -> torch.Tensor:
    """(N, C, 2, H, W) -> (N, C, H, W) backward differences with zero before the first column / row:
    the negative adjoint of :func:`_forward_gradient`, which keeps the dual step a projection."""
    px, py = p[:, :, 0], p[:, :, 1]
    div = px + py
    div[..., 1:] -= px[..., :-1]
    div[..., 1:, :] -= py[..., :-1, :]
    return div


def primal_dual_step(u: torch.Tensor, dual: torch.Tensor, gradient: torch.Tensor, rho_c: torch.Tensor,
                     i1w_grad: torch.Tensor, neg_inv_grad: torch.Tensor, l_t: float, theta: float, taut: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step for the whole batch: (new flow, new dual variable, per-pair sum of squared flow changes).

    ``u`` and ``dual`` are left as they are (a converged pair keeps its old values); ``gradient`` is the
    reused buffer of :func:`_forward_gradient`. Intermediates are updated in place: each operation is one
    pass over the batch in memory, and fresh tensors made the step 2x slower on this CPU.
    """
    # TH: the minimiser of the linearised data term, a move along grad I1w of at most lambda * theta * |grad|.
    rho = rho_c + (i1w_grad * u).sum(dim=1)
    move = (rho * neg_inv_grad).clamp_(-l_t, l_t)
    new_u = torch.addcmul(u, move[:, None], i1w_grad)
    new_u.add_(_divergence(dual), alpha=theta)
    error = (new_u - u).square_().sum(dim=(1, 2, 3))
    _forward_gradient(new_u, gradient)
    norm = torch.hypot(gradient[:, :, 0], gradient[:, :, 1])[:, :, None]
    new_dual = torch.add(dual, gradient, alpha=taut).div_(norm.mul_(taut).add_(1.0))
    return new_u, new_dual, error


@functools.lru_cache(maxsize=1)
def compiled_step() -> Any:
    """:func:`primal_dual_step` through ``torch.compile``: compiled on its first call (about 30 s on this machine's
    CPU), for any batch and level size (dynamic shapes), then reused by the whole process."""
    return torch.compile(primal_dual_step, dynamic=True)


@functools.lru_cache(maxsize=None)
def selection_network(count: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """Compare-exchange steps ``(a, b, keep_min, keep_max)`` that leave the median of ``count`` values on wire
    ``count // 2``: Batcher's odd-even merge sort for the next power of two, with the wires above ``count``
    read as +inf (their comparators do nothing) and every step that cannot reach the median dropped.

    Why a network: elementwise minimum/maximum over whole images is what tensors do fast; ``torch.median``
    over unfolded windows sorts each pixel's window on its own and was 2.5x slower on this CPU (5x5).
    """
    size = 1 << max(count - 1, 1).bit_length()
    steps = []
    merge = 1
    while merge < size:  # Batcher (1968), odd-even merge sort, as comparator pairs (low wire, high wire)
        gap = merge
        while gap >= 1:
            for start in range(gap % merge, size - gap, 2 * gap):
                for i in range(min(gap, size - start - gap)):
                    if (i + start) // (2 * merge) == (i + start + gap) // (2 * merge):
                        steps.append((i + start, i + start + gap))
            gap //= 2
        merge *= 2
    # A comparator never lifts a finite value above +inf, so the padded wires stay on top: skip them.
    steps = [(a, b) for a, b in steps if b < count]
    needed, kept = {count // 2}, []
    for a, b in reversed(steps):
        keep_min, keep_max = a in needed, b in needed
        if keep_min or keep_max:
            kept.append((a, b, keep_min, keep_max))
            needed |= {a, b}
    return tuple(reversed(kept))


def median_filter(u: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) median over size x size windows, border replicated (``cv2.medianBlur`` on float)."""
    radius = size // 2
    h, w = u.shape[-2:]
    padded = F.pad(u, (radius, radius, radius, radius), mode="replicate")
    wires = [padded[..., i:i + h, j:j + w] for i in range(size) for j in range(size)]
    for a, b, keep_min, keep_max in selection_network(size * size):
        low = torch.minimum(wires[a], wires[b]) if keep_min else None
        if keep_max:
            wires[b] = torch.maximum(wires[a], wires[b])
        if keep_min:
            wires[a] = low
    return wires[(size * size) // 2].contiguous()


def _warp(stack: torch.Tensor, u: torch.Tensor, base_x: torch.Tensor, base_y: torch.Tensor) -> torch.Tensor:
    """Sample (N, C, H, W) at (x + u1, y + u2): bicubic, zero outside, like ``cv2.remap(INTER_CUBIC)``."""
    h, w = stack.shape[-2:]
    gx = (base_x + u[:, 0]) * (2.0 / max(w - 1, 1)) - 1.0
    gy = (base_y + u[:, 1]) * (2.0 / max(h - 1, 1)) - 1.0
    return F.grid_sample(stack, torch.stack((gx, gy), dim=-1), mode="bicubic", padding_mode="zeros",
                         align_corners=True)


def _one_scale(i0: torch.Tensor, i1: torch.Tensor, u: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    """Refine the flow ``u`` (N, 2, H, W) of one pyramid level; returns the new flow."""
    step = compiled_step() if p["compile"] else primal_dual_step
    n, _, h, w = u.shape
    device = u.device
    scaled_epsilon = p["epsilon"] ** 2 * h * w
    l_t = p["lambda_"] * p["theta"]
    taut = p["tau"] / p["theta"]
    theta = p["theta"]
    # On a GPU every `.any()` waits for the device: ask once per block there, every step on the CPU.
    sync_every_step = device.type == "cpu"
    stack = torch.cat((i1[:, None], _centred_gradient(i1)), dim=1)  # I1 and its gradient, warped together
    base_y, base_x = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                    torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    for _ in range(p["warps"]):
        warped = _warp(stack, u, base_x, base_y)
        i1w, i1w_grad = warped[:, 0], warped[:, 1:]
        grad_sq = (i1w_grad * i1w_grad).sum(dim=1)
        rho_c = i1w - (i1w_grad * u).sum(dim=1) - i0
        neg_inv_grad = -1.0 / grad_sq.clamp_min(_FLOAT_EPSILON)
        dual = torch.zeros(n, 2, 2, h, w, dtype=u.dtype, device=device)
        gradient = torch.zeros_like(dual)
        active = torch.ones(n, dtype=torch.bool, device=device)
        for _ in range(p["outer_iterations"]):
            if not bool(active.any()):
                break
            if p["median_filtering"] > 1:
                u = torch.where(active[:, None, None, None], median_filter(u, p["median_filtering"]), u)
            for _ in range(p["inner_iterations"]):
                everyone = False  # every pair still iterating: no masking needed (known only where asking is free)
                if sync_every_step:
                    if not bool(active.any()):
                        break
                    everyone = bool(active.all())
                new_u, new_dual, error = step(u, dual, gradient, rho_c, i1w_grad, neg_inv_grad, l_t, theta, taut)
                if everyone:
                    u, dual = new_u, new_dual
                else:
                    keep = active[:, None, None, None]
                    u = torch.where(keep, new_u, u)
                    dual = torch.where(keep[..., None], new_dual, dual)
                active &= error > scaled_epsilon
    return u


def check_parameters(params: dict[str, Any]) -> None:
    """ConfigError for values OpenCV would reject or that make the iteration diverge."""
    for name in ("tau", "lambda_", "theta", "epsilon", "scale_step"):
        if not params[name] > 0:
            raise ConfigError(f"TV-L1 parameter {name} = {params[name]!r} must be > 0")
    if not params["scale_step"] < 1:
        raise ConfigError(f"TV-L1 scale_step = {params['scale_step']!r} must be below 1 (each level is smaller)")
    for name in ("nscales", "warps", "inner_iterations", "outer_iterations"):
        if int(params[name]) < 1:
            raise ConfigError(f"TV-L1 parameter {name} = {params[name]!r} must be at least 1")
    size = int(params["median_filtering"])
    if size > 1 and size % 2 == 0:
        raise ConfigError(f"TV-L1 median_filtering = {size} must be odd (or 1 for none)")


def tvl1_flow(first: torch.Tensor, second: torch.Tensor, *, tau: float = 0.25, lambda_: float = 0.15,
              theta: float = 0.3, nscales: int = 5, warps: int = 5, epsilon: float = 0.01,
              inner_iterations: int = 30, outer_iterations: int = 10, scale_step: float = 0.8,
              median_filtering: int = 5, compile: bool = False) -> torch.Tensor:
    """TV-L1 flow of a batch of grayscale pairs: (N, H, W) frames t and t+1 -> (N, H, W, 2) float32.

    The frames may be uint8 or float on the 0..255 scale (OpenCV's), on any device; the flow comes back on
    the same device. The defaults are OpenCV's (``DualTVL1OpticalFlow_create()``). ``compile`` fuses each
    primal-dual step with ``torch.compile`` (the same arithmetic in fewer passes over memory, which is what
    bounds a GPU here); on this machine's CPU the compiled step was slower than the plain one.
    """
    params = {"tau": tau, "lambda_": lambda_, "theta": theta, "nscales": nscales, "warps": warps,
              "epsilon": epsilon, "inner_iterations": inner_iterations, "outer_iterations": outer_iterations,
              "scale_step": scale_step, "median_filtering": median_filtering}
    check_parameters(params)
    params["compile"] = bool(compile)
    if first.shape != second.shape or first.dim() != 3:
        raise ValueError(f"expected two (N, H, W) batches of the same shape, got {tuple(first.shape)} and "
                         f"{tuple(second.shape)}")
    n, height, width = first.shape
    if height < 3 or width < 3:
        raise ValueError(f"frames of {height}x{width} pixels are too small for TV-L1 (at least 3x3)")
    with torch.inference_mode():
        device = first.device
        levels = [(first.to(torch.float32), second.to(torch.float32))]
        sizes = pyramid_sizes(height, width, nscales, scale_step)
        for (h, w), (nh, nw) in zip(sizes, sizes[1:]):
            rows = resize_matrix(h, nh, 1.0 / scale_step, device)
            cols = resize_matrix(w, nw, 1.0 / scale_step, device)
            levels.append(tuple(_resize(image, rows, cols) for image in levels[-1]))
        u = torch.zeros((n, 2) + sizes[-1], dtype=torch.float32, device=device)
        for level in range(len(sizes) - 1, -1, -1):
            u = _one_scale(*levels[level], u, params)
            if level == 0:
                break
            (h, w), (fine_h, fine_w) = sizes[level], sizes[level - 1]
            rows = resize_matrix(h, fine_h, h / fine_h, device)
            cols = resize_matrix(w, fine_w, w / fine_w, device)
            u = _resize(u, rows, cols) * (1.0 / scale_step)
        return u.permute(0, 2, 3, 1).contiguous()
