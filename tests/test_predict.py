"""``hpcvid predict``: a trained run on videos of one's own, through the real extraction, model and files.

The runs come from ``pipeline_work`` (frame CNN; LSTM on the frame CNN's recomputed features), or are
trained here on a relabelled task (triangle vs bar) for the timeline. Predict always gets a folder of its
own (``--work`` under tmp_path, or the verb's temporary one), so the shared work folder is never written.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hpcvid.cli import main
from slurm_helpers import slurm_cluster  # noqa: F401  (fixture)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _test_videos(work: Path) -> list[Path]:
    from hpcvid.storage.manifest import load_manifest

    manifest = load_manifest(work)
    root = Path(manifest.dataset["root"])
    return [root / v.path for v in manifest.by_split("test")]


# ------------------------------------------------------------------------------ pure parts
def test_sliding_windows_cover_the_video_and_end_at_its_last_frame():
    from hpcvid.learn.timeline import sliding_windows

    assert sliding_windows(48, 8, 4)[:3] == [(0, 8), (4, 12), (8, 16)]
    assert sliding_windows(48, 8, 4)[-1] == (40, 48)
    assert sliding_windows(21, 8, 5) == [(0, 8), (5, 13), (10, 18), (13, 21)]    # the last one ends at 21
    assert sliding_windows(6, 8, 4) == [(0, 6)]                                  # shorter than a window


def test_default_folder_is_beside_the_run_and_a_dataset_work_folder_is_refused(tmp_path):
    from hpcvid.errors import ConfigError
    from hpcvid.stages.predict import check_prediction_folder, default_work
    from hpcvid.workfolder import WorkFolder

    assert default_work(str(tmp_path / "w" / "runs" / "lstm")) == str(tmp_path / "w" / "predict" / "lstm")
    assert default_work(str(tmp_path / "w" / "runs" / "lstm" / "best.pt")) == str(tmp_path / "w" / "predict" / "lstm")
    (tmp_path / "manifest.json").write_text(json.dumps({"dataset": {"format": "ucf101"}}))
    with pytest.raises(ConfigError, match="dataset's work folder"):
        check_prediction_folder(WorkFolder(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"dataset": {"format": "predict"}}))
    check_prediction_folder(WorkFolder(tmp_path))


def test_find_videos_takes_files_and_folders_once_and_refuses_what_is_not_there(tmp_path):
    from hpcvid.errors import ConfigError
    from hpcvid.stages.predict import find_videos

    (tmp_path / "clips" / "a").mkdir(parents=True)
    for name in ("a/one.mp4", "two.AVI", "notes.txt"):
        (tmp_path / "clips" / name).write_bytes(b"x")
    found = find_videos([str(tmp_path / "clips"), str(tmp_path / "clips" / "two.AVI")], (".mp4", ".avi"))
    assert found == [(tmp_path / "clips", "a/one.mp4"), (tmp_path / "clips", "two.AVI")]
    with pytest.raises(ConfigError, match="does not exist"):
        find_videos([str(tmp_path / "nope.mp4")], (".mp4",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no video"):
        find_videos([str(tmp_path / "empty")], (".mp4",))


# ------------------------------------------------------------------------------ against trained runs
@pytest.mark.slow
def test_a_folder_with_a_bad_file_is_classified_and_the_bad_one_is_one_line_exit_3(pipeline_work, tmp_path, capsys):
    work, job = pipeline_work
    folder = tmp_path / "mine"
    folder.mkdir()
    for video in _test_videos(work):
        shutil.copy(video, folder / video.name)
    (folder / "broken.avi").write_bytes(b"not a video at all" * 100)
    out = tmp_path / "table.csv"
    capsys.readouterr()
    code = main(["predict", "--config", str(job), "--run", str(work / "runs" / "frame"), str(folder),
                 "--top", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 3
    assert [line for line in err.splitlines() if line.startswith("hpcvid: error:")] == [err.strip().splitlines()[-1]]
    assert "broken.avi" in err and "Traceback" not in err
    rows = _rows(out)
    assert len(rows) == 7
    bad = [r for r in rows if r["video"].endswith("broken.avi")]
    assert len(bad) == 1 and bad[0]["error"] and not bad[0]["class_1"]
    classes = json.loads((work / "manifest.json").read_text())["classes"]
    good = [r for r in rows if r is not bad[0]]
    assert all(not r["error"] and {r["class_1"], r["class_2"], r["class_3"]} <= set(classes) for r in good)
    assert all(float(r["score_1"]) >= float(r["score_2"]) >= float(r["score_3"]) for r in good)


def _scores(files) -> dict[tuple[str, str], np.ndarray]:
    from hpcvid.storage.predictions import read_prediction_shard

    found = {}
    for path in files:
        shard = read_prediction_shard(path)
        for strategy, values in shard.scores.items():
            # keyed by file name: eval's ids are below the dataset root, predict's below the folder named
            found.update({(strategy, vid.rsplit("/", 1)[-1]): row for vid, row in zip(shard.video_ids, values)})
    return found


@pytest.mark.slow
@pytest.mark.parametrize("model", ["frame", "lstm"])
def test_predict_gives_the_scores_eval_gives_on_the_same_videos(pipeline_work, tmp_path, model):
    """Same videos, same strategies: identical scores. The LSTM's features are recomputed by the frame CNN
    its training features came from. A second call redoes nothing; --out .json writes the table as JSON."""
    work, job = pipeline_work
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    assert main(["run", "eval", "--config", str(job), "--work", str(copy), "--model", model]) == 0
    predicted = tmp_path / "predicted"
    videos = [str(v) for v in _test_videos(copy)]
    argv = ["run", "predict", "--config", str(job), "--run", str(copy / "runs" / model), *videos,
            "--work", str(predicted), "--shards", "2"]
    assert main(argv) == 0
    evaluated = _scores(sorted((copy / "eval" / model).glob("pred-*.h5")))
    got = _scores(sorted((predicted / "predict" / model).glob("pred-*.h5")))
    assert len(evaluated) > 0 and set(got) == set(evaluated)
    for key, values in evaluated.items():
        np.testing.assert_allclose(got[key], values, rtol=0, atol=1e-6, err_msg=str(key))
    records = sorted((predicted / "predict" / model).glob("pred-*.json"))
    before = [p.stat().st_mtime_ns for p in records]
    assert main([*argv, "--out", str(tmp_path / "table.json")]) == 0
    assert [p.stat().st_mtime_ns for p in records] == before
    table = json.loads((tmp_path / "table.json").read_text())
    assert len(table["videos"]) == len(videos) and all(len(v["top"]) == 5 for v in table["videos"])


@pytest.mark.slow
def test_the_timeline_changes_label_within_one_window_of_the_change(tiny_synthetic, tmp_path, capsys):
    """A frame CNN trained on a relabelled task (triangle vs bar, the synthetic set's two appearances)
    labels a long clip of a triangle's motion then a bar's: every window before the change says Triangle,
    every window after says Bar, so the label changes within one window of the change."""
    from conftest import TINY_SYNTH
    from hpcvid.config import SynthConfig
    from hpcvid.stages.synth import class_names, make_held_out

    names = class_names(TINY_SYNTH["classes"])
    triangles = [n for n in names if n.startswith("Triangle")]
    job = tmp_path / "binary.toml"
    job.write_text(f"""work = "{tmp_path / 'work'}"
[dataset]
root = "{tiny_synthetic}"
format = "ucf101"
[dataset.class_map]
Triangle = {json.dumps(triangles)}
Bar = ["*"]
[extract]
size = 32
backbone = "none"
flow = "none"
device = "cpu"
[train]
backbone = "small"
epochs = 15
batch_size = 6
seq_len = 8
chunk = 4
device = "cpu"
val_fraction = 0.2
[eval]
device = "cpu"
""")
    for step in (["index"], ["run", "extract"], ["run", "train", "--model", "frame"]):
        assert main([*step, "--config", str(job)]) == 0, step
    held = make_held_out(tmp_path / "held", SynthConfig(**TINY_SYNTH), sequence=(0, len(names) - 1))
    name = next(f for f, about in held["files"].items() if "segments" in about)
    change = held["files"][name]["segments"][1]["start_frame"]
    out = tmp_path / "table.csv"
    assert main(["predict", "--config", str(job), "--run", str(tmp_path / "work" / "runs" / "frame"),
                 str(tmp_path / "held"), "--timeline", "--out", str(out)]) == 0
    timeline = _rows(tmp_path / "table_timeline" / Path(name).with_suffix(".csv").name)
    assert (tmp_path / "table_timeline" / Path(name).with_suffix(".png").name).stat().st_size > 1000
    window = 8                                          # the run's seq_len
    spans = [(int(r["start_frame"]), int(r["stop_frame"]), r["top_class"]) for r in timeline]
    assert spans[0][:2] == (0, window) and spans[-1][1] == 2 * change      # the whole clip, window by window
    assert all(label == "Triangle" for start, stop, label in spans if stop <= change), spans
    assert all(label == "Bar" for start, stop, label in spans if start >= change), spans
    rows = {Path(r["video"]).name: r for r in _rows(out)}
    assert len(rows) == len(names) + 1
    single = [r for n, r in rows.items() if n.startswith("held_out_")]
    # in a folder named after a dataset class: the task's class is the truth, and the model finds it
    assert sorted(r["true_class"] for r in single) == sorted("Triangle" if n in triangles else "Bar" for n in names)
    assert all(r["class_1"] == r["true_class"] for r in single), single


@pytest.mark.slow
def test_an_lstm_whose_frame_cnn_was_retrained_since_is_refused(pipeline_work, tmp_path, capsys):
    """The LSTM's features would be recomputed by another CNN than the one that made its training features:
    refused with one line, nothing classified."""
    work, job = pipeline_work
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    assert main(["run", "train", "--config", str(job), "--work", str(copy), "--model", "frame", "--force"]) == 0
    capsys.readouterr()
    code = main(["predict", "--config", str(job), "--run", str(copy / "runs" / "lstm"),
                 *map(str, _test_videos(copy)[:1]), "--out", str(tmp_path / "t.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "retrain" in err[0], err
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.slow
@pytest.mark.slurm
def test_submit_predict_runs_sharded_on_the_real_slurm_and_the_last_shard_writes_one_table(
        slurm_cluster, pipeline_work, tmp_path, capsys):
    from slurm_helpers import wait_finished

    work, job = pipeline_work
    predicted, out = tmp_path / "predicted", tmp_path / "all.csv"
    videos = [str(v) for v in _test_videos(work)]
    root = Path(__file__).resolve().parents[1]
    capsys.readouterr()
    assert main(["submit", "predict", "--config", str(job), "--run", str(work / "runs" / "lstm"), *videos,
                 "--shards", "2", "--work", str(predicted), "--out", str(out),
                 "--profile", str(root / "slurm" / "local.toml"), "--walltime", "00:10:00"]) == 0
    assert "predict/lstm: submitted 2 job(s) on slurm" in capsys.readouterr().out
    submission = json.loads(next((predicted / "jobs").glob("predict-lstm-*.json")).read_text())
    states = wait_finished(submission["job_ids"], timeout=300)
    assert {s.state for s in states.values()} == {"COMPLETED"}, states
    rows = _rows(out)
    assert sorted(Path(r["video"]).name for r in rows) == sorted(Path(v).name for v in videos)
    assert all(r["class_1"] and not r["error"] for r in rows)
    capsys.readouterr()
    assert main(["status", str(predicted)]) == 0
    table = capsys.readouterr().out
    assert len([line for line in table.splitlines() if line.startswith("predict/lstm ") and "COMPLETED" in line]) == 2
