"""`hpcvid demo`: the whole pipeline runs locally and the motion models beat the middle frame.

It runs the default size (40 train + 15 test clips per class, DESIGN 8's scale): about a minute here, and
the LSTM's margin there is wide (+55 points); at `--size small` (30 training clips per class) the LSTM
overfits and the margin shrinks to a few points above the bar.

The synthetic classes differ by appearance (2 looks) and by motion (3 motions); a middle frame carries no
motion cue, so the single-frame model can reach about 1/3, while models that see motion (flow, two-stream,
LSTM) can reach all of it. The demo must show that gap: at least 40 points over the middle frame.
"""
from __future__ import annotations

import json

import pytest

from hpcvid import cli

MARGIN = 0.40
MOTION_RUNS = ("flow", "twostream", "lstm")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--size", "default", "--out", str(root / "results"), "--work", str(root / "work"),
            "--data", str(root / "data")]
    code = cli.main(argv)
    return root, code


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_the_report(demo, capsys):
    root, code = demo
    assert code == 0
    out = root / "results"
    for name in ("summary.json", "report.md", "per_class.csv", "learning_curves.png", "improvement.png",
                 "confusion/frame.png", "confusion/lstm.png", "confusion/twostream.png", "confusion/flow.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"frame", "flow", "twostream", "lstm"}
    assert summary["partial"] is False
    assert all(run["n_videos"] == summary["n_test_videos"] for run in summary["runs"].values())
    assert (root / "work" / "demo.toml").is_file()


@pytest.mark.slow
def test_motion_models_beat_the_middle_frame_by_40_points(demo):
    """Two-stream and LSTM on the class; the flow CNN on the class's motion.

    A flow CNN sees motion but no colour (its input is grayscale displacement), so on this set its class
    accuracy is capped near (motion right) x (appearance guessed) = ~50 %, as DESIGN 8 measured; what it
    must show is the motion, which the middle frame cannot see (~1/3).
    """
    root, _ = demo
    summary = json.loads((root / "results" / "summary.json").read_text())
    middle = summary["runs"]["frame"]["strategies"]["middle"]
    default = {run: summary["runs"][run]["strategies"][summary["runs"][run]["default_strategy"]] for run in MOTION_RUNS}
    shown = {run: (round(s["top1"], 3), round(s["factors"]["motion"], 3)) for run, s in default.items()}
    context = f"middle frame class/motion {middle['top1']:.3f}/{middle['factors']['motion']:.3f}; (class, motion) {shown}"
    assert default["twostream"]["top1"] >= middle["top1"] + MARGIN, context
    assert default["lstm"]["top1"] >= middle["top1"] + MARGIN, context
    assert default["flow"]["factors"]["motion"] >= middle["factors"]["motion"] + MARGIN, context
    assert middle["factors"]["appearance"] >= 0.9, context       # the frame model does see appearance


def test_a_stage_not_built_is_skipped_and_said(tmp_path, monkeypatch, capsys):
    """Without a stage (here: every step's requirement removed) the demo runs nothing and says so."""
    from hpcvid import demo as demo_module

    monkeypatch.setattr(demo_module, "available", lambda needs: False)
    result = demo_module.run_demo(tmp_path / "out", tmp_path / "work", tmp_path / "data", size="small")
    printed = capsys.readouterr().out
    assert result["ran"] == [] and len(result["skipped"]) == 13
    assert "[9/13] eval frame: SKIPPED - stage eval is not built in this checkout" in printed
    assert not (tmp_path / "out" / "summary.json").exists()
    assert (tmp_path / "work" / "demo.toml").is_file()


def test_demo_availability_follows_the_registries(monkeypatch):
    from hpcvid import demo as demo_module
    from hpcvid import stages

    assert demo_module.available("stage eval") and demo_module.available("verb collect")
    monkeypatch.setattr(stages, "STAGES", {k: v for k, v in stages.STAGES.items() if k != "eval"})
    assert not demo_module.available("stage eval")
    assert not demo_module.available("module hpcvid.no_such_module")
