"""Grad-CAM overlays of trained runs: what ``hpcvid explain`` and ``hpcvid collect --explain K`` draw.

:func:`explain_video` loads a run (its folder ``WORK/runs/<run>`` or a checkpoint file), finds the video in the
work folder's manifest and current extraction shards (any split), and asks the kind's scorer for its
:class:`hpcvid.learn.gradcam.Explanation`: the input built as evaluation builds it, the heat maps of the
asked class (default: the predicted one). :func:`draw` writes one PNG per explanation: the frames the
model saw on top, the heat maps over them below, and a title with the true, predicted and explained class.

:func:`report_examples` chooses, per evaluated run whose model sees pixels, K test videos from its prediction
shards (one wrongly and one rightly classified video of each class in turn, the least accurate classes
first) and draws them into ``<report>/explain/<run>/``. torch and matplotlib are imported inside functions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hpcvid.errors import ConfigError
from hpcvid.workfolder import WorkFolder

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One drawn explanation, as the report lists it."""

    run: str
    video: str
    label: str
    predicted: str
    right: bool
    picture: Path


def work_of(run: Path | str) -> Path:
    """The work folder of a run folder (``WORK/runs/<run>``) or of a checkpoint file in one."""
    run = Path(run)
    folder = run.parent if run.is_file() else run
    return folder.parent.parent


def class_index(wanted: str | int | None, classes: Sequence[str]) -> int | None:
    """``--class``: a class name or index (None: the predicted class); anything else is refused with the list."""
    if wanted is None or wanted == "":
        return None
    if str(wanted) in classes:
        return list(classes).index(str(wanted))
    if str(wanted).isdigit() and int(wanted) < len(classes):
        return int(wanted)
    raise ConfigError(f"--class {wanted!r} is neither a class name nor an index below {len(classes)}; classes: "
                      f"{', '.join(classes)}")


@dataclass
class Explainer:
    """A trained run ready to explain any video of its work folder."""

    scorer: Any              # the kind's scorer, over every video of the current extraction
    meta: dict[str, Any]
    manifest: Any
    work: Path


def load_explainer(run: Path | str, device: str = "auto") -> Explainer:
    """The run's model, its kind's scorer and the work folder's manifest; a model without pixels is refused."""
    from hpcvid.config import replace
    from hpcvid.learn.backbones import pick_device
    from hpcvid.learn.checkpoints import load_run
    from hpcvid.learn.kinds import KINDS, explains, get_kind
    from hpcvid.stages.evaluate import check_trained_on, make_scorer
    from hpcvid.storage.manifest import load_manifest

    work = work_of(run)
    folder = WorkFolder(work).require("explain")
    where = pick_device(device)
    model, run_config, meta = load_run(run, device=str(where))
    if not explains(get_kind(meta["kind"])):
        pixels = [name for name, kind in KINDS.items() if explains(kind)]
        raise ConfigError(f"{meta['checkpoint']} holds a {meta['kind']} model ({get_kind(meta['kind']).help}): "
                          f"Grad-CAM needs a model that sees pixels ({', '.join(pixels)})")
    check_trained_on(folder, meta)
    config = replace(run_config, work=str(work))
    scorer = make_scorer(model, meta, config, config, where, splits=None)
    return Explainer(scorer, meta, load_manifest(work), work)


def explain_video(explainer: Explainer, video_id: str, target: int | None, frames: int) -> Any:
    """The run's :class:`hpcvid.learn.gradcam.Explanation` of one video of the manifest (any split)."""
    entry = next((v for v in explainer.manifest.videos if v.id == video_id), None)
    if entry is None:
        raise ConfigError(f"video {video_id!r} is not in {WorkFolder(explainer.work).manifest}: give a video id "
                          "as the manifest and the report name them")
    return explainer.scorer.explain(entry, target, frames)


