"""Streaming extraction and its worker processes: the stored bytes depend on neither the chunk size nor the
workers; a worker that dies or meets a fault of the machine is handled like the whole process would be.

The workers are real spawned processes. Where a worker must die on a chosen video, the function the worker
runs is replaced by one of this module's (the spawned process imports it by name) that does what a
segfaulting library or the OOM killer would do, in the worker itself.
"""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from extract_helpers import extract_config, write_folder_manifest
from hpcvid.config import ExtractConfig
from hpcvid.errors import ResourceError
from hpcvid.launch.sharding import ShardSpec
from hpcvid.stages import extract
from hpcvid.storage.shards import (PartWriter, ShardReader, StorageOptions, VideoData, encode_flow, encode_frames,
                                   write_video_file)
from hpcvid.workfolder import WorkFolder

VICTIM = "HPCVID_TEST_VICTIM"
HOW = "HPCVID_TEST_HOW"


# ------------------------------------------------------------------------------------- the part writer
@pytest.mark.parametrize("storage,flow_storage", [("jpeg", "uint8"), ("uint8", "float16")])
def test_a_part_written_in_chunks_is_the_whole_video_writers_file_byte_for_byte(tmp_path, storage, flow_storage):
    rng = np.random.default_rng(0)
    options = StorageOptions(frame_storage=storage, flow_storage=flow_storage)
    attrs = {"label": 1, "class_name": "c", "split": "train", "fps": 25.0, "total_frames": 9, "source": "v.avi",
             "width": 40, "height": 24}
    for frames_count in (1, 2, 9):
        frames = rng.integers(0, 255, (frames_count, 24, 40, 3), dtype=np.uint8)
        flow = rng.standard_normal((frames_count - 1, 24, 40, 2)).astype(np.float32) * 4
        features = rng.standard_normal((frames_count, 16)).astype(np.float32)
        whole = tmp_path / "whole.h5"
        write_video_file(whole, VideoData("a/b c", attrs, np.arange(frames_count), frames, flow, {"x": features}),
                         options)
        for chunk in (1, 4, 100):
            writer = PartWriter(tmp_path / "spool", options)
            for start in range(0, frames_count, chunk):
                stop = min(start + chunk, frames_count)
                writer.add(frame_indices=np.arange(start, stop), frames=encode_frames(frames[start:stop], options),
                           frame_shape=frames[start:stop].shape,
                           flow=encode_flow(flow[max(start - 1, 0):stop - 1], options),
                           features={"x": features[start:stop]})
            part = tmp_path / f"part-{chunk}.h5"
            summary = writer.finish(part, "a/b c", attrs, has_flow=True)
            assert part.read_bytes() == whole.read_bytes(), (frames_count, chunk)
            assert summary["frames"] == frames_count and not (tmp_path / "spool").exists()


# ------------------------------------------------------------------------------------- flow and decoding
@pytest.mark.parametrize("algorithm,params", [("farneback", {}), ("dis", {}),
                                              ("tvl1_torch", {"device": "cpu", "batch_size": 3, "nscales": 1,
                                                              "warps": 1, "outer_iterations": 2})])
def test_flow_in_chunks_equals_the_whole_videos_flow(tiny_synthetic, algorithm, params, one_torch_thread):
    from hpcvid.media.decode import read_video
    from hpcvid.media.flow import FlowStream, compute_flow

    frames = read_video(sorted(tiny_synthetic.rglob("*.avi"))[0], ExtractConfig(size=32)).frames
    whole = compute_flow(frames, algorithm, **params)
    for chunk in (1, 2, 5):
        stream = FlowStream(algorithm, **params)
        pieces = [stream.push(frames[s:s + chunk]) for s in range(0, len(frames), chunk)] + [stream.finish()]
        assert [len(p) for p in pieces[:-1]] != [] and sum(len(p) for p in pieces) == len(frames) - 1
        np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_a_count_the_decoder_falls_short_of_restarts_the_stream(tiny_synthetic, monkeypatch):
    """The demuxer may count frames that do not decode: the sampling then chooses again from the true count,
    and a consumer is told to drop what it got before."""
    from hpcvid.media import decode

    clip = sorted(tiny_synthetic.rglob("*.avi"))[0]
    cfg = ExtractConfig(sampling="count", count=3, size=32)
    expected = decode.read_video(clip, cfg)
    monkeypatch.setattr(decode, "_total_for_selection", lambda path, cfg, info: 40)  # 12 frames really decode
    items = list(decode.stream_video(clip, cfg, 2))
    restarts = [i for i, item in enumerate(items) if isinstance(item, decode.Restart)]
    assert len(restarts) == 1 and items[restarts[0]].total == 12
    after = [item for item in items[restarts[0]:] if isinstance(item, decode.FrameChunk)]
    np.testing.assert_array_equal(np.concatenate([c.indices for c in after]), expected.indices)
    np.testing.assert_array_equal(np.concatenate([c.frames for c in after]), expected.frames)
    again = decode.read_video(clip, cfg)
    np.testing.assert_array_equal(again.frames, expected.frames)


