"""A run folder's files: checkpoints (written, listed, loaded, checked), metrics, and the trained model.

Apart from the trainer, so that evaluation, ``run features`` and inference load a run without importing
the training loop. A run folder ``WORK/runs/<model>/`` holds:

* ``ckpt-eEEEE-sSSSSSSS.pt`` - a dict (``format`` = :data:`CHECKPOINT_FORMAT`, ``version``) after E finished
  epochs (S = 0) or S optimiser steps into the next; written to a temporary name and renamed.
* ``best.pt`` - the checkpoint with the lowest validation loss.
* ``metrics.jsonl`` - one line per epoch, rewritten from the checkpoint's history.

Checkpoints are read with ``weights_only=True``; a file that is not an hpcvid checkpoint of this version,
or that lacks what rebuilding the model needs, is refused with a message that says what to do.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from hpcvid.config import Config, config_from_dict
from hpcvid.errors import CheckpointError
from hpcvid.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "hpcvid.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_RE = re.compile(r"^ckpt-e(\d{4,})-s(\d{7,})\.pt$")
BEST_NAME = "best.pt"
METRICS_NAME = "metrics.jsonl"


def run_dir(config: Config, kind: str | None = None) -> Path:
    """``WORK/runs/<kind>``: the run of ``kind``, by default the configured model's."""
    from hpcvid.workfolder import WorkFolder

    return WorkFolder.of(config).run_dir(kind or config.train.model)


def checkpoint_name(epoch: int, step: int) -> str:
    return f"ckpt-e{epoch:04d}-s{step:07d}.pt"


def list_checkpoints(folder: Path | str) -> list[Path]:
    """Checkpoints of a run, oldest first by (completed epochs, steps into the next)."""
    found = []
    for path in Path(folder).glob("ckpt-*.pt"):
        match = CHECKPOINT_RE.match(path.name)
        if match:
            found.append(((int(match.group(1)), int(match.group(2))), path))
    return [path for _, path in sorted(found)]


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; anything else than an hpcvid checkpoint is refused."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: train first (`hpcvid run train`) or check --work")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/garbled files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({first}); delete it to resume "
                              "from an older one, or retrain") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an hpcvid checkpoint (no format={CHECKPOINT_FORMAT!r}); "
                              "give a file from WORK/runs/<model>/")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {payload.get('version')}, this hpcvid reads "
                              f"{CHECKPOINT_VERSION}: retrain, or use the hpcvid that wrote it")
    missing = [k for k in ("kind", "init_args", "model", "config", "epoch", "step") if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it is incomplete; retrain")
    return payload


def check_compatible(payload: dict[str, Any], path: Path, kind: str, init_args: dict[str, Any]) -> None:
    """Refuse a checkpoint whose model differs from the one this config builds (naming what differs)."""
    if payload["kind"] != kind:
        raise CheckpointError(f"checkpoint {path} holds a {payload['kind']!r} model, not {kind!r}: "
                              "use another --work or move the run folder away")
    ignore = {"weights"}
    diffs = [f"{k}: checkpoint {payload['init_args'].get(k)!r} vs config {v!r}" for k, v in init_args.items()
             if k not in ignore and payload["init_args"].get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was trained with another architecture ({'; '.join(diffs)}): "
                              f"restore those settings, or move {path.parent} away to start a new run")


def newest_valid_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; corrupt newer ones are skipped with a warning naming them."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            log.warning("skipping %s", error)
    return None


def pick_checkpoint(run: Path, which: str = "best") -> tuple[Path, dict[str, Any]] | None:
    """``best.pt`` when ``which`` = "best" and it exists, else the newest valid checkpoint; None if there is none."""
    best = run / BEST_NAME
    if which == "best" and best.is_file():
        return best, load_checkpoint(best)
    return newest_valid_checkpoint(run)


def checkpoint_file(run: Path | str, which: str = "best") -> Path | None:
    """The file :func:`load_run` would load (without loading a best.pt): a file given is itself; None when
    the run has no checkpoint yet. Stages name their inputs' identity by its sha256."""
    run = Path(run)
    if run.is_file():
        return run
    if which == "best" and (run / BEST_NAME).is_file():
        return run / BEST_NAME
    found = newest_valid_checkpoint(run) if run.is_dir() else None
    return found[0] if found else None


def save_checkpoint(folder: Path, payload: dict[str, Any], name: str, keep: int | None = None) -> Path:
    """Write atomically (temporary name, fsync, rename); keep only the newest ``keep`` epoch checkpoints."""
    import torch

    path = folder / name
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    if keep is not None:
        for old in list_checkpoints(folder)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def write_metrics(folder: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(folder / METRICS_NAME, "".join(json.dumps(h, sort_keys=True) + "\n" for h in history))


def read_metrics(folder: Path | str) -> list[dict[str, Any]]:
    path = Path(folder) / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(run: Path | str, which: str = "best", device: str = "cpu") -> tuple[Any, Config, dict[str, Any]]:
    """A trained model, ready for inference: ``(model in eval mode, resolved Config, meta)``.

    ``run`` is a run folder (``WORK/runs/<model>``) or a checkpoint file. ``which`` = "best" (lowest
    validation loss, falling back to the newest) or "last". ``meta`` holds what input preparation needs
    (see :func:`hpcvid.learn.datasets.prepare_features` / ``prepare_flow``): kind, classes, centring,
    feature_mean/feature_std (numpy), feature_set, seq_len, flow_stack, compensation, epoch, checkpoint,
    code_version.
    """
    import numpy as np

    from hpcvid.learn.kinds import KINDS
    from hpcvid.learn.models import build_from_args

    run = Path(run)
    if run.is_file():
        path, payload = run, load_checkpoint(run)
    else:
        found = pick_checkpoint(run, which)
        if found is None:
            raise CheckpointError(f"no valid checkpoint in {run}: train first with "
                                  f"`hpcvid run train --model {run.name} --work WORK`")
        path, payload = found
    if payload["kind"] not in KINDS:
        raise CheckpointError(f"checkpoint {path} holds a {payload['kind']!r} model, which this hpcvid does not "
                              f"know (it knows {', '.join(KINDS)}): use the hpcvid that wrote it")
    model = build_from_args(payload["kind"], payload["init_args"])
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    meta = dict(payload.get("meta", {}))
    for key in ("feature_mean", "feature_std"):
        if meta.get(key) is not None:
            meta[key] = np.asarray(meta[key].numpy() if hasattr(meta[key], "numpy") else meta[key])
    meta.update({"kind": payload["kind"], "epoch": payload["epoch"], "checkpoint": str(path),
                 "code_version": payload.get("code_version", "")})
    return model, config_from_dict(payload["config"]), meta
