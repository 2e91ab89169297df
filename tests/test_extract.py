"""The extract stage on the tiny synthetic set: sharding does not change contents, resume, skip, --force."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from extract_helpers import extract_config, write_folder_manifest
from hpcvid.stages import extract
from hpcvid.launch.sharding import ShardSpec, all_shards
from hpcvid.errors import StoreError
from hpcvid.workfolder import WorkFolder
from hpcvid.storage.shards import ShardReader


def _run_all(config, count: int) -> list[dict]:
    return [extract.run_shard(config, spec) for spec in all_shards(count)]


def _contents(config, records) -> dict[str, dict]:
    """Every stored array and attribute per video id, read back through ShardReader."""
    out = {}
    for record in records:
        with ShardReader(WorkFolder.of(config).unit_dir(extract.UNIT) / record["file"]) as reader:
            for video_id in reader.video_ids():
                info = reader.info(video_id)
                video = reader.video(video_id)
                out[video_id] = {
                    "info": {k: v for k, v in info.items() if k != "frame_indices"},
                    "indices": info["frame_indices"], "frames": video.frames, "flow": video.flow,
                    "features": video.features,
                }
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for video_id in a:
        x, y = a[video_id], b[video_id]
        assert x["info"] == y["info"], video_id
        np.testing.assert_array_equal(x["indices"], y["indices"])
        np.testing.assert_array_equal(x["frames"], y["frames"])
        np.testing.assert_array_equal(x["flow"], y["flow"])
        assert sorted(x["features"]) == sorted(y["features"])
        for name in x["features"]:
            np.testing.assert_array_equal(x["features"][name], y["features"][name])


@pytest.fixture()
def synthetic_work(tiny_synthetic, tmp_path):
    def make(name: str, every: int = 1, **settings):
        work = tmp_path / name
        clips = sorted(tiny_synthetic.rglob("*.avi"))[::every]
        manifest = write_folder_manifest(tiny_synthetic, work, files=clips)
        return extract_config(work, **settings), manifest
    return make


@pytest.mark.slow
def test_one_shard_and_three_shards_store_the_same_videos(synthetic_work):
    one, manifest = synthetic_work("one", every=3, backbone="resnet18")  # 8 clips of all 6 classes
    three, _ = synthetic_work("three", every=3, backbone="resnet18", shards=3)
    records_one, records_three = _run_all(one, 1), _run_all(three, 3)
    ids = sorted(v.id for v in manifest.videos)
    assert sorted(v["id"] for v in records_one[0]["videos"]) == ids
    per_shard = [sorted(v["id"] for v in r["videos"]) for r in records_three]
    assert sorted(sum(per_shard, [])) == ids and all(per_shard)  # disjoint, complete, none empty
    assert all(r["n_failed"] == 0 for r in records_one + records_three)
    checksums_one = {v["id"]: v["checksum"] for v in records_one[0]["videos"]}
    checksums_three = {v["id"]: v["checksum"] for r in records_three for v in r["videos"]}
    assert checksums_one == checksums_three
    a, b = _contents(one, records_one), _contents(three, records_three)
    _assert_same(a, b)
    sample = a[ids[0]]
    assert sample["frames"].shape == (12, 32, 32, 3) and sample["flow"].shape == (11, 32, 32, 2)
    assert sample["features"]["resnet18"].shape == (12, 512)
    assert sample["info"]["split"] in ("train", "test") and sample["info"]["total_frames"] == 12
    assert np.abs(sample["flow"]).max() > 0.1  # the objects move
    record = records_three[1]
    assert record["shard"] == "0001-of-0003" and record["random_init"] and record["warnings"]
    assert record["features"]["backbone"] == "resnet18" and record["config"]["extract"]["size"] == 32
    assert record["timings"]["videos_processed"] == record["n_videos"] and record["code_version"]
    assert not WorkFolder.of(three).parts_dir(extract.UNIT, ShardSpec(1, 3)).exists()  # scratch removed after the record


class _Interrupt(BaseException):
    """Stands for a kill: not an Exception, so the per-video error handling does not catch it."""


def interrupt_shard(monkeypatch, config, spec: ShardSpec, after: int) -> None:
    """Run the shard until ``after`` videos are finished, then stop it mid-video as a kill would."""
    original = extract._VideoRunner.extract

    def extract_or_die(self, entry, path, assembly):
        if self.processed == after:
            raise _Interrupt()
        return original(self, entry, path, assembly)

    monkeypatch.setattr(extract._VideoRunner, "extract", extract_or_die)
    with pytest.raises(_Interrupt):
        extract.run_shard(config, spec)
    monkeypatch.setattr(extract._VideoRunner, "extract", original)


def test_an_interrupted_shard_resumes_and_ends_like_a_clean_run(synthetic_work, monkeypatch):
    clean, _ = synthetic_work("clean")
    resumed, _ = synthetic_work("resumed")
    spec = ShardSpec(0, 2)
    expected = extract.run_shard(clean, spec)
    interrupt_shard(monkeypatch, resumed, spec, after=3)
    assert not WorkFolder.of(resumed).record_file(extract.UNIT, spec).exists() and not WorkFolder.of(resumed).shard_file(extract.UNIT, spec).exists()
    assert len(list(WorkFolder.of(resumed).parts_dir(extract.UNIT, spec).glob("*.h5"))) == 3
    record = extract.run_shard(resumed, spec)
    assert record["timings"]["videos_resumed"] == 3
    assert record["timings"]["videos_processed"] == expected["n_videos"] - 3
    assert record["videos"] == expected["videos"]  # ids, shapes and checksums, in the same order
    _assert_same(_contents(clean, [expected]), _contents(resumed, [record]))


def test_done_shards_are_skipped_and_force_redoes_them(synthetic_work):
    config, _ = synthetic_work("w", flow="none", shards=2)
    first = extract.run_shard(config, ShardSpec(1, 2))
    record_file = WorkFolder.of(config).record_file(extract.UNIT, ShardSpec(1, 2))
    stamp = record_file.stat().st_mtime_ns
    assert [s.index for s in extract.plan(config)] == [0]
    assert extract.run_shard(config, ShardSpec(1, 2)) == first and record_file.stat().st_mtime_ns == stamp
    assert [s.index for s in extract.plan(config, force=True)] == [0, 1]
    again = extract.run_shard(config, ShardSpec(1, 2, force=True))
    assert again["timings"]["videos_processed"] == again["n_videos"] == first["n_videos"]
    assert again["videos"] == first["videos"]
    with ShardReader(WorkFolder.of(config).shard_file(extract.UNIT, ShardSpec(1, 2))) as reader:
        assert not reader.info(reader.video_ids()[0])["has_flow"]  # flow = none stores no flow


def test_parts_made_with_other_settings_are_discarded(synthetic_work, monkeypatch):
    config, _ = synthetic_work("w")
    spec = ShardSpec(0, 4)
    interrupt_shard(monkeypatch, config, spec, after=1)
    changed = extract_config(config.work_dir, size=24, shards=4)
    with pytest.raises(StoreError, match="the current extract set is another one .made with other settings"):
        extract.run_shard(changed, spec)         # a shard never joins a set planned with other settings
    assert extract.plan(changed, only=0) == [spec]  # planning with the new settings makes them current
    record = extract.run_shard(changed, spec)
    assert record["timings"]["videos_resumed"] == 0
    assert all(v["shapes"]["frames"][1:3] == [24, 24] for v in record["videos"])


def test_cli_indexes_when_the_manifest_is_missing_and_reports(tiny_synthetic, tmp_path, capsys):
    pytest.importorskip("hpcvid.stages.index")
    from hpcvid.cli import main

    work = tmp_path / "work"
    argv = ["run", "extract", "--work", str(work), "--dataset", str(tiny_synthetic), "--shards", "2",
            "--backbone", "none", "--flow", "dis"]
    assert main(argv) == 0
    assert (work / "manifest.json").is_file()
    records = [json.loads((work / "extract" / f"shard-{s.name}.json").read_text()) for s in all_shards(2)]
    assert sum(r["n_videos"] for r in records) == 24 and all(r["config"]["extract"]["flow"] == "dis" for r in records)
    out = capsys.readouterr().out
    assert "2 of 2 shards done" in out
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out


def test_a_random_backbone_is_the_same_network_in_every_process(monkeypatch):
    """Resumed shards and shards on other nodes must not mix features of different random networks."""
    torch = pytest.importorskip("torch")
    frames = np.random.default_rng(0).integers(0, 255, size=(3, 32, 32, 3), dtype=np.uint8)
    monkeypatch.setattr(extract, "_EXTRACTORS", {})
    torch.manual_seed(123)
    first = extract.feature_extractor("resnet18", "", "cpu", 4).extract(frames)
    monkeypatch.setattr(extract, "_EXTRACTORS", {})  # as if in a new process with other RNG state
    torch.manual_seed(456)
    state = torch.random.get_rng_state()
    second = extract.feature_extractor("resnet18", "", "cpu", 4).extract(frames)
    np.testing.assert_array_equal(first, second)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    assert np.abs(first).max() > 0


@pytest.mark.slow
@pytest.mark.parametrize("backbone,dim", [("googlenet", 1024), ("resnet18", 512)])
def test_features_are_finite_and_not_zero_even_untrained(tiny_synthetic, tmp_path, backbone, dim):
    """Untrained GoogLeNet's features are ~1e-12: stored as float32 they must survive, and the
    merged statistics must not erase them."""
    from hpcvid.learn.statistics import normalise_features
    from hpcvid.stages.merge import merge
    from hpcvid.storage.merged import MergedFeatures

    clips = sorted(tiny_synthetic.rglob("*.avi"))
    picked = [clips[0], clips[5], clips[-1]]
    work = tmp_path / "work"
    write_folder_manifest(tiny_synthetic, work, files=picked)
    config = extract_config(work, backbone=backbone, flow="none", size=64)
    record = extract.run_shard(config, ShardSpec(0, 1))
    assert record["n_videos"] == 3 and record["features"]["random_init"]
    with ShardReader(WorkFolder.of(config).shard_file(extract.UNIT, ShardSpec(0, 1))) as reader:
        features = [reader.features(v, backbone) for v in reader.video_ids()]
    for values in features:
        assert values.dtype == np.float32 and values.shape == (12, dim)
        assert np.isfinite(values).all() and np.count_nonzero(values) > values.size // 10
        assert np.abs(np.diff(values, axis=0)).max() > 0  # frames differ
    assert np.abs(features[0] - features[2]).max() > 0  # videos differ
    merge(work)
    merged = MergedFeatures(work / "features.h5")
    train_features = np.concatenate([merged.video(i) for i in merged.indices("train")])
    normalised = normalise_features(train_features, merged.mean, merged.std)
    assert np.isfinite(normalised).all()
    varying = np.concatenate(features).std(0) > 0
    assert varying.sum() > dim // 10 and np.abs(normalised[:, varying]).max() > 0.5  # not crushed to ~0


def _run_shard_in_child(config, spec):
    extract.run_shard(config, spec)


def test_a_video_that_kills_its_process_is_listed_after_max_attempts(synthetic_work, monkeypatch):
    """A segfault or OOM kill on one video must not make every rerun die on it forever."""
    import multiprocessing
    import signal

    config, manifest = synthetic_work("w", flow="none", max_attempts=2)
    spec = ShardSpec(0, 6)
    victim = sorted(v.id for v in manifest.videos)[6]  # the shard's second video
    original = extract._VideoRunner.extract

    def crash_on_victim(self, entry, path, assembly):
        if entry.id == victim:
            os.kill(os.getpid(), signal.SIGKILL)  # what a segfault or the OOM killer does to the process
        return original(self, entry, path, assembly)

    monkeypatch.setattr(extract._VideoRunner, "extract", crash_on_victim)
    context = multiprocessing.get_context("fork")
    for _ in range(3):  # two deaths are tolerated (e.g. walltime kills); the third start gives up on it
        child = context.Process(target=_run_shard_in_child, args=(config, spec))
        child.start()
        child.join()
        if child.exitcode == 0:
            break
        assert child.exitcode == -signal.SIGKILL and not WorkFolder.of(config).record_file(extract.UNIT, spec).exists()
    assert child.exitcode == 0
    record = json.loads(WorkFolder.of(config).record_file(extract.UNIT, spec).read_text())
    assert [f["video"] for f in record["failed"]] == [victim]
    assert "died 2 times" in record["failed"][0]["reason"]
    assert record["n_videos"] == 3 and victim not in {v["id"] for v in record["videos"]}


def test_a_video_replaced_before_the_resume_is_extracted_again(synthetic_work, monkeypatch, tiny_synthetic):
    import dataclasses

    from hpcvid.storage.manifest import load_manifest, write_manifest

    config, _ = synthetic_work("w", flow="none")
    spec = ShardSpec(0, 4)
    interrupt_shard(monkeypatch, config, spec, after=2)
    manifest = load_manifest(config.work_dir)
    first = sorted(v.id for v in manifest.videos)[0]
    videos = tuple(dataclasses.replace(v, mtime=v.mtime + 60) if v.id == first else v for v in manifest.videos)
    write_manifest(dataclasses.replace(manifest, videos=videos), config.work_dir)  # as if re-indexed
    record = extract.run_shard(config, spec)
    assert record["timings"]["videos_resumed"] == 1 and record["n_videos"] == 6


def test_force_in_a_requeued_slurm_job_resumes_instead_of_starting_over(synthetic_work, monkeypatch):
    """The executor, not the stage, knows a job was started again: a requeued --force job resumes."""
    from hpcvid.launch.executors import ShardJob
    from hpcvid.stages import STAGES

    config, _ = synthetic_work("w", flow="none")
    interrupt_shard(monkeypatch, config, ShardSpec(0, 4, force=True), after=2)  # `submit extract --force`, a walltime
    job = ShardJob(STAGES["extract"], config.to_dict(), 0, 4, force=True)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert job()["timings"]["videos_resumed"] == 2
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # a new --force run starts over
    assert job()["timings"]["videos_resumed"] == 0


def test_a_kill_between_the_shard_and_its_record_is_finished_by_the_rerun(synthetic_work, monkeypatch):
    """The narrowest window: the shard file is renamed into place, the record is not written yet."""
    config, _ = synthetic_work("w", flow="none", shards=4)
    spec = ShardSpec(1, 4)
    real_write = extract.write_record

    def die_on_record(path, *args, **kwargs):
        if path == WorkFolder.of(config).record_file(extract.UNIT, spec):
            raise _Interrupt()
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(extract, "write_record", die_on_record)
    with pytest.raises(_Interrupt):
        extract.run_shard(config, spec)
    folder = WorkFolder.of(config)
    assert folder.shard_file(extract.UNIT, spec).is_file() and not folder.is_current(extract.UNIT, spec)
    assert extract.plan(config, only=1) == [spec]  # not done: the shard file alone does not count
    monkeypatch.setattr(extract, "write_record", real_write)
    record = extract.run_shard(config, spec)
    assert record["timings"]["videos_resumed"] == record["n_videos"] == 6
    assert not WorkFolder.of(config).parts_dir(extract.UNIT, spec).exists()


def test_a_missing_weights_file_stops_before_any_work(synthetic_work):
    from hpcvid.errors import CheckpointError

    config, _ = synthetic_work("w", backbone="resnet18", weights="/nonexistent/resnet18.pth")
    with pytest.raises(CheckpointError, match="/nonexistent/resnet18.pth does not exist"):
        extract.plan(config)
    assert not WorkFolder.of(config).unit_dir(extract.UNIT).exists() or not any(WorkFolder.of(config).unit_dir(extract.UNIT).iterdir())


def test_a_garbage_weights_file_fails_the_shard_not_each_video(synthetic_work, tmp_path):
    from hpcvid.errors import CheckpointError

    garbage = tmp_path / "resnet18.pth"
    garbage.write_bytes(b"not a state dict")
    config, _ = synthetic_work("w", backbone="resnet18", weights=str(garbage))
    with pytest.raises(CheckpointError, match="resnet18.pth"):
        extract.run_shard(config, ShardSpec(0, 1))
    parts = WorkFolder.of(config).parts_dir(extract.UNIT, ShardSpec(0, 1))
    assert not parts.exists() or not list(parts.glob("*.failed.json"))
