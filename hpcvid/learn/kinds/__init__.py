"""The model kinds, as one table: :data:`KINDS` maps each kind's name to a small frozen :class:`ModelKind`.

Everything that lists models or acts per model reads this table: ``train.model``'s valid values, the
``--model`` flags of ``train`` and ``eval``, the report's run order, the demo's steps, the trainer and
evaluation. Adding a model is one entry here and one module that implements it; nothing else changes.

This module imports no torch (the CLI and the config read it on a login node). A kind's module, which
does, is imported by :meth:`ModelKind.implementation` when a model is built, trained or evaluated, and
refused there if it lacks one of these parts:

``MODEL``
    the ``nn.Module`` class (defined in :mod:`hpcvid.learn.models`); its ``init_args`` rebuild it.
``build_data(config, inputs: TrainInputs) -> DataBundle``
    train and validation datasets, the meta a checkpoint keeps for input preparation, and the model's
    input size (``bundle.model_args``), from the videos the train stage selected.
``init_args(config, bundle) -> dict``
    the model's constructor arguments (what a checkpoint stores to rebuild it).
``steps_per_batch(config) -> int``
    optimiser steps one batch makes (the schedule counts them, a mid-epoch resume divides by them).
``train_step(model, inputs, labels, config, tools: StepTools) -> (loss, correct)``
    one batch: forward, backward and optimiser step(s) through ``tools``; mean loss, number correct.
``validation_loss(logits, labels, config) -> (loss, class_logits)``
    the validation loss of the model's output and the ``(B, C)`` logits that accuracy is counted on.
``Scorer(model, meta, run_config, config, device, inputs: EvalInputs)``
    evaluation: ``strategies`` (names, the default first), ``default`` and ``score(video) -> {strategy:
    softmax scores}``; a video it cannot score raises a project error whose message is the reason.
    Optionally ``explain(video, target, frames) -> Explanation``: Grad-CAM heat maps of the input it scores
    (:mod:`hpcvid.learn.gradcam`); ``hpcvid explain`` and ``collect --explain`` skip or refuse a kind
    without it (a model of saved features has no pixels to point at).
``warm_start(model, found)``
    only for kinds with ``starts_from``: ``found`` maps each of those kinds whose trained run exists to
    ``(checkpoint path, payload)``; copy what fits into the new model.

Kind modules never choose files: the train and eval stages select the shards and pass in opened sources,
and the trainer finds the runs a kind starts from.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from hpcvid.errors import ConfigError

# What a kind reads from the extraction (ModelKind.reads); the stages select shards that hold it.
FRAMES = "frames"
FLOW = "flow"
FEATURES = "features"

REQUIRED_PARTS = ("MODEL", "build_data", "init_args", "steps_per_batch", "train_step", "validation_loss", "Scorer")


@dataclass(frozen=True)
class ModelKind:
    """One model kind: its name, a line of help, what it reads and the module that implements it."""

    name: str
    help: str
    reads: tuple[str, ...]                # FRAMES, FLOW (both for two streams) or FEATURES
    module: str                           # the implementation (parts listed in this module's docstring)
    starts_from: tuple[str, ...] = ()     # kinds whose trained runs it starts from (train.init_from_runs)

    def implementation(self) -> ModuleType:
        """The kind's module, checked for every part the trainer and evaluation call."""
        module = importlib.import_module(self.module)
        missing = missing_parts(self, module)
        if missing:
            raise ConfigError(f"model kind {self.name!r}: its module {self.module} lacks {', '.join(missing)}; "
                              "give it every part listed in hpcvid.learn.kinds")
        return module


def missing_parts(kind: ModelKind, module: ModuleType) -> list[str]:
    """The parts of :data:`REQUIRED_PARTS` (and ``warm_start`` when it starts from runs) that are absent."""
    wanted = REQUIRED_PARTS + (("warm_start",) if kind.starts_from else ())
    return [name for name in wanted if not callable(getattr(module, name, None))]


KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (
    ModelKind("frame", "single-frame CNN on one RGB frame", (FRAMES,),
              "hpcvid.learn.kinds.frame"),
    ModelKind("flow", "CNN on a stack of camera-compensated optical-flow fields", (FLOW,),
              "hpcvid.learn.kinds.flow"),
    ModelKind("twostream", "RGB and flow CNNs joined by mid-level fusion", (FRAMES, FLOW),
              "hpcvid.learn.kinds.twostream", starts_from=("frame", "flow")),
    ModelKind("lstm", "stacked LSTM over per-frame CNN features, truncated BPTT", (FEATURES,),
              "hpcvid.learn.kinds.lstm"),
    # the three modalities of the segment network are three kinds: each reads other data and is its own run,
    # and the reducer fuses their scores
    ModelKind("tsn_rgb", "temporal segment network on one RGB frame per segment", (FRAMES,),
              "hpcvid.learn.kinds.tsn"),
    ModelKind("tsn_flow", "temporal segment network on a flow stack per segment", (FLOW,),
              "hpcvid.learn.kinds.tsn"),
    ModelKind("tsn_diff", "temporal segment network on stacked RGB differences per segment", (FRAMES,),
              "hpcvid.learn.kinds.tsn"),
    ModelKind("c3d", "3D convolutions over 16-frame clips, from scratch", (FRAMES,),
              "hpcvid.learn.kinds.c3d"),
    ModelKind("cnnlstm", "CNN on every frame and an LSTM over them, trained end to end", (FRAMES,),
              "hpcvid.learn.kinds.cnnlstm"),
)}

# The kinds a study runs when none are named (the demo, pipeline.models): the four the toolkit started
# with, which the default demo measures in about two minutes; the others are chosen by name (or
# `hpcvid demo --all-models`).
DEFAULT_KINDS: tuple[str, ...] = ("frame", "flow", "twostream", "lstm")


def kind_names() -> tuple[str, ...]:
    """The kinds in table order (the order the demo trains them and the report lists them)."""
    return tuple(KINDS)


def explains(kind: ModelKind) -> bool:
    """Whether the kind's scorer draws Grad-CAM heat maps (its optional ``explain``)."""
    return callable(getattr(kind.implementation().Scorer, "explain", None))


def get_kind(name: str) -> ModelKind:
    if name not in KINDS:
        raise ConfigError(f"unknown model kind {name!r}; choose one of: {', '.join(KINDS)}")
    return KINDS[name]


def kinds_help() -> str:
    """One line per kind for ``--model``'s help."""
    return "; ".join(f"{kind.name} = {kind.help}" for kind in KINDS.values())


# ------------------------------------------------------------------------------ what kind modules are given
@dataclass
class TrainInputs:
    """The training videos the train stage selected for a kind, already opened."""

    source: Any                  # hpcvid.learn.datasets VideoSource (frames, flow) or FeatureSource (features)
    items: list[Any]             # the train split's VideoItem / FeatureItem that hold what the kind reads
    classes: list[str]
    feature_set: str = ""        # features: the name of the set in the shards
    trained_on: dict[str, str] = field(default_factory=dict)   # the unit and set read: checkpoints keep it


@dataclass
class EvalInputs:
    """The test videos evaluation selected for a kind, already opened."""

    source: Any                  # as in TrainInputs; a feature source without mean/std (they come from the run)
    videos: dict[str, Any]       # video id -> its shard attributes (frames, flow) or its FeatureItem (features)


@dataclass
class DataBundle:
    """What a model trains on: train and validation datasets plus what the checkpoint must remember."""

    train: Any                       # torch Dataset with set_epoch(epoch)
    val: Any | None                  # held out from the TRAIN split; never the test split
    classes: list[str]
    model_args: dict[str, Any] = field(default_factory=dict)   # the input size the model is built for (input_dim, stack)
    meta: dict[str, Any] = field(default_factory=dict)         # input preparation, stored in checkpoints


@dataclass(frozen=True)
class StepTools:
    """What the trainer lends a kind's ``train_step``."""

    backward: Callable[[Any], None]      # loss -> gradients (scaled under mixed precision)
    optimiser_step: Callable[[], None]   # clip, step, zero the gradients, advance the schedule and the step count
    autocast: Callable[[], Any]          # a context manager: mixed precision on CUDA, nothing on the CPU
