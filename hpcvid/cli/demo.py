"""``hpcvid demo``: the whole pipeline on a small synthetic dataset, on this machine, in a few minutes.

synth -> index -> extract (several shards) -> merge -> train frame, flow, twostream -> features -> train lstm
-> eval (sharded) -> collect -> predict (the LSTM on clips no split holds, with a timeline over a long clip of
two classes in turn), every stage through the same command line a user types (``hpcvid.cli.main``), with a job file
written into the work folder so that each step can be re-run by hand. It ends with the results table and
the path of the report.

Every stage is resumable, so a second ``hpcvid demo`` redoes nothing (``--force`` starts again from an
empty work folder).

The LSTM reads features of the fine-tuned frame CNN (``run features``), not the
extraction backbone's: with no ImageNet weights here that backbone is randomly initialised, and its pooled
features barely encode the object's size (a linear read-out of log size from them: R^2 0.1-0.3), so the
LSTM stopped at 66-86 % (with synth's earlier 1.8x expansion); over the fine-tuned CNN's features it reached
94-99 % on the same clips. The frame CNN is trained only briefly (3 epochs): it has learnt the appearances
by then, and further training on a task where one frame cannot tell the motion teaches it to ignore size
(default size, two seeds: the LSTM over its features reached 98.3 % after 3 epochs, 95-96 % after 4).

``--all-models`` trains and evaluates every kind of :data:`hpcvid.learn.kinds.KINDS` (also the three TSN
modalities, C3D and the end-to-end CNN-LSTM) after those four, fuses the TSN RGB and flow runs in the report
and adds Grad-CAM examples; the default demo runs the four classic kinds only, as fast as before.

Sizes (``--size``): ``ci`` is the scale CI runs (6 classes, 40 train + 15 test clips per
class, 16 frames of 64x64 px); ``default`` is larger (60 + 20 clips per class), so its accuracies are
measured on more test videos.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

# Both sizes train and evaluate alike; they differ in the number of clips. A model kind without demo epochs
# here trains for the job file's (train.epochs). The kinds past the first four run with --all-models.
_STAGES: dict[str, Any] = {
    "extract": {"shards": 3, "size": 64},
    "epochs": {"frame": 3, "flow": 25, "twostream": 5, "lstm": 40,
               "tsn_rgb": 5, "tsn_flow": 10, "tsn_diff": 8, "c3d": 15, "cnnlstm": 8},
    "eval_shards": 2,
}
EXPLAINED = 2
"""Test videos per run whose Grad-CAM overlays `--all-models` puts in the report (one wrong, one right)."""
_SYNTH: dict[str, Any] = {"classes": 6, "frames": 16, "size": "64x64", "seed": 0}
DEMO_SIZES: dict[str, dict[str, Any]] = {
    "default": {"synth": {**_SYNTH, "per_class": 80, "test_per_class": 20}, **_STAGES},
    "ci": {"synth": {**_SYNTH, "per_class": 55, "test_per_class": 15}, **_STAGES},
}

def job_toml(work: Path, data: Path, size: str) -> str:
    """The demo's job file (TOML), written to WORK/demo.toml: every setting the demo uses."""
    spec = DEMO_SIZES[size]
    synth = spec["synth"]
    extract = spec["extract"]
    return f"""# Written by `hpcvid demo --size {size}`: the demo's settings as a job file.
# Re-run any step by hand, e.g.  hpcvid run eval --config {work / 'demo.toml'} --model lstm
work = "{work}"

[dataset]
root = "{data}"
format = "ucf101"
split = 1

[synth]
classes = {synth['classes']}
per_class = {synth['per_class']}
test_per_class = {synth['test_per_class']}
frames = {synth['frames']}
size = "{synth['size']}"
seed = {synth['seed']}

[extract]
shards = {extract['shards']}
sampling = "all"
resize = "square"
size = {extract['size']}
flow = "farneback"
backbone = "resnet18"
batch_size = 32
device = "cpu"

[train]
backbone = "small"
batch_size = 16
lr = 0.002
seq_len = {synth['frames']}
chunk = {max(1, synth['frames'] // 2)}
layers = 1
hidden = 128
dropout = 0.2
flow_stack = {min(10, synth['frames'] - 1)}
fusion_weights = [1.0, 1.5]
device = "cpu"
val_fraction = 0.15
# Patience 10: validation is 15 % of the train split (36 clips at CI size), and with 4 the LSTM stopped
# at epoch 10 on one seed, at 85.6 % (94.4 % with 10).
early_stopping = 10
# A horizontal flip turns a left rotation into a right one: on this set it changes the label (flow CNN,
# CI size: motion 90.0 % with flips, 98.9 % without). Keep it on for UCF-101-like data.
flip = false
# --all-models: segment networks, C3D (narrowed to train on a CPU in minutes) and the end-to-end CNN-LSTM
tsn_segments = 3
tsn_stack = 5
clip_frames = {synth['frames']}
c3d_width = 8
c3d_fc = 128

[eval]
shards = {spec['eval_shards']}
window_stride = {max(1, synth['frames'] // 4)}
tsn_snippets = 8
clip_stride = {max(1, synth['frames'] // 2)}
device = "cpu"
"""


