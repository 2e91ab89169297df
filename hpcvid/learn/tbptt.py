"""Truncated backpropagation through time for the LSTM.

A sequence of L steps is cut into chunks of K steps. Each chunk runs forward from the state the previous
chunk left (so information flows across the whole sequence), its weighted loss is backpropagated and the
caller's ``after_backward`` makes the optimiser step; then the state is *detached*, so no gradient crosses
the cut. With K = L this is exactly full backpropagation through time.

The loss is weighted toward the end of the sequence (later steps have seen more of the video): the
weights of all L steps sum to 1, so the per-chunk losses add up to the weighted sequence loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

WEIGHTINGS = ("linear", "uniform", "last")


def loss_weights(length: int, scheme: str = "linear") -> torch.Tensor:
    """Per-step weights (sum 1): 'linear' grows as t+1, 'uniform' is flat, 'last' keeps only the last step."""
    if scheme == "linear":
        raw = torch.arange(1, length + 1, dtype=torch.float32)
    elif scheme == "uniform":
        raw = torch.ones(length)
    elif scheme == "last":
        raw = torch.zeros(length)
        raw[-1] = 1.0
    else:
        raise ValueError(f"unknown loss weighting {scheme!r}; choose one of {', '.join(WEIGHTINGS)}")
    return raw / raw.sum()


def chunk_bounds(length: int, chunk: int) -> list[tuple[int, int]]:
    """[(0, K), (K, 2K), ...]; the last chunk may be shorter."""
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]


def detach_state(state: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
    return None if state is None else tuple(s.detach() for s in state)


def weighted_sequence_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t * mean_b CE(logits[b, t], y_b) for logits ``(B, T, C)`` and weights ``(T,)``."""
    batch, steps, classes = logits.shape
    per_step = F.cross_entropy(logits.reshape(batch * steps, classes).float(),
                               labels.repeat_interleave(steps), reduction="none").view(batch, steps)
    return (per_step.mean(0) * weights.to(per_step.device)).sum()


@dataclass
class SequenceResult:
    loss: float                 # the weighted sequence loss (sum of the chunk losses)
    logits: torch.Tensor        # (B, L, C), detached: for accuracy at the last step
    chunks: int


def train_sequence(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk: int,
    weights: torch.Tensor,
    after_backward: Callable[[], None] = lambda: None,
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
    autocast: Callable[[], object] | None = None,
) -> SequenceResult:
    """One truncated-BPTT pass over ``inputs (B, L, D)``: per chunk forward, backward, ``after_backward``.

    ``model(x, state, return_state=True)`` must return ``(logits (B, k, C), state)``. ``after_backward``
    is where the trainer clips gradients, steps the optimiser and zeroes the gradients (once per chunk);
    ``backward`` lets AMP scale the loss.
    """
    import contextlib

    length = inputs.shape[1]
    state = None
    total = 0.0
    outputs = []
    bounds = chunk_bounds(length, chunk)
    for start, stop in bounds:
        with (autocast() if autocast is not None else contextlib.nullcontext()):
            logits, state = model(inputs[:, start:stop], state, return_state=True)
            loss = weighted_sequence_loss(logits, labels, weights[start:stop])
        backward(loss)
        after_backward()
        state = detach_state(state)
        total += float(loss.detach())
        outputs.append(logits.detach())
    return SequenceResult(total, torch.cat(outputs, dim=1), len(bounds))
