"""The reducer: sums over prediction shards equal the sum over their concatenation; exactly-once checks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hpcvid import cli
from hpcvid.learn import metrics
from hpcvid.errors import StoreError
from hpcvid.storage.predictions import read_prediction_shard, read_record
from hpcvid.stages.reduce import reduce_files

from damage import flip_byte, set_schema_version, store_error_line, unchecked_datasets
from predictions_factory import make_manifest, write_run

STRATEGIES = {"windows": 0.7, "last_step": 0.5, "mean": 0.6}


def _numbers(reduction):
    return {run: ({s: total.confusion[s].tolist() for s in total.strategies},
                  {s: dict(total.topk[s]) for s in total.strategies}, sorted(total.videos))
            for run, total in reduction.runs.items()}


def test_three_shards_equal_their_concatenation(tmp_path):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    manifest = make_manifest(sharded, n_classes=12, test_per_class=4)
    make_manifest(single, n_classes=12, test_per_class=4)
    paths = write_run(sharded, manifest, "lstm", "lstm", STRATEGIES, shards=3, seed=1)
    write_run(single, manifest, "lstm", "lstm", STRATEGIES, shards=1, seed=1)
    assert len(paths) == 3 and all(read_prediction_shard(p).video_ids for p in paths)

    by_shards, by_one = reduce_files(sharded), reduce_files(single)
    assert _numbers(by_shards) == _numbers(by_one)
    assert by_shards.runs["lstm"].n_videos == 48 and not by_shards.partial

    # and both equal the metrics computed directly on the concatenated arrays
    whole = read_prediction_shard(single / "eval" / "lstm" / "pred-0000-of-0001.h5")
    for strategy in STRATEGIES:
        confusion = metrics.confusion_counts(whole.scores[strategy], whole.labels)
        assert by_shards.runs["lstm"].confusion[strategy].tolist() == confusion.tolist()
        assert by_shards.runs["lstm"].topk[strategy][5] == metrics.topk_hits(whole.scores[strategy], whole.labels, 5)


def test_a_missing_shard_is_named(tmp_path):
    manifest = make_manifest(tmp_path)
    write_run(tmp_path, manifest, "lstm", "lstm", STRATEGIES, shards=3, skip=(1,))
    with pytest.raises(StoreError, match=r"pred-0001-of-0003\.h5 is missing"):
        reduce_files(tmp_path)


def test_a_shard_killed_before_its_record_counts_as_missing(tmp_path):
    manifest = make_manifest(tmp_path)
    write_run(tmp_path, manifest, "lstm", "lstm", STRATEGIES, shards=3)
    (tmp_path / "eval" / "lstm" / "pred-0002-of-0003.json").unlink()
    with pytest.raises(StoreError, match=r"pred-0002-of-0003\.h5 has no record"):
        reduce_files(tmp_path)


def test_a_shard_changed_after_its_record_is_refused(tmp_path):
    manifest = make_manifest(tmp_path)
    write_run(tmp_path, manifest, "lstm", "lstm", STRATEGIES, shards=2)
    with open(tmp_path / "eval" / "lstm" / "pred-0000-of-0002.h5", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(StoreError, match=r"pred-0000-of-0002\.h5 does not match the sha256 in its record"):
        reduce_files(tmp_path)
    with pytest.raises(StoreError, match=r"redo shard 0 with `hpcvid run eval --model lstm --config JOB --shard 0 --force`"):
        reduce_files(tmp_path, allow_partial=True)   # corrupt is not missing: never reported over


def test_a_flipped_byte_in_a_prediction_shard_is_one_line_naming_the_file(tmp_path):
    manifest = make_manifest(tmp_path)
    path = write_run(tmp_path, manifest, "lstm", "lstm", STRATEGIES, shards=2)[1]
    assert unchecked_datasets(path) == []
    np.testing.assert_array_equal(read_prediction_shard(path).video_ids, read_record(path.with_suffix(".json"))["videos"])
    flip_byte(path, "scores/mean")
    message = store_error_line(lambda: read_prediction_shard(path))
    assert str(path) in message and "hpcvid run eval --force" in message


def test_a_prediction_shard_of_the_previous_schema_is_refused_with_the_fix(tmp_path):
    manifest = make_manifest(tmp_path)
    path = write_run(tmp_path, manifest, "lstm", "lstm", STRATEGIES, shards=1)[0]
    set_schema_version(path, 1)
    message = store_error_line(lambda: read_prediction_shard(path))
    assert "schema_version 1" in message and "hpcvid run eval --force" in message


def test_a_duplicated_video_is_named(tmp_path):
    manifest = make_manifest(tmp_path)
    write_run(tmp_path, manifest, "lstm", "lstm", STRATEGIES, shards=3)
    # rewrite shard 2 so that it also holds the first video of shard 0
    from predictions_factory import write_shard
    from hpcvid.workfolder import Unit, WorkFolder

    folder = tmp_path / "eval" / "lstm"
    first = read_prediction_shard(folder / "pred-0000-of-0003.h5")
    third = read_prediction_shard(folder / "pred-0002-of-0003.h5")
    third.video_ids.append(first.video_ids[0])
    third.labels = np.append(third.labels, first.labels[0])
    third.scores = {s: np.vstack([third.scores[s], first.scores[s][:1]]) for s in third.strategies}
    third.splits = None
    write_shard(tmp_path, third, WorkFolder(tmp_path).current_set(Unit("eval", "lstm")).id)
    duplicated = first.video_ids[0]
    with pytest.raises(StoreError, match=rf"video {duplicated} of run lstm was counted twice: in "
                                         r"pred-0000-of-0003\.h5 and in pred-0002-of-0003\.h5"):
        reduce_files(tmp_path)


def test_allow_partial_reports_what_is_missing(tmp_path):
    manifest = make_manifest(tmp_path)
    write_run(tmp_path, manifest, "lstm", "lstm", STRATEGIES, shards=3, skip=(0,))
    reduction = reduce_files(tmp_path, allow_partial=True)
    assert reduction.partial
    assert "pred-0000-of-0003.h5" in reduction.missing_shards["lstm"][0]
    expected_missing = sorted(v.id for v in manifest.by_split("test"))[0::3]
    assert reduction.missing_videos["lstm"] == expected_missing
    assert reduction.runs["lstm"].n_videos == 30 - len(expected_missing)


def test_a_test_video_counted_by_no_shard_is_named(tmp_path):
    manifest = make_manifest(tmp_path)
    write_run(tmp_path, manifest, "lstm", "lstm", STRATEGIES, shards=1)
    # the manifest gains a test video the evaluation never saw
    from dataclasses import replace as dc_replace

    from hpcvid.storage.manifest import write_manifest

    extra = dc_replace(manifest.videos[0], id="Class000/v_new_video")
    write_manifest(dc_replace(manifest, videos=manifest.videos + (extra,)), tmp_path)
    with pytest.raises(StoreError, match=r"1 test video\(s\) counted by no shard, e.g. Class000/v_new_video"):
        reduce_files(tmp_path)


def test_no_predictions_is_a_clear_error(tmp_path):
    make_manifest(tmp_path)
    with pytest.raises(StoreError, match="no prediction shards under"):
        reduce_files(tmp_path)


def test_collect_cli_writes_the_report_and_prints_the_table(tmp_path, capsys):
    manifest = make_manifest(tmp_path / "work")
    write_run(tmp_path / "work", manifest, "frame", "frame", {"middle": 0.3, "mean_frames": 0.35}, shards=2)
    write_run(tmp_path / "work", manifest, "lstm", "lstm", STRATEGIES, shards=2)
    out = tmp_path / "results" / "x"
    assert cli.main(["collect", str(tmp_path / "work"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "windows *" in printed and "middle *" in printed and str(out / "report.md") in printed
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["runs"]) == ["frame", "lstm"]
    assert read_record(tmp_path / "work" / "eval" / "lstm" / "pred-0001-of-0002.json")["n_videos"] == 15
    # a missing shard through the CLI: one line, exit code 2
    (tmp_path / "work" / "eval" / "lstm" / "pred-0001-of-0002.json").unlink()
    assert cli.main(["collect", str(tmp_path / "work"), "--out", str(out)]) == 2
    assert "pred-0001-of-0002.h5 has no record" in capsys.readouterr().err
    assert cli.main(["collect", str(tmp_path / "work"), "--out", str(out), "--allow-partial"]) == 3


# ------------------------------------------------------------------------------------------ fusion
def _fused_by_hand(work, weights):
    """The weighted mean of each run's default scores per video, and the labels, from the shards directly."""
    rows, labels = {}, {}
    for run, weight in weights.items():
        for path in sorted((work / "eval" / run).glob("pred-*.h5")):
            shard = read_prediction_shard(path)
            for video, label, score in zip(shard.video_ids, shard.labels, shard.scores[shard.default_strategy]):
                rows[video] = rows.get(video, 0) + weight * score / sum(weights.values())
                labels[video] = label
    videos = sorted(rows)
    return np.stack([rows[v] for v in videos]), np.array([labels[v] for v in videos])


