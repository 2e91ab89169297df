"""Merge: one checksummed file whose windows equal the shard data; statistics from the train split only, by
the same rule as the trainer's; a damaged shard or merged file is refused with one line."""
from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil

import numpy as np
import pytest

from damage import flip_byte, set_schema_version, store_error_line, unchecked_datasets
from extract_helpers import extract_config, write_folder_manifest
from hpcvid.stages import extract
from hpcvid.stages import merge
from hpcvid.errors import ConfigError, StoreError
from hpcvid.fileio import sha256_file
from hpcvid.launch.sharding import ShardSpec, all_shards
from hpcvid.learn.datasets import ShardFeatureSource
from hpcvid.learn.statistics import FeatureStatistics, normalise_features
from hpcvid.storage.h5 import FEATURE_CHUNK_ROWS
from hpcvid.storage.merged import MergedFeatures
from hpcvid.storage.shards import ShardReader, VideoData, group_name, write_features_shard
from hpcvid.workfolder import Unit, WorkFolder


@pytest.fixture(scope="module")
def extracted(tiny_synthetic, tmp_path_factory):
    """The tiny synthetic set extracted in 2 shards (ResNet-18 at 32 px, Farneback flow)."""
    work = tmp_path_factory.mktemp("merge_work")
    write_folder_manifest(tiny_synthetic, work)
    config = extract_config(work, backbone="resnet18", shards=2)
    records = [extract.run_shard(config, spec) for spec in all_shards(2)]
    return config, records


def _shard_features(config, records) -> dict[str, tuple[str, np.ndarray]]:
    out = {}
    for record in records:
        with ShardReader(WorkFolder.of(config).unit_dir(extract.UNIT) / record["file"]) as reader:
            for video_id in reader.video_ids():
                out[video_id] = (reader.info(video_id)["split"], reader.features(video_id, "resnet18"))
    return out


def _read_window(merged, i, start, length):
    return merged.window(i, start, length)