# ------------------------------------------------------------------------------------- the stage
@pytest.fixture()
def work(tiny_synthetic, tmp_path):
    def make(name: str, count: int = 6, **settings):
        folder = tmp_path / name
        write_folder_manifest(tiny_synthetic, folder, files=sorted(tiny_synthetic.rglob("*.avi"))[:count])
        return extract_config(folder, **settings)
    return make


def _shard_file(config):
    return WorkFolder.of(config).shard_file(extract.UNIT, ShardSpec(0, 1))


def _shard_bytes(config) -> bytes:
    return _shard_file(config).read_bytes()


@pytest.mark.slow
def test_shards_are_byte_identical_for_any_chunk_size_and_with_workers(work, one_torch_thread):
    """The CNN batch (4) and the chunks (1, 5, 128 frames) fall differently on 12-frame clips; one run
    decodes and computes flow in 2 worker processes.

    Byte for byte with gzip on the flow. h5py's LZF filter leaves its hash table uninitialised (liblzf's
    INIT_HTAB = 0), so its compressed bytes can differ between any two runs, even of the same settings;
    with LZF the decoded contents and the per-video checksums are compared instead.
    """
    common = {"backbone": "resnet18", "device": "cpu", "batch_size": 4, "flow_compression": "gzip"}
    runs = {"128": work("a", **common), "5": work("b", chunk_frames=5, **common),
            "1": work("c", chunk_frames=1, **common), "5, 2 workers": work("d", chunk_frames=5, workers=2, **common)}
    records = {name: extract.run_shard(config, ShardSpec(0, 1)) for name, config in runs.items()}
    assert records["5, 2 workers"]["timings"]["workers"] == 2
    assert all(r["n_videos"] == 6 and not r["failed"] for r in records.values())
    reference = _shard_bytes(runs["128"])
    for name, config in runs.items():
        assert _shard_bytes(config) == reference, name
        assert records[name]["sha256"] == records["128"]["sha256"]
        assert not list(WorkFolder.of(config).unit_dir(extract.UNIT).rglob("*.spool"))
    lzf = {"backbone": "resnet18", "device": "cpu", "batch_size": 4}
    whole, chunked = work("e", **lzf), work("f", chunk_frames=3, workers=1, **lzf)
    assert extract.run_shard(whole, ShardSpec(0, 1))["videos"] == extract.run_shard(chunked, ShardSpec(0, 1))["videos"]
    with ShardReader(_shard_file(whole)) as a, ShardReader(_shard_file(chunked)) as b:
        for video_id in a.video_ids():
            np.testing.assert_array_equal(a.flow(video_id), b.flow(video_id))


def _dying_worker(conn, cfg, *shared) -> None:
    """A worker that dies in the middle of the victim video (a segfault, or SIGKILL as the OOM killer sends),
    or meets a MemoryError there; the real worker otherwise."""
    victim, how = os.environ[VICTIM], os.environ[HOW]
    real = extract.produce

    def produce(cfg, entry, path, want_frames, *helper):
        for number, message in enumerate(real(cfg, entry, path, want_frames, *helper)):
            if entry.id == victim and number == 1:
                if how == "segfault":
                    import ctypes

                    ctypes.string_at(0)
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise MemoryError()
            yield message

    extract.produce = produce  # this worker's own copy of the module
    extract._worker_main(conn, cfg, *shared)


def _helping_worker(conn, cfg, *shared) -> None:
    """A worker that computes the features of every chunk it may (whole CNN batches), however fast the CNN's
    process is: what a worker beside a slow CPU CNN does for some of them."""
    extract._HELP_BEHIND = 0
    extract._worker_main(conn, cfg, *shared)


