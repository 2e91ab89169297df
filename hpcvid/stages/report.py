"""The results report written by ``hpcvid collect`` into ``results/NAME/``.

Files (all written atomically; the README's "Evaluation and results" section documents them):

* ``summary.json``   per run (model) and strategy: top1, top5, top10 (null when the dataset has fewer
                     classes than k), mean_class_accuracy, precision/recall/f1 _macro and _weighted,
                     n_videos, correct; per run: provenance
                     (config, code version, checkpoint, shards with sha256), missing shards/videos.
* ``per_class.csv``  run, model, strategy, class, n_videos, correct, accuracy, precision, recall, f1.
* ``confusion/<run>__<strategy>.csv``  counts, rows = true class, columns = predicted class.
* ``confusion/<run>.png``  the default strategy's row-normalised confusion matrix with class names.
* ``learning_curves.png``  loss and accuracy per epoch from ``WORK/runs/*/metrics.jsonl``.
* ``improvement.csv`` / ``improvement.png``  per-class accuracy change from the single-frame model
                     (middle frame) to the LSTM: the 10 classes that gained most and the 10 that lost most.
* ``explain/<run>/<video>__<class>.png``  with ``collect --explain K``: Grad-CAM overlays of K test videos
                     per run (:mod:`hpcvid.stages.explain`).
* ``report.md``      the tables and pictures together: every run and strategy, the models side by side
                     (default strategies), the fusion of runs and its weights, the overlays.

matplotlib is imported inside the plotting functions (Agg backend, no display needed).
"""
from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from hpcvid.learn import metrics
from hpcvid.learn.kinds import kind_names
from hpcvid.fileio import atomic_path, atomic_write_json, atomic_write_text, read_json

SUMMARY_SCHEMA_VERSION = 1
IMPROVEMENT_SHOWN = 10


# ------------------------------------------------------------------------------------------ summary
def strategy_summary(confusion: np.ndarray, topk: Mapping[int, int]) -> dict[str, Any]:
    """The numbers of one (run, strategy), from its integer counts."""
    n_videos = int(confusion.sum())
    entry: dict[str, Any] = {"n_videos": n_videos, "correct": int(np.trace(confusion))}
    for k in metrics.TOP_KS:
        entry[f"top{k}"] = (topk[k] / n_videos) if (k in topk and n_videos) else None
    entry["topk_hits"] = {str(k): int(v) for k, v in sorted(topk.items())}
    entry["mean_class_accuracy"] = metrics.mean_class_accuracy(confusion) if n_videos else None
    averages = metrics.averaged_f1(confusion) if n_videos else {}
    for name in ("precision", "recall", "f1"):
        for how in ("macro", "weighted"):
            entry[f"{name}_{how}"] = averages.get(f"{name}_{how}")
    return entry


