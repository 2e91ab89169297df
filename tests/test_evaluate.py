"""The eval stage on a real tiny pipeline: extraction shards -> trained runs -> prediction shards.

It checks what the reducer relies on (every test video scored exactly once across shards, the documented
strategies, records written last) and that evaluation feeds each model exactly what validation fed it
(the same input preparation): the default strategy's score equals a direct forward pass of the validation
input built by hpcvid.learn.datasets.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcvid.stages import evaluate
from hpcvid.stages import extract
from hpcvid.config import resolve_config
from hpcvid.errors import PartialFailure
from hpcvid.storage.predictions import read_prediction_shard, read_record
from hpcvid.launch.sharding import all_shards
from hpcvid.learn.checkpoints import load_run
from hpcvid.learn.trainer import train
from hpcvid.stages.train import load_data
from hpcvid.workfolder import Unit, WorkFolder

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

TRAIN = {"train.backbone": "small", "train.flow_stack": 3, "train.epochs": 1, "train.batch_size": 6,
         "train.device": "cpu", "train.seq_len": 8, "train.chunk": 4, "train.hidden": 16, "train.layers": 1,
         "train.val_fraction": 0.2, "eval.device": "cpu", "eval.window_stride": 2, "eval.frame_samples": 4}
STRATEGIES = {
    "frame": ["middle", "mean_frames", "pos_first", "pos_quarter", "pos_middle", "pos_three_quarter", "pos_last"],
    "flow": ["centre_stack", "mean_stacks"],
    "twostream": ["midfusion", "late_1:1", "late_1:1.5", "rgb_stream", "flow_stream"],
    "lstm": ["windows", "last_step", "mean", "end_weighted", "full_length"],
}


@pytest.fixture(scope="module")
def trained_work(tiny_work, tmp_path_factory):
    """tiny_work + one extraction shard (frames, Farneback flow, ResNet-18 features) + four 1-epoch runs."""
    work = tmp_path_factory.mktemp("eval_work")
    shutil.copy(tiny_work / "manifest.json", work / "manifest.json")
    base = {"work": str(work), "extract.size": 32, "extract.backbone": "resnet18", "extract.flow": "farneback",
            "extract.device": "cpu", "extract.shards": 1, **TRAIN}
    config = resolve_config(overrides=base)
    extract.run_shard(config, all_shards(1)[0])
    for model in ("frame", "flow", "twostream", "lstm"):
        train(resolve_config(overrides=dict(base, **{"train.model": model})), load_data)
    return work, base


def _config(base, model, shards=2):
    return resolve_config(overrides=dict(base, **{"train.model": model, "eval.shards": shards}))


@pytest.mark.parametrize("model", ["frame", "flow", "twostream", "lstm"])
def test_every_test_video_scored_once_with_every_strategy(trained_work, model):
    work, base = trained_work
    config = _config(base, model)
    specs = evaluate.plan(config)
    assert [s.name for s in specs] == ["0000-of-0002", "0001-of-0002"]
    records = [evaluate.run_shard(config, spec) for spec in specs]
    assert evaluate.report(config, records) == 0
    assert evaluate.plan(config) == []                    # done shards are skipped
    assert len(evaluate.plan(config, force=True)) == 2    # --force redoes them
    seen = []
    for spec, record in zip(specs, records):
        folder = WorkFolder(work)
        h5, json_path = folder.shard_file(Unit("eval", model), spec), folder.record_file(Unit("eval", model), spec)
        assert read_record(json_path) == record and record["failed"] == []
        shard = read_prediction_shard(h5)
        assert shard.strategies == STRATEGIES[model] and shard.default_strategy == STRATEGIES[model][0]
        for scores in shard.scores.values():
            assert scores.shape == (len(shard.video_ids), 6)
            np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-4)    # probabilities
        seen += shard.video_ids
    from hpcvid.storage.manifest import load_manifest

    assert sorted(seen) == sorted(v.id for v in load_manifest(work).by_split("test"))


def test_default_strategies_see_what_validation_saw(trained_work):
    """middle frame / centre stack / centre window: eval equals a forward pass of the validation dataset."""
    from hpcvid.learn.datasets import (FeatureDataset, FlowDataset, FrameDataset, ShardFeatureSource, VideoItem)

    work, base = trained_work
    videos = evaluate.video_source(_config(base, "frame"))
    source, info = videos.source, videos.videos
    for model in ("frame", "flow", "lstm"):
        config = _config(base, model, shards=1)
        [spec] = evaluate.plan(config, force=True)    # a 1-shard set replaces the 2-shard one
        record = evaluate.run_shard(config, spec)
        shard = read_prediction_shard(work / "eval" / model / f"pred-{all_shards(1)[0].name}.h5")
        net, _, meta = load_run(work / "runs" / model)
        video, label = shard.video_ids[0], int(shard.labels[0])
        with torch.no_grad():
            if model == "lstm":
                features = ShardFeatureSource(sorted((work / "extract").glob("shard-*.h5")), meta["feature_set"])
                features.mean, features.std = meta["feature_mean"], meta["feature_std"]
                item = next(it for it in features.items if it.id == video)
                x, _ = FeatureDataset(features, [item], seq_len=meta["seq_len"], train=False,
                                      centring=meta["centring"])[0]
                expected = net(x[None]).softmax(-1)[0, -1]
                got = shard.scores["last_step"][0]
            else:
                item = VideoItem(video, label, int(info[video]["frames"]), "test")
                if model == "frame":
                    x, _ = FrameDataset(source, [item], train=False)[0]
                else:
                    x, _ = FlowDataset(source, [item], stack=meta["flow_stack"], train=False,
                                       compensation=meta["compensation"])[0]
                expected = net(x[None]).softmax(-1)[0]
                got = shard.scores[STRATEGIES[model][0]][0]
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
        assert record["n_videos"] == 6


def test_a_test_video_missing_from_extraction_is_listed_as_failed(trained_work, tmp_path):
    """A test video that extraction could not read (listed as failed there) is listed as failed by eval."""
    from dataclasses import replace as dc_replace

    from hpcvid.storage.manifest import load_manifest, write_manifest

    work, base = trained_work
    other = tmp_path / "work"
    manifest = load_manifest(work)
    ghost = dc_replace(manifest.by_split("test")[0], id="TriangleExpand/v_ghost_g99_c01",
                       path="TriangleExpand/v_ghost_g99_c01.avi", frames=None, probe_error="unreadable")
    write_manifest(dc_replace(manifest, videos=manifest.videos + (ghost,)), other)
    cheap = dict(base, **{"work": str(other), "extract.backbone": "none", "extract.flow": "none",
                          "train.model": "frame", "dataset.root": str(Path(manifest.dataset["root"]))})
    extract.run_shard(resolve_config(overrides=cheap), all_shards(1)[0])
    train(resolve_config(overrides=cheap), load_data)
    config = resolve_config(overrides=dict(base, **{"work": str(other), "train.model": "frame", "eval.shards": 1}))
    record = evaluate.run_shard(config, all_shards(1)[0])
    assert record["failed"] == [{"video": ghost.id,
                                 "reason": "not in the extraction shards (extraction failed or has not run for it)"}]
    with pytest.raises(PartialFailure, match="v_ghost_g99_c01"):
        evaluate.report(config, [record])
    from hpcvid.errors import StoreError
    from hpcvid.stages.reduce import reduce_files

    with pytest.raises(StoreError, match=r"counted by no shard, e.g. TriangleExpand/v_ghost_g99_c01 \(failed: not in"):
        reduce_files(other)
