"""Accuracy metrics from class scores, computed from integer counts so that sums over shards are exact.

Pure functions on numpy arrays: no files, no torch. The reducer adds up the counts these functions
return (confusion matrices, top-k hit counts) across prediction shards or MPI ranks, and only the final
step divides. Adding counts is associative and exact, so 3 shards give exactly what their
concatenation gives, in any order and on any number of ranks.

Ties are broken by class index, the way ``numpy.argmax`` breaks them: among equal scores the lower
class index ranks first. So the top-1 prediction is always ``argmax(scores)``, top-1 accuracy always
equals the trace of the confusion matrix, and a video whose scores are all equal counts as predicting
class 0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from hpcvid.errors import StoreError

TOP_KS = (1, 5, 10)


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (videos, classes), got {scores.shape}")
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"labels must have shape ({scores.shape[0]},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) and labels.size:
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"labels must lie in 0..{scores.shape[1] - 1}, got {labels.min()}..{labels.max()}")
    if not np.all(np.isfinite(scores)):
        bad = int(np.flatnonzero(~np.isfinite(scores).all(axis=1))[0])
        raise StoreError(f"scores of video #{bad} are not finite (NaN or inf): re-run the evaluation of it")
    return scores, labels.astype(np.int64)


def rank_of_true_class(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each video's true class (0 = predicted), ties broken by class index."""
    scores, labels = _check(scores, labels)
    true_scores = scores[np.arange(len(labels)), labels][:, None]
    higher = (scores > true_scores).sum(axis=1)
    columns = np.arange(scores.shape[1])[None, :]
    tied_before = ((scores == true_scores) & (columns < labels[:, None])).sum(axis=1)
    return (higher + tied_before).astype(np.int64)


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many videos have their true class among the ``k`` best-scored classes (an integer count)."""
    n_classes = np.asarray(scores).shape[1] if np.ndim(scores) == 2 else 0
    if k < 1:
        raise ValueError(f"top-k needs k >= 1, got k = {k}")
    if k > n_classes:
        raise ValueError(f"top-{k} is undefined with only {n_classes} classes: use k <= {n_classes}")
    return int((rank_of_true_class(scores, labels) < k).sum())


def predictions(scores: np.ndarray) -> np.ndarray:
    """The top-1 class of each video (``argmax``; ties go to the lower class index)."""
    return np.asarray(scores).argmax(axis=1).astype(np.int64)


def confusion_counts(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``C[true, predicted]`` = number of videos (int64, shape (classes, classes))."""
    scores, labels = _check(scores, labels)
    n_classes = scores.shape[1]
    flat = labels * n_classes + predictions(scores)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes).astype(np.int64)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Recall of each class (diagonal / row sum); NaN for a class with no test video."""
    confusion = np.asarray(confusion, dtype=np.int64)
    totals = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)


def mean_class_accuracy(confusion: np.ndarray) -> float:
    """Mean of the per-class accuracies over the classes that have test videos."""
    accuracies = per_class_accuracy(confusion)
    present = ~np.isnan(accuracies)
    if not present.any():
        raise ValueError("mean class accuracy is undefined: no class has a test video")
    return float(accuracies[present].mean())


def precision_recall_f1(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per class precision, recall, F1 and support, from the confusion counts ([true, predicted]).

    A quotient with a zero denominator (a class never predicted, or never present) is 0, as scikit-learn's
    ``zero_division=0`` gives it.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    hits = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    support = confusion.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def averaged_f1(confusion: np.ndarray) -> dict[str, float]:
    """Macro and support-weighted averages of precision, recall and F1.

    Macro averages over the classes that occur among the true or the predicted labels (what scikit-learn
    averages over when it is not given a label list); weighted averages weigh each class by its videos.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    scores = precision_recall_f1(confusion)
    occurring = (scores["support"] > 0) | (confusion.sum(axis=0) > 0)
    support = scores["support"].astype(np.float64)
    result: dict[str, float] = {}
    for name in ("precision", "recall", "f1"):
        values = scores[name]
        result[f"{name}_macro"] = float(values[occurring].mean()) if occurring.any() else 0.0
        result[f"{name}_weighted"] = float((values * support).sum() / support.sum()) if support.sum() else 0.0
    return result


def normalised_confusion(confusion: np.ndarray) -> np.ndarray:
    """Each row divided by its total (rows of absent classes stay 0): what the PNGs show."""
    confusion = np.asarray(confusion, dtype=np.float64)
    totals = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)


def valid_ks(n_classes: int, ks: Sequence[int] = TOP_KS) -> list[int]:
    """The ks of ``ks`` that are defined for ``n_classes`` classes (top-10 of 6 classes is not)."""
    return [k for k in ks if k <= n_classes]


def factor_accuracy(confusion: np.ndarray, groups: Sequence[str]) -> float:
    """Accuracy on one factor of the class (e.g. its motion): predicted and true class in the same group.

    ``groups[c]`` is the factor value of class ``c``. On the synthetic set, grouping by motion measures
    whether a model sees motion even where it cannot tell the appearances apart (a flow CNN sees no colour).
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    if len(groups) != confusion.shape[0]:
        raise ValueError(f"{len(groups)} group labels for {confusion.shape[0]} classes")
    labels = np.asarray(groups, dtype=object)
    same = labels[:, None] == labels[None, :]
    total = int(confusion.sum())
    if total == 0:
        raise ValueError("factor accuracy is undefined: no video was counted")
    return float(confusion[same].sum() / total)