@pytest.mark.slow
def test_features_a_worker_computes_are_the_bytes_the_cnn_process_would_store(work, monkeypatch, one_torch_thread):
    """12-frame clips in chunks of 4: with CNN batches of 4 every chunk is whole batches and the worker
    computes their features; with batches of 3 no chunk is (a batch would be split between the processes)
    and the CNN's process computes them all. The stored bytes equal the serial run's either way."""
    common = {"backbone": "resnet18", "device": "cpu", "flow_compression": "gzip", "chunk_frames": 4}
    monkeypatch.setattr(extract, "_WORKER_TARGET", _helping_worker)
    for batch_size, helped in ((4, True), (3, False)):
        serial = work(f"serial{batch_size}", workers=0, batch_size=batch_size, **common)
        parallel = work(f"parallel{batch_size}", workers=1, batch_size=batch_size, **common)
        serial_record = extract.run_shard(serial, ShardSpec(0, 1))
        record = extract.run_shard(parallel, ShardSpec(0, 1))
        assert record["n_videos"] == 6 and not record["failed"]
        # the first video's first chunk decides the CNN's precision in this process; after that the worker
        # computes every whole-batch chunk
        assert (record["timings"]["chunks_featured_by_workers"] > 0) == helped
        assert serial_record["timings"]["chunks_featured_by_workers"] == 0
        assert _shard_bytes(parallel) == _shard_bytes(serial), batch_size


def _quitting_worker(conn, cfg, *shared) -> None:
    """A worker that cannot start (it leaves before it says it is ready)."""
    os._exit(3)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "segfault"])
def test_a_worker_that_dies_on_a_video_is_replaced_and_the_video_counted(work, monkeypatch, how):
    config = work("w", chunk_frames=2, workers=1, max_attempts=2)
    victim = sorted(v.id for v in extract.ensure_manifest(config).videos)[2]
    monkeypatch.setattr(extract, "_WORKER_TARGET", _dying_worker)
    monkeypatch.setenv(VICTIM, victim)
    monkeypatch.setenv(HOW, how)
    record = extract.run_shard(config, ShardSpec(0, 1))   # one call: the shard itself never hangs or dies
    assert [f["video"] for f in record["failed"]] == [victim]
    assert "died 2 times" in record["failed"][0]["reason"]
    assert record["n_videos"] == 5 and victim not in {v["id"] for v in record["videos"]}
    clean = work("clean", workers=0)
    expected = {v["id"]: v["checksum"] for v in extract.run_shard(clean, ShardSpec(0, 1))["videos"]}
    assert {v["id"]: v["checksum"] for v in record["videos"]} == {k: v for k, v in expected.items() if k != victim}


@pytest.mark.slow
def test_a_fault_of_the_machine_in_a_worker_stops_the_shard_without_failing_a_video(work, monkeypatch):
    config = work("w", chunk_frames=2, workers=1)
    victim = sorted(v.id for v in extract.ensure_manifest(config).videos)[1]
    monkeypatch.setattr(extract, "_WORKER_TARGET", _dying_worker)
    monkeypatch.setenv(VICTIM, victim)
    monkeypatch.setenv(HOW, "memory")
    with pytest.raises(ResourceError, match="out of memory while extracting .*no video was recorded as failed"):
        extract.run_shard(config, ShardSpec(0, 1))
    folder = WorkFolder.of(config)
    parts = folder.parts_dir(extract.UNIT, ShardSpec(0, 1))
    assert not list(parts.glob("*.failed.json")) and not list(parts.glob("*.attempts.json"))
    assert not folder.record_file(extract.UNIT, ShardSpec(0, 1)).exists()
    monkeypatch.setattr(extract, "_WORKER_TARGET", extract._worker_main)  # the machine is fixed: the rerun
    record = extract.run_shard(config, ShardSpec(0, 1))
    assert record["n_videos"] == 6 and not record["failed"]


def test_workers_that_cannot_start_stop_the_shard_with_one_line(work, monkeypatch):
    config = work("w", count=2, workers=1)
    monkeypatch.setattr(extract, "_WORKER_TARGET", _quitting_worker)
    with pytest.raises(ResourceError, match="an extract worker process could not start .exit code 3"):
        extract.run_shard(config, ShardSpec(0, 1))
    parts = WorkFolder.of(config).parts_dir(extract.UNIT, ShardSpec(0, 1))
    assert not list(parts.glob("*.failed.json")) and not list(parts.glob("*.attempts.json"))


def test_the_cores_of_a_task(monkeypatch):
    from hpcvid.config import replace
    from hpcvid.launch.executors import usable_cores

    config = replace(extract_config("w"), **{"extract.workers": -1, "launch.cpus_per_task": 1})
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert extract.task_cores(config) == usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                # `run --jobs N` gave this process one core
    assert extract.task_cores(config) == 1 and extract.worker_count(config) == 0
    monkeypatch.setenv("SLURM_JOB_ID", "42")                  # under SLURM: launch.cpus_per_task
    assert extract.task_cores(replace(config, **{"launch.cpus_per_task": 64})) == usable_cores()
    assert extract.worker_count(replace(config, **{"extract.workers": 3})) == 3
    assert "chunk_frames" not in json.dumps(extract._settings_fingerprint(config))  # how it runs, not what it stores