def draw(explanation: Any, classes: Sequence[str], path: Path, title: str = "") -> Path:
    """One PNG: the frames on top, the heat maps over them below, captions, and the classes in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpcvid.fileio import atomic_path
    from hpcvid.learn.gradcam import overlay

    panels = explanation.panels
    columns = len(panels)
    figure, axes = plt.subplots(2, columns, figsize=(2.2 * columns + 0.4, 5.0), squeeze=False)
    for column, panel in enumerate(panels):
        axes[0, column].imshow(panel.image)
        axes[1, column].imshow(overlay(panel.image, panel.heat))
        axes[0, column].set_title(panel.caption, fontsize=8)
        for row in (0, 1):
            axes[row, column].axis("off")
    probabilities = explanation.probabilities
    figure.suptitle(f"{title}{explanation.video}: true {classes[explanation.label]}, predicted "
                    f"{classes[explanation.predicted]} ({probabilities[explanation.predicted]:.2f}); heat map of "
                    f"{classes[explanation.target]}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def picture_name(video: str, target_class: str) -> str:
    from hpcvid.stages.report import safe_name

    return f"{safe_name(video)}__{safe_name(target_class)}.png"


# ------------------------------------------------------------------------------ the report's examples
def pick_examples(ids: Sequence[str], labels: Sequence[int], predicted: Sequence[int], count: int) -> list[tuple[str, bool]]:
    """(video id, rightly classified) of up to ``count`` videos: one wrong and one right of each class in turn.

    Classes come least accurate first (ties: lower index), so the wrong ones show the model's confusions;
    within a class the first id in sorted order is taken. ``pick_examples(["a", "b", "c"], [0, 0, 1],
    [1, 0, 1], 2) == [("a", False), ("b", True)]``.
    """
    by_class: dict[int, dict[bool, list[str]]] = {}
    for video, label, guess in sorted(zip(ids, labels, predicted)):
        by_class.setdefault(int(label), {True: [], False: []})[int(label) == int(guess)].append(video)
    order = sorted(by_class, key=lambda c: (len(by_class[c][True]) / max(1, sum(map(len, by_class[c].values()))), c))
    chosen: list[tuple[str, bool]] = []
    for label in order:
        for right in (False, True):
            if by_class[label][right] and len(chosen) < count:
                chosen.append((by_class[label][right][0], right))
    return chosen


def report_examples(reduction: Any, out: Path, count: int, frames: int = 4) -> list[Example]:
    """Draw ``count`` test videos of each evaluated run whose model sees pixels into ``out/explain/<run>/``."""
    from hpcvid.learn.kinds import KINDS, explains
    from hpcvid.stages.reduce import plan_run
    from hpcvid.stages.report import ordered_runs
    from hpcvid.storage.predictions import read_prediction_shard

    examples: list[Example] = []
    folder = WorkFolder(reduction.work)
    for run in ordered_runs(reduction.runs):
        total = reduction.runs[run]
        kind = KINDS.get(total.model)
        if kind is None or not explains(kind):
            continue
        ready = plan_run(reduction.work, run).ready
        shards = [read_prediction_shard(path) for path, _ in ready]
        ids = [v for shard in shards for v in shard.video_ids]
        labels = [int(x) for shard in shards for x in shard.labels]
        guesses = [int(x) for shard in shards for x in shard.scores[total.default_strategy].argmax(axis=1)]
        if not ids:
            continue
        explainer = load_explainer(folder.absolute(total.checkpoint))
        guess_of = dict(zip(ids, guesses))
        for video, right in pick_examples(ids, labels, guesses, count):
            explanation = explain_video(explainer, video, guess_of[video], frames)
            target_class = total.classes[explanation.target]
            picture = draw(explanation, total.classes, out / "explain" / run / picture_name(video, target_class),
                           f"{run} ({total.default_strategy}): ")
            examples.append(Example(run, video, total.classes[explanation.label], total.classes[guess_of[video]],
                                    right, picture.relative_to(out)))
    return examples
