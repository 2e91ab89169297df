"""Metrics on literal examples: top-k, ties, confusion counts, mean class accuracy, precision, recall and F1."""
from __future__ import annotations

import numpy as np
import pytest

from hpcvid.learn import metrics
from hpcvid.errors import StoreError

SCORES = np.array([
    [0.9, 0.05, 0.05],   # true 0 -> predicted 0
    [0.2, 0.3, 0.5],     # true 1 -> predicted 2, true class second
    [0.1, 0.2, 0.7],     # true 2 -> predicted 2
    [0.6, 0.1, 0.3],     # true 2 -> predicted 0, true class second
], dtype=np.float32)
LABELS = np.array([0, 1, 2, 2])


def test_topk_on_a_literal_example():
    assert metrics.topk_hits(SCORES, LABELS, 1) == 2
    assert metrics.topk_hits(SCORES, LABELS, 2) == 4
    assert metrics.topk_hits(SCORES, LABELS, 3) == 4
    assert metrics.rank_of_true_class(SCORES, LABELS).tolist() == [0, 1, 0, 1]


def test_confusion_counts_and_accuracies_on_a_literal_example():
    confusion = metrics.confusion_counts(SCORES, LABELS)
    assert confusion.tolist() == [[1, 0, 0], [0, 0, 1], [1, 0, 1]]
    assert confusion.dtype == np.int64
    assert metrics.per_class_accuracy(confusion).tolist() == [1.0, 0.0, 0.5]
    assert metrics.mean_class_accuracy(confusion) == pytest.approx(0.5)
    # top-1 is the trace of the confusion matrix
    assert np.trace(confusion) == metrics.topk_hits(SCORES, LABELS, 1)


def test_ties_are_broken_by_class_index_like_argmax():
    tied = np.array([[0.5, 0.5, 0.0],    # true 0: tie with class 1, class 0 wins (lower index)
                     [0.5, 0.5, 0.0],    # true 1: tie with class 0, class 0 wins -> rank 1
                     [0.2, 0.2, 0.2]])   # true 2: all equal -> rank 2
    labels = np.array([0, 1, 2])
    assert metrics.rank_of_true_class(tied, labels).tolist() == [0, 1, 2]
    assert metrics.topk_hits(tied, labels, 1) == 1
    assert metrics.topk_hits(tied, labels, 2) == 2
    assert metrics.topk_hits(tied, labels, 3) == 3
    assert metrics.confusion_counts(tied, labels).tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0]]
    assert metrics.topk_hits(tied, labels, 1) == np.trace(metrics.confusion_counts(tied, labels))


def test_k_larger_than_the_number_of_classes_is_a_clear_error():
    with pytest.raises(ValueError, match=r"top-5 is undefined with only 3 classes: use k <= 3"):
        metrics.topk_hits(SCORES, LABELS, 5)
    with pytest.raises(ValueError, match="k >= 1"):
        metrics.topk_hits(SCORES, LABELS, 0)
    assert metrics.valid_ks(6) == [1, 5]
    assert metrics.valid_ks(101) == [1, 5, 10]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        metrics.confusion_counts(SCORES, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="shape"):
        metrics.confusion_counts(SCORES, np.array([0, 1]))
    bad = SCORES.copy()
    bad[2, 1] = np.nan
    with pytest.raises(StoreError, match="video #2 are not finite"):
        metrics.topk_hits(bad, LABELS, 1)


def test_mean_class_accuracy_ignores_classes_without_test_videos():
    confusion = np.array([[3, 1, 0], [0, 0, 0], [0, 2, 2]])
    assert np.isnan(metrics.per_class_accuracy(confusion)[1])
    assert metrics.mean_class_accuracy(confusion) == pytest.approx((0.75 + 0.5) / 2)
    assert metrics.normalised_confusion(confusion)[1].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="no class has a test video"):
        metrics.mean_class_accuracy(np.zeros((2, 2), dtype=np.int64))


def test_factor_accuracy_counts_predictions_sharing_the_true_factor():
    # classes: 0 = RedUp, 1 = RedDown, 2 = BlueUp, 3 = BlueDown
    confusion = np.array([[2, 0, 1, 0],     # RedUp predicted BlueUp once: motion right, colour wrong
                          [0, 1, 0, 2],     # RedDown predicted BlueDown twice
                          [0, 1, 3, 0],     # BlueUp predicted RedDown once: both wrong
                          [0, 0, 0, 4]])
    motion = ["Up", "Down", "Up", "Down"]
    colour = ["Red", "Red", "Blue", "Blue"]
    assert metrics.factor_accuracy(confusion, motion) == pytest.approx((2 + 1 + 1 + 2 + 3 + 4) / 14)
    assert metrics.factor_accuracy(confusion, colour) == pytest.approx((2 + 1 + 3 + 4) / 14)
    with pytest.raises(ValueError, match="3 group labels for 4 classes"):
        metrics.factor_accuracy(confusion, motion[:3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_recall_f1_equal_scikit_learn_on_the_same_predictions(seed):
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    classes = 7
    labels = rng.integers(0, classes - 1, 90)                    # class 6 never occurs: only predicted
    scores = rng.normal(size=(90, classes))
    scores[np.arange(90), labels] += rng.random(90) * 2.0
    predicted = scores.argmax(1)
    confusion = metrics.confusion_counts(scores, labels)
    mine = metrics.precision_recall_f1(confusion)
    per_class = precision_recall_fscore_support(labels, predicted, labels=list(range(classes)), zero_division=0)
    for name, theirs in zip(("precision", "recall", "f1", "support"), per_class):
        np.testing.assert_allclose(mine[name], theirs, rtol=1e-12, err_msg=name)
    averaged = metrics.averaged_f1(confusion)
    for how in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, predicted, average=how, zero_division=0)
        assert (averaged[f"precision_{how}"], averaged[f"recall_{how}"], averaged[f"f1_{how}"]) == \
            pytest.approx((p, r, f), rel=1e-12), how


def test_f1_of_shards_equals_f1_of_their_concatenation():
    """F1 comes from the summed integer confusion counts, so sharding cannot change it."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 60)
    scores = rng.normal(size=(60, 5))
    scores[np.arange(60), labels] += 1.0
    parts = sum(metrics.confusion_counts(scores[i::3], labels[i::3]) for i in range(3))
    assert metrics.averaged_f1(parts) == metrics.averaged_f1(metrics.confusion_counts(scores, labels))
