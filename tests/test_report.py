"""The report: summary.json keys, CSVs, and plots that are really drawn (pixels, not only files)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from hpcvid.stages import report
from hpcvid.stages.reduce import reduce_files

from predictions_factory import make_manifest, write_run


def _pixels(path):
    import matplotlib.image

    image = matplotlib.image.imread(path)
    return image[..., :3]


def _assert_not_blank(path, min_colours=20):
    pixels = _pixels(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0.05, f"{path} is (nearly) uniform"
    colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) >= min_colours, f"{path} has only {len(colours)} colours"
    return pixels


@pytest.fixture()
def reduced(tmp_path):
    work = tmp_path / "work"
    manifest = make_manifest(work, n_classes=6, test_per_class=5)
    write_run(work, manifest, "frame", "frame", {"middle": 0.2, "mean_frames": 0.3, "pos_first": 0.4}, shards=2, seed=3)
    write_run(work, manifest, "lstm", "lstm", {"windows": 0.95, "last_step": 0.6}, shards=3, seed=4)
    runs = work / "runs"
    for run, slope in (("frame", 0.02), ("lstm", 0.05)):
        (runs / run).mkdir(parents=True)
        lines = [json.dumps({"epoch": e, "train_loss": 2.0 - slope * e * 10, "val_loss": 2.1 - slope * e * 8,
                             "train_acc": min(1.0, 0.2 + slope * e), "val_acc": min(1.0, 0.15 + slope * e)})
                 for e in range(10)]
        (runs / run / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"epoch\": 10, \"train_lo")  # cut line
    return reduce_files(work), tmp_path / "results"


def test_summary_has_every_key_per_model_and_strategy(reduced):
    reduction, out = reduced
    report.write_report(reduction, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_test_videos"] == 30 and summary["partial"] is False
    assert list(summary["runs"]) == ["frame", "lstm"]
    lstm = summary["runs"]["lstm"]
    assert lstm["default_strategy"] == "windows"
    for numbers in lstm["strategies"].values():
        assert {"top1", "top5", "top10", "mean_class_accuracy", "n_videos"} <= set(numbers)
        assert numbers["n_videos"] == 30
        assert numbers["top10"] is None          # 6 classes: top-10 is undefined
        assert numbers["top1"] == numbers["correct"] / 30
    total = reduction.runs["lstm"]
    assert lstm["strategies"]["windows"]["correct"] == int(np.trace(total.confusion["windows"]))
    provenance = lstm["provenance"]
    assert {"config", "code_version", "checkpoint", "shards"} <= set(provenance)
    assert [s["file"] for s in provenance["shards"]] == [f"pred-000{i}-of-0003.h5" for i in range(3)]
    assert all(len(s["sha256"]) == 64 for s in provenance["shards"])


def test_csv_files_hold_the_counts(reduced):
    reduction, out = reduced
    report.write_report(reduction, out)
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert len(rows) == 6 * (3 + 2)
    windows = [r for r in rows if r["run"] == "lstm" and r["strategy"] == "windows"]
    assert sum(int(r["correct"]) for r in windows) == int(np.trace(reduction.runs["lstm"].confusion["windows"]))
    matrix = list(csv.reader((out / "confusion" / "lstm__windows.csv").open()))
    assert matrix[0][1:] == [f"Class{i:03d}" for i in range(6)]
    counts = np.array([[int(x) for x in row[1:]] for row in matrix[1:]])
    assert counts.tolist() == reduction.runs["lstm"].confusion["windows"].tolist()
    improvement = list(csv.reader((out / "improvement.csv").open()))
    assert len(improvement) == 1 + 6


def test_plots_are_drawn_not_blank(reduced):
    reduction, out = reduced
    path = report.write_report(reduction, out)
    text = path.read_text()
    for picture in ("confusion/frame.png", "confusion/lstm.png", "learning_curves.png", "improvement.png"):
        assert f"]({picture})" in text
        _assert_not_blank(out / picture)
    # the confusion matrix of a near-perfect model is dark on its diagonal: check a diagonal cell's colour
    pixels = _pixels(out / "confusion" / "lstm.png")
    assert pixels.min() < 0.25       # dark blue cells exist
    curves = _pixels(out / "learning_curves.png")
    assert (np.abs(curves[..., 0] - curves[..., 2]) > 0.3).sum() > 200   # coloured lines, not just axes


def test_101_classes_stay_legible(tmp_path):
    names = [f"ActionClassNumber{i:03d}" for i in range(101)]
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 3, size=(101, 101)) + np.diag(rng.integers(5, 30, size=101))
    figure = report.confusion_figure(confusion, names, "101 classes")
    figure.canvas.draw()
    axes = figure.axes[0]
    for labels in (axes.get_yticklabels(), axes.get_xticklabels()):
        assert [t.get_text() for t in labels] == names
        assert min(t.get_fontsize() for t in labels) >= 6
        boxes = [t.get_window_extent() for t in labels]
        overlaps = sum(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))
        assert overlaps == 0, f"{overlaps} neighbouring class names overlap"
    import matplotlib.pyplot as plt

    plt.close(figure)
    path = report.plot_confusion(confusion, names, "101 classes", tmp_path / "c101.png")
    pixels = _assert_not_blank(path)
    assert pixels.shape[0] >= 101 * 12      # at least 12 pixels per class row at 100 dpi


def test_partial_report_says_so(tmp_path):
    work = tmp_path / "work"
    manifest = make_manifest(work)
    write_run(work, manifest, "lstm", "lstm", {"windows": 0.9}, shards=3, skip=(2,))
    reduction = reduce_files(work, allow_partial=True)
    report.write_report(reduction, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["partial"] is True
    assert "pred-0002-of-0003.h5" in summary["runs"]["lstm"]["missing_shards"][0]
    assert len(summary["runs"]["lstm"]["missing_videos"]) == 10
    assert "PARTIAL" in (tmp_path / "out" / "report.md").read_text()
    assert "Not computed: no frame run" in (tmp_path / "out" / "report.md").read_text()
