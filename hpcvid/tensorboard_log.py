"""TensorBoard event files of a training run: optional (``pip install 'hpcvid[tensorboard]'``).

With ``train.tensorboard = true`` (or ``--tensorboard``) rank 0 writes, beside the checkpoints in
``WORK/runs/<model>/``, one scalar per metric per epoch (losses, accuracies, learning rate, the share of time
spent waiting for data, throughput), so ``tensorboard --logdir WORK/runs`` shows every model as a run of its
own. ``metrics.jsonl`` stays the record; these files are a view of it. The package is imported only when
asked for, so a cluster without it trains as before. A run resumed after a requeue purges the events past
its checkpoint, so a curve never shows an epoch twice.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from hpcvid.errors import ConfigError

# metrics.jsonl key -> TensorBoard tag (the slash groups the curves: loss/train beside loss/val)
SCALARS = {
    "train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train", "val_acc": "accuracy/val",
    "lr": "learning_rate", "data_wait_share": "data_wait_share", "samples_per_s": "samples_per_s",
}


def require_tensorboard() -> None:
    """Refuse, on one line, a run that asks for TensorBoard where the package is not installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("train.tensorboard = true needs the tensorboard package: pip install "
                          "'hpcvid[tensorboard]' (or set train.tensorboard = false)") from None


class EpochBoard:
    """Writes one epoch's metrics as scalars; does nothing when TensorBoard is off (or on ranks above 0)."""

    def __init__(self, writer: Any = None) -> None:
        self.writer = writer

    @classmethod
    def open(cls, enabled: bool, folder: Path | str, epochs_done: int) -> "EpochBoard":
        """A board writing into ``folder``; ``epochs_done`` is where a resumed run continues."""
        if not enabled:
            return cls()
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        return cls(SummaryWriter(log_dir=str(folder), purge_step=epochs_done + 1))

    def epoch(self, entry: Mapping[str, Any]) -> None:
        """One line of the run's history (``epoch`` is the step); NaN (no validation set) is left out."""
        if self.writer is None:
            return
        for key, tag in SCALARS.items():
            value = entry.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), int(entry["epoch"]))
        self.writer.flush()   # a login node's tensorboard sees each epoch as it ends

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