# ------------------------------------------------------------------------------------------- steps
class Step:
    """One line of the demo's plan: its name and the call that runs it."""

    def __init__(self, name: str, action: Callable[[], int]) -> None:
        self.name, self.action = name, action


def _cli(*argv: str) -> int:
    from hpcvid.cli import main

    return main(list(argv))


# Per-model training flags on top of the job file. On the fine-tuned CNN's features, the LSTM with dropout
# 0.3 and weight decay 0.01 reached 98.9 % where 0.5 / 0.1 (right for the random backbone's features, which
# it memorised at once) reached 95.6 % (CI size, 40 epochs).
TRAIN_FLAGS: dict[str, tuple[str, ...]] = {"lstm": ("--dropout", "0.3", "--weight-decay", "0.01")}


def _train(job: Path, model: str, epochs: int | None) -> int:
    epoch_flags = ("--epochs", str(epochs)) if epochs else ()
    return _cli("run", "train", "--config", str(job), "--model", model, *epoch_flags, *TRAIN_FLAGS.get(model, ()))


def build_steps(job: Path, work: Path, data: Path, out: Path, size: str, all_models: bool = False) -> list[Step]:
    """The demo's steps: the four classic kinds (:data:`hpcvid.learn.kinds.DEFAULT_KINDS`), or every kind."""
    from hpcvid.learn.kinds import DEFAULT_KINDS, FEATURES, KINDS

    spec = DEMO_SIZES[size]
    models = {name: kind for name, kind in KINDS.items() if all_models or name in DEFAULT_KINDS}
    steps = [
        Step("synth", lambda: _cli("synth", "--config", str(job), str(data))),
        Step("index", lambda: _cli("index", "--config", str(job))),
        Step("extract", lambda: _cli("run", "extract", "--config", str(job))),
        Step("merge", lambda: _cli("run", "merge", "--config", str(job))),
    ]
    for model, kind in models.items():    # table order: a kind comes after the kinds it starts from
        if FEATURES in kind.reads and not any(step.name == "features" for step in steps):
            # feature models train on the fine-tuned frame CNN's features (module docstring)
            steps.append(Step("features", lambda: _cli("run", "features", "--config", str(job))))
        steps.append(Step(f"train {model}",
                          lambda model=model: _train(job, model, spec["epochs"].get(model))))
    for model in models:
        steps.append(Step(f"eval {model}",
                          lambda model=model: _cli("run", "eval", "--config", str(job), "--model", model)))
    steps.append(Step("collect", lambda: _collect(work, out, EXPLAINED if all_models else 0)))
    steps.append(Step(f"predict {PREDICT_RUN}", lambda: _predict(job, work, out, spec)))
    return steps


PREDICT_RUN = "lstm"     # the demo's best model on motion and appearance both


def _predict(job: Path, work: Path, out: Path, spec: dict[str, Any]) -> int:
    """Clips no split holds, one per class plus a long one of two classes in turn, classified by the
    trained LSTM with a timeline: its strip shows the class change half-way."""
    from hpcvid.config import SynthConfig
    from hpcvid.stages.synth import make_held_out

    held = work / "held_out"
    if not (held / "held_out.json").is_file():
        synth = spec["synth"]
        make_held_out(held, SynthConfig(**{k: v for k, v in synth.items()}))
    return _cli("predict", "--config", str(job), "--run", str(work / "runs" / PREDICT_RUN), str(held),
                "--timeline", "--top", "3", "--work", str(work / "predict" / PREDICT_RUN),
                "--out", str(out / "predict" / "predictions.csv"))


def synthetic_factors(classes: list[str]) -> dict[str, list[str]] | None:
    """{"motion": [...], "appearance": [...]} per class of the synthetic set (None for other datasets).

    The demo's point is that only models that see motion get the motion right; a flow CNN sees no colour,
    so its class accuracy is capped by appearance while its motion accuracy is not. The report shows both.
    """
    from hpcvid.stages.synth import APPEARANCES

    factors: dict[str, list[str]] = {"appearance": [], "motion": []}
    for name in classes:
        look = next((a for a in APPEARANCES if name.startswith(a)), None)
        if look is None:
            return None
        factors["appearance"].append(look)
        factors["motion"].append(name[len(look):])
    return factors


