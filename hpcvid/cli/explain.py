"""``hpcvid explain --run WORK/runs/NAME --video ID [--class C] [--frames N] [--out DIR]``: Grad-CAM overlays.

Where in its frames a trained model found the evidence for a class (:mod:`hpcvid.learn.gradcam`), for the
models that see pixels: frame, flow, twostream (both streams), the TSN kinds (one map per snippet), c3d
(one per frame of its clip) and cnnlstm (one per frame of its window). The video may be of any split; its
frames and flow come from the work folder's current extraction. Writes one PNG into ``--out`` (default
``WORK/explain/<run>/``) and prints its path and the prediction.
"""
from __future__ import annotations

import argparse


def add_cli(parser: argparse.ArgumentParser) -> None:
    from hpcvid.cli import positive_int

    parser.add_argument("--run", required=True, metavar="RUN",
                        help="a trained run: its folder WORK/runs/NAME (best.pt) or a checkpoint file")
    parser.add_argument("--video", required=True, metavar="ID", help="video id of the work folder's manifest")
    parser.add_argument("--class", dest="target", metavar="C",
                        help="the class whose evidence to show: a name or an index (default: the predicted class)")
    parser.add_argument("--frames", type=positive_int, default=4, metavar="N",
                        help="frames (or stacks, snippets) shown, evenly spaced (default 4)")
    parser.add_argument("--out", metavar="DIR", help="folder for the PNG (default: WORK/explain/<run>/)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hpcvid.stages.explain import class_index, draw, explain_video, load_explainer, picture_name, work_of
    from hpcvid.workfolder import WorkFolder

    explainer = load_explainer(args.run, args.device)
    classes = list(explainer.manifest.classes)
    explanation = explain_video(explainer, args.video, class_index(args.target, classes), args.frames)
    run = Path(args.run)
    name = (run.parent if run.is_file() else run).name
    out = Path(args.out) if args.out else WorkFolder(work_of(run)).explain_dir(name)
    picture = draw(explanation, classes, out / picture_name(args.video, classes[explanation.target]), f"{name}: ")
    print(f"{args.video}: true {classes[explanation.label]}, predicted {classes[explanation.predicted]} "
          f"({explanation.probabilities[explanation.predicted]:.3f}); heat map of {classes[explanation.target]}")
    print(f"written: {picture}")
    return 0