def build_summary(reduction: Any, factors: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """summary.json's content (see the module docstring and README).

    ``factors`` (optional) names factors of the class, e.g. {"motion": [motion of class 0, ...]}; each
    strategy then also gets ``factors.<name>`` = the accuracy on that factor alone.
    """
    from hpcvid.version import code_version

    runs = {}
    for name in ordered_runs(reduction.runs):
        total = reduction.runs[name]
        strategies = {s: strategy_summary(total.confusion[s], total.topk[s]) for s in total.strategies}
        for strategy, entry in strategies.items():
            if factors and entry["n_videos"]:
                entry["factors"] = {f: metrics.factor_accuracy(total.confusion[strategy], groups)
                                    for f, groups in factors.items()}
        runs[name] = {
            "model": total.model,
            **({"fusion": total.fusion} if total.fusion else {}),
            "default_strategy": total.default_strategy,
            "n_videos": total.n_videos,
            "strategy_order": list(total.strategies),
            "strategies": strategies,
            "provenance": {
                "config": total.config, "code_version": total.code_version, "checkpoint": total.checkpoint,
                "checkpoint_sha256": total.checkpoint_sha256, "shards": total.shards,
            },
            "failed": total.failed,
            "missing_shards": reduction.missing_shards.get(name, []),
            "missing_videos": reduction.missing_videos.get(name, []),
        }
    manifest = reduction.manifest
    return {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "work": str(reduction.work),
        "dataset": manifest.dataset,
        "classes": list(manifest.classes),
        "n_test_videos": len(manifest.by_split("test")),
        "partial": reduction.partial,
        "collected_by": code_version(),
        "collected_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "factors": {f: list(groups) for f, groups in (factors or {}).items()},
        "notes": list(getattr(reduction, "notes", [])),
        "runs": runs,
    }


def ordered_runs(runs: Mapping[str, Any]) -> list[str]:
    """Runs in the order of the model kinds' table (the report's reading order), then the others by name."""
    order = kind_names()

    def key(name: str) -> tuple[int, str]:
        model = runs[name].model if hasattr(runs[name], "model") else runs[name]["model"]
        return (order.index(model) if model in order else len(order), name)
    return sorted(runs, key=key)


def read_summary(out: Path | str) -> dict[str, Any]:
    return read_json(Path(out) / "summary.json")


# --------------------------------------------------------------------------------------------- tables
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for run in ordered_runs(summary["runs"]):
        entry = summary["runs"][run]
        for strategy in _strategy_order(entry):
            numbers = entry["strategies"][strategy]
            mark = " *" if strategy == entry["default_strategy"] else ""
            rows.append([run, strategy + mark, _pct(numbers["top1"]), _pct(numbers["top5"]),
                         _pct(numbers["top10"]), _pct(numbers["mean_class_accuracy"]),
                         _pct(numbers.get("f1_macro")), str(numbers["n_videos"])])
    return rows


def _strategy_order(entry: Mapping[str, Any]) -> list[str]:
    """The default strategy first, then the others in the order evaluation listed them."""
    order = entry.get("strategy_order") or list(entry["strategies"])
    default = entry["default_strategy"]
    return [default] + [s for s in order if s != default]


TABLE_HEADER = ["run", "strategy", "top-1 %", "top-5 %", "top-10 %", "mean class acc %", "F1 macro %", "videos"]


def format_table(summary: Mapping[str, Any]) -> str:
    """The plain-text table printed by ``hpcvid collect`` and ``hpcvid demo`` (* = default strategy)."""
    rows = [TABLE_HEADER] + table_rows(summary)
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(summary: Mapping[str, Any]) -> str:
    rows = [TABLE_HEADER] + table_rows(summary)
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" if i < 2 else "---:" for i in range(len(TABLE_HEADER))) + "|")
    return "\n".join(lines)


def side_by_side(summary: Mapping[str, Any]) -> str:
    """Markdown: one line per run, its default strategy's numbers (the models compared at a glance)."""
    lines = ["| run | model | default strategy | top-1 % | mean class acc % | F1 macro % | videos |",
             "|---|---|---|---:|---:|---:|---:|"]
    for run in ordered_runs(summary["runs"]):
        entry = summary["runs"][run]
        numbers = entry["strategies"][entry["default_strategy"]]
        lines.append(f"| {run} | {entry['model']} | {entry['default_strategy']} | {_pct(numbers['top1'])} | "
                     f"{_pct(numbers['mean_class_accuracy'])} | {_pct(numbers.get('f1_macro'))} | "
                     f"{numbers['n_videos']} |")
    return "\n".join(lines)


def fusion_text(summary: Mapping[str, Any]) -> list[str]:
    """Markdown lines: each fused run's members, their strategies and weights; what could not be fused."""
    lines = []
    for run in ordered_runs(summary["runs"]):
        members = summary["runs"][run].get("fusion")
        if members:
            parts = " + ".join(f"{m['weight']:g} x `{name}` ({m['strategy']})" for name, m in members.items())
            lines.append(f"- `{run}`: the softmax scores {parts}, divided by "
                         f"{sum(m['weight'] for m in members.values()):g}, per test video.")
    return lines + [f"- {note}" for note in summary.get("notes", [])]


def factor_table(summary: Mapping[str, Any]) -> str:
    """Markdown: each run's default strategy, its class accuracy and its accuracy on each class factor."""
    names = list(summary["factors"])
    lines = ["Accuracy on each factor of the class alone (default strategies): a prediction counts when it "
             "has the true class's " + " / ".join(names) + ", whatever the rest.", "",
             "| run | strategy | class top-1 % | " + " | ".join(f"{n} %" for n in names) + " |",
             "|---|---|---:|" + "---:|" * len(names)]
    for run in ordered_runs(summary["runs"]):
        entry = summary["runs"][run]
        numbers = entry["strategies"][entry["default_strategy"]]
        values = [_pct(numbers.get("factors", {}).get(n)) for n in names]
        lines.append(f"| {run} | {entry['default_strategy']} | {_pct(numbers['top1'])} | " + " | ".join(values) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CSV
def _csv_text(rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows(rows)
    return buffer.getvalue()


def per_class_rows(reduction: Any) -> list[list[Any]]:
    rows: list[list[Any]] = [["run", "model", "strategy", "class", "n_videos", "correct", "accuracy", "precision",
                              "recall", "f1"]]
    for name in ordered_runs(reduction.runs):
        total = reduction.runs[name]
        for strategy in total.strategies:
            confusion = total.confusion[strategy]
            accuracy = metrics.per_class_accuracy(confusion)
            scores = metrics.precision_recall_f1(confusion)
            for index, class_name in enumerate(total.classes):
                n = int(confusion[index].sum())
                rows.append([name, total.model, strategy, class_name, n, int(confusion[index, index]),
                             "" if math.isnan(accuracy[index]) else f"{accuracy[index]:.4f}",
                             *(f"{scores[k][index]:.4f}" for k in ("precision", "recall", "f1"))])
    return rows


def confusion_rows(classes: Sequence[str], confusion: np.ndarray) -> list[list[Any]]:
    rows: list[list[Any]] = [["true \\ predicted", *classes]]
    rows += [[name, *map(int, confusion[i])] for i, name in enumerate(classes)]
    return rows


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# ---------------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path, dpi: int = 100) -> None:
    plt = _pyplot()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], title: str, path: Path) -> Path:
    """Save :func:`confusion_figure` as a PNG."""
    _save(confusion_figure(confusion, classes, title), path)
    return path


def confusion_figure(confusion: np.ndarray, classes: Sequence[str], title: str) -> Any:
    """Row-normalised confusion matrix with class names on both axes.

    The figure grows with the number of classes (about 0.17 inch per class) and the font shrinks only
    down to 6 pt, so 101 UCF-101 class names stay legible at 100 dpi (the PNG is about 1,800 px wide).
    """
    plt = _pyplot()
    n = len(classes)
    side = max(5.0, 0.17 * n + 2.5)
    font = max(6.0, min(10.0, 300.0 / max(n, 1)))
    figure, axes = plt.subplots(figsize=(side + 1.2, side))
    image = axes.imshow(metrics.normalised_confusion(confusion), cmap="Blues", vmin=0.0, vmax=1.0,
                        interpolation="nearest")
    axes.set_xticks(range(n))
    axes.set_yticks(range(n))
    axes.set_xticklabels(classes, rotation=90, fontsize=font)
    axes.set_yticklabels(classes, fontsize=font)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    if n <= 20:   # numbers in the cells only where they fit
        normalised = metrics.normalised_confusion(confusion)
        for i in range(n):
            for j in range(n):
                if confusion[i].sum():
                    value = normalised[i, j]
                    axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=font,
                              color="white" if value > 0.5 else "black")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    return figure