def _collect(work: Path, out: Path, explain: int = 0) -> int:
    """The reducer (the `collect` verb's function), with the synthetic classes' motion/appearance factors, the
    default fusion of the segment networks (when they ran) and ``explain`` Grad-CAM examples per run."""
    from hpcvid.config import ReportConfig, parse_fusion
    from hpcvid.storage.manifest import load_manifest
    from hpcvid.stages.reduce import collect
    from hpcvid.stages.report import read_summary

    factors = synthetic_factors(list(load_manifest(work).classes))
    collect(work, out, allow_partial=True, factors=factors, fusion=parse_fusion(ReportConfig().fusion),
            explain=explain)
    return 3 if read_summary(out).get("partial") else 0   # 3: written, but some predictions are missing


# --------------------------------------------------------------------------------------------- CLI
def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", default="results/demo", help="report folder (default: results/demo)")
    parser.add_argument("--work", metavar="WORK", default="work/demo", help="work folder (default: work/demo)")
    parser.add_argument("--data", metavar="DIR", default="data/demo", help="dataset folder (default: data/demo)")
    parser.add_argument("--size", choices=tuple(DEMO_SIZES), default="default",
                        help="ci: the CI scale (40 + 15 clips per class); default: larger (60 + 20)")
    parser.add_argument("--all-models", action="store_true",
                        help="train and compare every model kind (also TSN, C3D, CNN-LSTM), with Grad-CAM examples; "
                             "default: frame, flow, twostream, lstm")
    parser.add_argument("--force", action="store_true", help="delete the work folder and start again")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="torch threads (default: all cores of this machine)")


def run_demo(out: Path | str = "results/demo", work: Path | str = "work/demo", data: Path | str = "data/demo",
             size: str = "default", force: bool = False, threads: int = 0, all_models: bool = False) -> dict[str, Any]:
    """Run every step; returns {"ran": [...], "failed": [...], "out": Path}."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    out, work, data = Path(out), Path(work), Path(data)
    if force and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    job = work / "demo.toml"
    job.write_text(job_toml(work.resolve(), data.resolve(), size))
    steps = build_steps(job, work, data, out, size, all_models)
    ran, failed = [], []
    started = time.time()
    for number, step in enumerate(steps, start=1):
        prefix = f"[{number}/{len(steps)}] {step.name}"
        print(f"{prefix} ...", flush=True)
        t0 = time.time()
        code = step.action()
        took = time.time() - t0
        if code not in (0, None):
            print(f"{prefix}: exit code {code} after {took:.0f} s", flush=True)
            failed.append(step.name)
            if code != 3:            # 3 = finished, some items failed: the later steps still make sense
                break
        else:
            print(f"{prefix}: done in {took:.0f} s", flush=True)
        ran.append(step.name)
    print(f"demo: {len(ran)} steps ran, {len(failed)} failed, "
          f"{time.time() - started:.0f} s in all", flush=True)
    return {"ran": ran, "failed": failed, "out": out}


def format_factors(summary: dict[str, Any]) -> str:
    """Plain text: class, motion and appearance accuracy of each run's default strategy."""
    from hpcvid.stages.report import ordered_runs

    names = list(summary["factors"])
    width = max([10, *(len(run) for run in summary["runs"])])
    lines = [f"{'run':<{width}} {'strategy':<14} {'class %':>8} " + " ".join(f"{n + ' %':>12}" for n in names)]
    for run in ordered_runs(summary["runs"]):
        entry = summary["runs"][run]
        numbers = entry["strategies"][entry["default_strategy"]]
        values = " ".join(f"{100 * numbers['factors'][n]:>12.1f}" for n in names)
        lines.append(f"{run:<{width}} {entry['default_strategy']:<14} {100 * numbers['top1']:>8.1f} {values}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run_demo(args.out, args.work, args.data, args.size, args.force, args.threads, args.all_models)
    summary_path = Path(result["out"]) / "summary.json"
    if "collect" in result["ran"] and summary_path.is_file():
        from hpcvid.stages.report import format_table, read_summary

        print()
        summary = read_summary(result["out"])
        print(format_table(summary))
        if summary.get("factors"):
            print()
            print(format_factors(summary))
        print(f"\nreport: {Path(result['out']) / 'report.md'}")
    if result["failed"]:
        print(f"failed: {', '.join(result['failed'])}", file=sys.stderr)
        return 3
    return 0