def test_the_reducer_fuses_the_default_scores_of_runs_with_their_weights(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "results"
    manifest = make_manifest(work, n_classes=6, test_per_class=6)
    write_run(work, manifest, "tsn_rgb", "tsn_rgb", {"segments": 0.4, "dense": 0.5}, shards=2, seed=3)
    write_run(work, manifest, "tsn_flow", "tsn_flow", {"segments": 0.6, "dense": 0.1}, shards=3, seed=4)
    assert cli.main(["collect", str(work), "--out", str(out)]) == 0         # the default: 1 : 1.5
    summary = json.loads((out / "summary.json").read_text())
    fused = summary["runs"]["tsn_rgb+tsn_flow"]
    assert fused["model"] == "fusion" and fused["default_strategy"] == "weighted_1:1.5"
    assert fused["fusion"] == {"tsn_rgb": {"weight": 1.0, "strategy": "segments"},
                               "tsn_flow": {"weight": 1.5, "strategy": "segments"}}
    scores, labels = _fused_by_hand(work, {"tsn_rgb": 1.0, "tsn_flow": 1.5})
    numbers = fused["strategies"]["weighted_1:1.5"]
    assert numbers["n_videos"] == 36 and numbers["correct"] == int((scores.argmax(1) == labels).sum())
    assert numbers["topk_hits"]["5"] == metrics.topk_hits(scores, labels, 5)
    report = (out / "report.md").read_text()
    assert "1 x `tsn_rgb` (segments) + 1.5 x `tsn_flow` (segments)" in report and "| tsn_rgb+tsn_flow | fusion |" in report
    # weights from the command line; the fusion changes with them
    assert cli.main(["collect", str(work), "--out", str(out), "--fuse", "tsn_flow:1", "tsn_rgb:3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    scores, labels = _fused_by_hand(work, {"tsn_flow": 1.0, "tsn_rgb": 3.0})
    assert summary["runs"]["tsn_flow+tsn_rgb"]["strategies"]["weighted_1:3"]["correct"] == \
        int((scores.argmax(1) == labels).sum())
    assert "tsn_rgb+tsn_flow" not in summary["runs"]
    # --fuse alone: none; a run that was not evaluated: said, not fused; a malformed weight: one line
    assert cli.main(["collect", str(work), "--out", str(out), "--fuse"]) == 0
    assert set(json.loads((out / "summary.json").read_text())["runs"]) == {"tsn_rgb", "tsn_flow"}
    assert cli.main(["collect", str(work), "--out", str(out), "--fuse", "tsn_rgb:1", "tsn_diff:1"]) == 0
    assert "fusion tsn_rgb+tsn_diff: not computed, tsn_diff was not evaluated" in (out / "report.md").read_text()
    capsys.readouterr()
    assert cli.main(["collect", str(work), "--out", str(out), "--fuse", "tsn_rgb=1", "tsn_flow:1"]) == 2
    assert "report.fusion" in capsys.readouterr().err


def test_fusion_covers_only_the_videos_every_member_counted(tmp_path):
    from hpcvid.stages.reduce import fuse

    work = tmp_path / "work"
    manifest = make_manifest(work, n_classes=6, test_per_class=4)
    write_run(work, manifest, "a", "frame", {"middle": 0.5}, shards=2)
    write_run(work, manifest, "b", "flow", {"centre_stack": 0.5}, shards=2, skip=(1,))
    reduction = reduce_files(work, allow_partial=True)
    fuse(reduction, {"a": 1.0, "b": 2.0})
    fused = reduction.runs["a+b"]
    assert fused.n_videos == reduction.runs["b"].n_videos == 12
    assert reduction.missing_videos["a+b"] == reduction.missing_videos["b"]