def test_windows_equal_the_shards_and_stats_come_from_train_only(extracted):
    config, records = extracted
    record = merge.merge(config.work_dir)
    assert record["n_videos"] == 24 and record["backbones"] == ["resnet18"] and record["n_frames"] == 24 * 12
    truth = _shard_features(config, records)
    merged = MergedFeatures(config.work_dir / "features.h5")
    assert [e.id for e in merged.entries] == sorted(truth)
    assert merged.classes == sorted({e.id.split("/")[0] for e in merged.entries})
    rng = np.random.default_rng(0)
    for _ in range(30):
        i = int(rng.integers(len(merged)))
        entry = merged.entries[i]
        length = int(rng.integers(1, entry.length + 1))
        start = int(rng.integers(0, entry.length - length + 1))
        np.testing.assert_array_equal(merged.window(i, start, length), truth[entry.id][1][start:start + length])
        assert entry.split == truth[entry.id][0]
    np.testing.assert_array_equal(merged.video(3), truth[merged.entries[3].id][1])
    with pytest.raises(ValueError, match="outside"):
        merged.window(0, 5, merged.entries[0].length)
    train = np.concatenate([f for split, f in truth.values() if split == "train"]).astype(np.float64)
    everything = np.concatenate([f for _, f in truth.values()]).astype(np.float64)
    assert 0 < len(train) < len(everything)
    np.testing.assert_allclose(merged.mean, train.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(merged.std, np.maximum(train.std(0), merged.std.min()), rtol=1e-4, atol=1e-7)
    assert not np.allclose(merged.mean, everything.mean(0), rtol=1e-5, atol=1e-7)  # test videos left out
    train_features = np.concatenate([merged.video(i) for i in merged.indices("train")])
    normalised = normalise_features(train_features, merged.mean, merged.std)
    np.testing.assert_allclose(normalised.mean(0), 0, atol=1e-3)
    assert unchecked_datasets(config.work_dir / "features.h5") == []


def test_reader_opens_nothing_before_a_fork_and_works_in_workers(extracted):
    config, _ = extracted
    merge.merge(config.work_dir)
    merged = MergedFeatures(config.work_dir / "features.h5")
    assert not merged.is_open
    expected = merged.window(2, 1, 4)
    clone = pickle.loads(pickle.dumps(merged))
    assert merged.is_open and not clone.is_open
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply(_read_window, (merged, 2, 1, 4))
    np.testing.assert_array_equal(got, expected)


def test_rerun_is_skipped_until_sources_change(extracted):
    config, records = extracted
    first = merge.merge(config.work_dir, force=True)
    again = merge.merge(config.work_dir)
    assert again.get("skipped") and again["sha256"] == first["sha256"]
    extract.run_shard(config, ShardSpec(1, 2, force=True))     # a source changes: shard 1 has a new record
    rebuilt = merge.merge(config.work_dir)
    assert not rebuilt.get("skipped") and rebuilt["sources"] != first["sources"]
    assert merge.merge(config.work_dir).get("skipped")


def test_features_only_shards_merge_beside_them(extracted, tmp_path):
    config, records = extracted
    work = WorkFolder.of(config)
    unit = Unit("features", "finetuned")
    shard_set = work.declare_set(unit, len(records), {"test": 1})
    folder = work.unit_dir(unit)
    for record in records:
        spec = ShardSpec(record["index"], record["count"])
        with ShardReader(work.unit_dir(extract.UNIT) / record["file"]) as reader:
            videos = []
            for video_id in reader.video_ids():
                info = reader.info(video_id)
                doubled = reader.features(video_id, "resnet18") * 2
                videos.append(VideoData(video_id, {k: info[k] for k in ("label", "class_name", "split")},
                                        info["frame_indices"], features={"frame_cnn": doubled}))
        write_features_shard(folder, spec, videos, meta={"run": "finetuned"}, record_extra={"set": shard_set.id})
    record = merge.merge(config.work_dir, features_dir=folder)
    assert record["output"] == "features/finetuned/features.h5" and record["backbones"] == ["frame_cnn"]
    merged = MergedFeatures(folder / "features.h5")
    base = MergedFeatures(work.root / merge.merge(config.work_dir)["output"])
    np.testing.assert_allclose(merged.video(4), base.video(4) * 2)


def test_missing_shards_are_named(tmp_path):
    (tmp_path / "extract").mkdir()
    with pytest.raises(StoreError, match="holds no planned extract set"):
        merge.merge(tmp_path)
    shard_set = WorkFolder(tmp_path).declare_set(Unit("extract"), 3, {"test": 1})
    (tmp_path / "extract" / "shard-0001-of-0003.json").write_text(json.dumps({"set": shard_set.id}))
    with pytest.raises(StoreError, match=r"shard\(s\) 0000-of-0003, 0002-of-0003 of the current 3-shard set have no"):
        merge.merge(tmp_path)
    with pytest.raises(ConfigError, match="merge reads the shards of its work folder"):
        merge.merge(tmp_path, features_dir=tmp_path.parent)


def test_statistics_keep_tiny_features_and_constant_columns():
    stats = FeatureStatistics()
    rng = np.random.default_rng(1)
    values = rng.normal(size=(200, 3)) * 1e-12 + 5e-12  # untrained GoogLeNet's scale
    values[:, 2] = 3e-12  # a constant column
    stats.add(values[:120])
    stats.add(values[120:])
    mean, std, meta = stats.finish()
    np.testing.assert_allclose(mean, values.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std[:2], values[:, :2].std(0), rtol=1e-4)  # not erased by the epsilon
    assert 0 < std[2] <= 1e-17 and meta["epsilon"] == pytest.approx(std[2])
    assert np.isfinite((values - mean) / std).all()


def test_the_trainer_fits_the_statistics_the_merged_file_holds(extracted):
    """One rule for mean/std: fitted from the shards by the trainer, or stored by merge, they agree."""
    config, records = extracted
    merged = MergedFeatures(config.work_dir / merge.merge(config.work_dir)["output"])
    source = ShardFeatureSource([WorkFolder.of(config).unit_dir(extract.UNIT) / r["file"] for r in records], "resnet18")
    source.fit_statistics([item for item in source.items if item.split == "train"])
    np.testing.assert_allclose(source.mean, merged.mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(source.std, merged.std, rtol=1e-6, atol=1e-9)


def test_a_flipped_byte_in_the_merged_features_is_one_line(extracted, tmp_path):
    config, _ = extracted
    path = tmp_path / "features.h5"
    shutil.copy(config.work_dir / merge.merge(config.work_dir)["output"], path)
    flip_byte(path, "features/resnet18", chunk=2)
    merged = MergedFeatures(path)
    first = next(i for i, e in enumerate(merged.entries) if e.offset + e.length > 2 * FEATURE_CHUNK_ROWS)
    message = store_error_line(lambda: merged.video(first))
    assert str(path) in message and repr(merged.entries[first].id) in message
    assert "rebuild it with `hpcvid run merge --force`" in message
    np.testing.assert_array_equal(merged.video(0), MergedFeatures(config.work_dir / "features.h5").video(0))


def test_a_damaged_shard_stops_the_merge_and_nothing_is_written(extracted, tmp_path):
    config, records = extracted
    work = tmp_path / "work"
    shutil.copytree(config.work_dir / "extract", work / "extract")
    shutil.copy(config.work_dir / "manifest.json", work / "manifest.json")
    shard = work / "extract" / records[1]["file"]
    video = records[1]["videos"][3]["id"]
    first = merge.merge(work)                     # every shard verified once: WORK/.verified remembers it
    stat = shard.stat()
    flip_byte(shard, f"videos/{group_name(video)}/features/resnet18")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))   # a change the remembered whole-file check misses
    message = store_error_line(lambda: merge.merge(work, force=True))
    assert str(shard) in message and repr(video) in message and "--force" in message   # the chunk's checksum
    shard.touch()                                 # changed on disk: the whole-file check refuses it first
    message = store_error_line(lambda: merge.merge(work, force=True))
    assert str(shard) in message and "does not match the sha256 in its record" in message
    assert sha256_file(work / "features.h5") == first["sha256"] and not list(work.glob(".*.partial"))


def test_a_merged_file_of_the_previous_schema_is_refused_with_the_fix(extracted, tmp_path):
    config, _ = extracted
    path = tmp_path / "features.h5"
    shutil.copy(config.work_dir / merge.merge(config.work_dir)["output"], path)
    set_schema_version(path, 1)
    message = store_error_line(lambda: MergedFeatures(path))
    assert "schema_version 1" in message and "hpcvid run merge --force" in message