def read_learning_curves(work: Path | str) -> dict[str, list[dict[str, Any]]]:
    """run name -> the JSON lines of ``WORK/runs/<run>/metrics.jsonl`` (unreadable lines are skipped)."""
    curves = {}
    for path in sorted(Path(work).glob("runs/*/metrics.jsonl")):
        lines = []
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue   # a line cut by a kill mid-write
            if isinstance(entry, dict):
                lines.append(entry)
        if lines:
            curves[path.parent.name] = lines
    return curves


def _series(lines: Sequence[Mapping[str, Any]], what: str) -> dict[str, tuple[list[float], list[float]]]:
    """Numeric keys whose name contains ``what`` ('loss' or 'acc'), against epoch (or step, or line)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for position, entry in enumerate(lines):
        x = entry.get("epoch", entry.get("step", position))
        for key, value in entry.items():
            if what in key and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(float(x))
                ys.append(float(value))
    return series


def plot_learning_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path | None:
    """Two panels: every '*loss*' and every '*acc*' value per epoch, one colour per run."""
    if not curves:
        return None
    plt = _pyplot()
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = 0
    for index, (run, lines) in enumerate(sorted(curves.items())):
        colour = colours[index % len(colours)]
        for axes, what in ((loss_axes, "loss"), (acc_axes, "acc")):
            for key, (xs, ys) in sorted(_series(lines, what).items()):
                style = "--" if key.startswith("val") or "test" in key else "-"
                axes.plot(xs, ys, style, color=colour, marker="o", markersize=2, label=f"{run}: {key}")
                drawn += 1
    if not drawn:
        plt.close(figure)
        return None
    for axes, label in ((loss_axes, "loss"), (acc_axes, "accuracy")):
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=7)
    figure.suptitle("learning curves (WORK/runs/*/metrics.jsonl)")
    _save(figure, path)
    return path


def improvement(reduction: Any, before: tuple[str, str], after: tuple[str, str]) -> list[dict[str, Any]]:
    """Per-class accuracy of ``after`` minus ``before`` ((run, strategy) each), sorted by gain."""
    run_a, strategy_a = before
    run_b, strategy_b = after
    acc_a = metrics.per_class_accuracy(reduction.runs[run_a].confusion[strategy_a])
    acc_b = metrics.per_class_accuracy(reduction.runs[run_b].confusion[strategy_b])
    rows = []
    for index, name in enumerate(reduction.manifest.classes):
        if math.isnan(acc_a[index]) or math.isnan(acc_b[index]):
            continue
        rows.append({"class": name, "before": float(acc_a[index]), "after": float(acc_b[index]),
                     "gain": float(acc_b[index] - acc_a[index])})
    rows.sort(key=lambda r: (-r["gain"], r["class"]))
    return rows


def gainers_and_losers(rows: Sequence[Mapping[str, Any]], shown: int = IMPROVEMENT_SHOWN) -> tuple[list, list]:
    """Up to ``shown`` classes that gained most (gain > 0) and up to ``shown`` that lost most (gain < 0)."""
    gained = [r for r in rows if r["gain"] > 0][:shown]
    lost = sorted((r for r in rows if r["gain"] < 0), key=lambda r: (r["gain"], r["class"]))[:shown]
    return gained, lost


def plot_improvement(gained: Sequence[Mapping[str, Any]], lost: Sequence[Mapping[str, Any]], title: str,
                     path: Path) -> Path:
    plt = _pyplot()
    rows = list(gained) + list(reversed(list(lost)))
    if not rows:
        rows = [{"class": "(no class changed)", "gain": 0.0}]
    figure, axes = plt.subplots(figsize=(8, max(3.0, 0.3 * len(rows) + 1.5)))
    gains = [100 * r["gain"] for r in rows]
    colours = ["tab:green" if g >= 0 else "tab:red" for g in gains]
    axes.barh(range(len(rows)), gains, color=colours)
    axes.set_yticks(range(len(rows)))
    axes.set_yticklabels([r["class"] for r in rows], fontsize=8)
    axes.invert_yaxis()
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_xlabel("change of per-class accuracy (points)")
    axes.set_title(title)
    axes.grid(axis="x", alpha=0.3)
    _save(figure, path)
    return path


# --------------------------------------------------------------------------------------------- report
def _pick(reduction: Any, model: str) -> tuple[str, str] | None:
    """(run, strategy) of the first run of ``model``; the frame model is compared at its middle frame."""
    for name in ordered_runs(reduction.runs):
        total = reduction.runs[name]
        if total.model == model:
            strategy = "middle" if model == "frame" and "middle" in total.strategies else total.default_strategy
            return name, strategy
    return None


def write_report(reduction: Any, out: Path | str, factors: Mapping[str, Sequence[str]] | None = None,
                 examples: Sequence[Any] = ()) -> Path:
    """Write every file of the report into ``out``; returns the path of report.md.

    ``examples`` are the Grad-CAM pictures already drawn into ``out`` (:func:`hpcvid.stages.explain.report_examples`).
    """
    out = Path(out)
    (out / "confusion").mkdir(parents=True, exist_ok=True)
    summary = build_summary(reduction, factors)
    atomic_write_text(out / "per_class.csv", _csv_text(per_class_rows(reduction)))
    pictures: list[tuple[str, str]] = []
    for name in ordered_runs(reduction.runs):
        total = reduction.runs[name]
        for strategy in total.strategies:
            atomic_write_text(out / "confusion" / f"{safe_name(name)}__{safe_name(strategy)}.csv",
                              _csv_text(confusion_rows(total.classes, total.confusion[strategy])))
        png = out / "confusion" / f"{safe_name(name)}.png"
        plot_confusion(total.confusion[total.default_strategy], total.classes,
                       f"{name} ({total.default_strategy}), normalised by true class", png)
        pictures.append((f"confusion matrix: {name} ({total.default_strategy})", f"confusion/{png.name}"))
    curves = plot_learning_curves(read_learning_curves(reduction.work), out / "learning_curves.png")
    improvement_text = _write_improvement(reduction, out)
    atomic_write_json(out / "summary.json", summary)
    report = _report_markdown(summary, pictures, curves is not None, improvement_text, examples)
    atomic_write_text(out / "report.md", report)
    return out / "report.md"


def _write_improvement(reduction: Any, out: Path) -> str:
    frame, lstm = _pick(reduction, "frame"), _pick(reduction, "lstm")
    if frame is None or lstm is None:
        missing = " and ".join(m for m, p in (("frame", frame), ("lstm", lstm)) if p is None)
        return f"Not computed: no {missing} run was evaluated."
    rows = improvement(reduction, frame, lstm)
    gained, lost = gainers_and_losers(rows)
    table = [["class", "single-frame accuracy", "LSTM accuracy", "gain (points)"]]
    table += [[r["class"], f"{r['before']:.4f}", f"{r['after']:.4f}", f"{100 * r['gain']:+.1f}"] for r in rows]
    atomic_write_text(out / "improvement.csv", _csv_text(table))
    title = f"per-class accuracy: {frame[0]} ({frame[1]}) -> {lstm[0]} ({lstm[1]})"
    plot_improvement(gained, lost, title, out / "improvement.png")
    lines = [f"From `{frame[0]}` ({frame[1]}) to `{lstm[0]}` ({lstm[1]}); all classes in `improvement.csv`.", "",
             "| class | single frame % | LSTM % | gain (points) |", "|---|---:|---:|---:|"]
    for title_, group in (("gained most", gained), ("lost most", lost)):
        lines.append(f"| **{title_}**{'' if group else ' (none)'} | | | |")
        lines += [f"| {r['class']} | {100 * r['before']:.1f} | {100 * r['after']:.1f} | {100 * r['gain']:+.1f} |"
                  for r in group]
    lines += ["", "![per-class improvement](improvement.png)"]
    return "\n".join(lines)


def _report_markdown(summary: Mapping[str, Any], pictures: Sequence[tuple[str, str]], curves: bool,
                     improvement_text: str, examples: Sequence[Any] = ()) -> str:
    dataset = summary.get("dataset") or {}
    lines = [
        "# Results", "",
        f"Work folder `{summary['work']}`, {len(summary['classes'])} classes, {summary['n_test_videos']} test videos"
        + (f", dataset {dataset.get('format', '')} `{dataset.get('root', '')}`" if dataset else "") + ".",
        f"Collected {summary['collected_at']} by hpcvid {summary['collected_by']}.", "",
    ]
    if summary["partial"]:
        lines += ["**PARTIAL**: some shards or videos are missing (listed below); the numbers cover only "
                  "the videos that were counted.", ""]
    if dataset.get("task"):
        lines += ["## Classes of the task", "", "The dataset's classes were selected or merged "
                  "(`dataset.classes` / `dataset.class_map`):", "", "| class | made of the dataset's classes |",
                  "|---|---|"]
        lines += [f"| {name} | {', '.join(sources)} |" for name, sources in dataset["task"].items()]
        lines.append("")
    lines += ["## Models side by side", "", "Each run at its default strategy.", "", side_by_side(summary), ""]
    fusion = fusion_text(summary)
    if fusion:
        lines += ["Fusion of runs (`hpcvid collect --fuse RUN:WEIGHT ...`, `report.fusion`):", "", *fusion, ""]
    lines += ["## Accuracy by model and inference strategy", "",
              "`*` marks each model's default strategy. Top-k is empty where the dataset has fewer than k "
              "classes.", "", markdown_table(summary), ""]
    if summary.get("factors"):
        lines += [factor_table(summary), ""]
    lines += ["## Confusion matrices", ""]
    for caption, link in pictures:
        lines += [f"![{caption}]({link})", ""]
    lines += ["Counts for every strategy: `confusion/<run>__<strategy>.csv`; per-class accuracy: "
              "`per_class.csv`.", ""]
    lines += ["## Learning curves", "",
              "![learning curves](learning_curves.png)" if curves else "No `WORK/runs/*/metrics.jsonl` was found.", ""]
    lines += ["## Per-class improvement, single frame -> LSTM", "", improvement_text, ""]
    if examples:
        lines += ["## Where the models look (Grad-CAM)", "",
                  "Test videos of each run, one wrongly and one rightly classified per class (least accurate "
                  "classes first): the frames the model saw, and over them the heat map of the class it "
                  "predicted (`hpcvid explain` draws any video).", ""]
        for example in examples:
            verdict = "right" if example.right else "wrong"
            lines += [f"![{example.run}: {example.video}, true {example.label}, predicted {example.predicted} "
                      f"({verdict})]({example.picture.as_posix()})", ""]
    lines += ["## Provenance", ""]
    for run in ordered_runs(summary["runs"]):
        entry = summary["runs"][run]
        provenance = entry["provenance"]
        shards = ", ".join(s["file"] for s in provenance["shards"])
        lines.append(f"- `{run}` ({entry['model']}): checkpoint `{provenance['checkpoint']}`, code "
                     f"{provenance['code_version']}, shards {shards}")
        if entry["missing_shards"]:
            lines.append(f"  - missing shards: {'; '.join(entry['missing_shards'])}")
        if entry["missing_videos"]:
            lines.append(f"  - missing videos ({len(entry['missing_videos'])}): "
                         f"{', '.join(entry['missing_videos'][:10])}")
        if entry["failed"]:
            lines.append(f"  - failed videos: {', '.join(f['video'] for f in entry['failed'][:10])}")
    return "\n".join(lines) + "\n"
