"""A task made of the dataset's classes (dataset.class_map) through index, extract, train, eval and collect."""
from __future__ import annotations

import csv
import json

import pytest

from hpcvid.cli import main

pytestmark = pytest.mark.slow


def test_a_relabelled_task_runs_through_every_stage(tiny_synthetic, tmp_path):
    work, out = tmp_path / "work", tmp_path / "report"
    job = tmp_path / "task.toml"
    job.write_text(f'work = "{work}"\n[dataset]\nroot = "{tiny_synthetic}"\nformat = "ucf101"\n'
                   '[dataset.class_map]\ngrows = ["TriangleExpand", "BarExpand"]\nother = "*"\n'
                   '[extract]\nsize = 32\nbackbone = "none"\nflow = "none"\n'
                   '[train]\nbackbone = "small"\nepochs = 1\nbatch_size = 6\ndevice = "cpu"\n[eval]\ndevice = "cpu"\n')
    for step in (["index"], ["run", "extract"], ["run", "train", "--model", "frame"],
                 ["run", "eval", "--model", "frame"]):
        assert main([*step, "--config", str(job)]) == 0, step
    assert main(["collect", str(work), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == ["grows", "other"] and summary["n_test_videos"] == 6
    assert summary["dataset"]["task"] == {"grows": ["BarExpand", "TriangleExpand"],
                                          "other": ["BarContract", "BarRotateLeft", "TriangleContract",
                                                    "TriangleRotateLeft"]}
    frame = summary["runs"]["frame"]["strategies"]["middle"]
    assert frame["n_videos"] == 6 and frame["f1_macro"] is not None
    with open(out / "per_class.csv") as handle:
        assert {row["class"] for row in csv.DictReader(handle)} == {"grows", "other"}
    report = (out / "report.md").read_text()
    assert "## Classes of the task" in report and "| grows | BarExpand, TriangleExpand |" in report
