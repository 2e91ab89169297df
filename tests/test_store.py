"""The shard schema: what is written is what is read back, whichever storage is chosen; what is damaged
is refused with one line."""
from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest

from damage import flip_byte, set_schema_version, store_error_line, unchecked_datasets
from hpcvid.errors import StoreError
from hpcvid.storage.shards import (SCHEMA_VERSION, ShardReader, StorageOptions, VideoData, assemble_shard, decode_jpeg,
                                   encode_jpeg, group_name, read_video_file_summary, video_id_of, write_shard,
                                   write_video_file)


def _video(video_id: str, frames: int = 5, seed: int = 0) -> VideoData:
    rng = np.random.default_rng(seed)
    # smooth images: JPEG keeps them within a few grey levels
    base = np.linspace(0, 200, 24 * 32, dtype=np.float32).reshape(24, 32)
    images = np.stack([np.stack([base + 10 * t, base[::-1] + 5 * t, np.full_like(base, 40 + t)], -1)
                       for t in range(frames)]).clip(0, 255).astype(np.uint8)
    flow = rng.uniform(-25, 25, size=(frames - 1, 24, 32, 2)).astype(np.float32)
    return VideoData(
        video_id=video_id,
        attrs={"label": 3, "class_name": "Rotate", "split": "train", "fps": 25.0, "total_frames": 40,
               "source": f"/data/{video_id}.avi", "width": 320, "height": 240},
        frame_indices=np.arange(0, 2 * frames, 2),
        frames=images, flow=flow,
        features={"resnet18": rng.normal(size=(frames, 8)).astype(np.float32) * 1e-12},
        scores={"frame": rng.normal(size=(frames, 4)).astype(np.float32)},
    )


def test_group_names_are_safe_and_reversible():
    for video_id in ["Class/v_Class_g01_c01", "with space/ünïcödé 動画", "a%2Fb", "dots.in.name"]:
        name = group_name(video_id)
        assert "/" not in name and name.isascii()
        assert video_id_of(name) == video_id


@pytest.mark.parametrize("frame_storage,flow_storage,compression",
                         [("jpeg", "uint8", "lzf"), ("uint8", "float16", "gzip"), ("jpeg", "uint8", "none")])
def test_round_trip(tmp_path, frame_storage, flow_storage, compression):
    videos = [_video("B/second clip", seed=1), _video("A/ünï", seed=2)]
    options = StorageOptions(frame_storage=frame_storage, jpeg_quality=95, flow_storage=flow_storage, flow_bound=20,
                             flow_compression=compression)
    summaries = write_shard(tmp_path / "s.h5", videos, options=options, meta={"note": "x"})
    assert [s["id"] for s in summaries] == ["B/second clip", "A/ünï"]
    with ShardReader(tmp_path / "s.h5") as reader:
        assert reader.attrs["schema_version"] == SCHEMA_VERSION
        assert sorted(reader.video_ids()) == ["A/ünï", "B/second clip"]
        assert reader.group("A/ünï")["flow"].compression == (None if compression == "none" else compression)
        for video in videos:
            info = reader.info(video.video_id)
            assert info["label"] == 3 and info["class_name"] == "Rotate" and info["frames"] == 5
            assert info["total_frames"] == 40 and info["source"] == video.attrs["source"]
            np.testing.assert_array_equal(info["frame_indices"], video.frame_indices)
            frames = reader.frames(video.video_id)
            assert frames.dtype == np.uint8 and frames.shape == video.frames.shape
            error = np.abs(frames.astype(int) - video.frames)
            if frame_storage == "uint8":
                assert error.max() == 0
            else:  # JPEG: small loss (chroma subsampling); a swapped channel order would be ~100 off
                assert error.mean() < 3 and error.max() <= 16
            np.testing.assert_array_equal(reader.frames(video.video_id, [4, 1]), frames[[4, 1]])
            flow = reader.flow(video.video_id)
            assert flow.dtype == np.float32 and flow.shape == video.flow.shape
            if flow_storage == "uint8":  # clipped to the bound, then within half a step
                expected = np.clip(video.flow, -20, 20)
                assert np.abs(flow - expected).max() <= 20 / 255 + 1e-5
            else:
                np.testing.assert_allclose(flow, video.flow, rtol=1e-3, atol=1e-3)
            np.testing.assert_array_equal(reader.flow(video.video_id, 1, 3), flow[1:3])
            features = reader.features(video.video_id, "resnet18")
            np.testing.assert_array_equal(features, video.features["resnet18"])  # float32, ~1e-12 kept
            np.testing.assert_array_equal(reader.features(video.video_id, "resnet18", 2, 4), features[2:4])
            np.testing.assert_array_equal(reader.scores(video.video_id, "frame"), video.scores["frame"])
        with pytest.raises(StoreError, match="not in shard"):
            reader.info("missing")


def test_checksums_follow_contents(tmp_path):
    a = write_shard(tmp_path / "a.h5", [_video("v", seed=1)])[0]
    b = write_shard(tmp_path / "b.h5", [_video("v", seed=1)])[0]
    c = write_shard(tmp_path / "c.h5", [_video("v", seed=2)])[0]
    assert a["checksum"] == b["checksum"] != c["checksum"]
    assert a["shapes"]["frames"] == [5, 24, 32, 3] and a["shapes"]["flow"] == [4, 24, 32, 2]


def test_parts_assemble_into_a_shard(tmp_path):
    parts = [tmp_path / "p1.h5", tmp_path / "p2.h5"]
    s1 = write_video_file(parts[0], _video("x/one", seed=1))
    write_video_file(parts[1], _video("x/two", seed=2))
    assert read_video_file_summary(parts[0]) == s1
    assemble_shard(tmp_path / "shard.h5", parts, meta={"shard": "0000-of-0001"})
    with ShardReader(tmp_path / "shard.h5") as reader:
        assert reader.video_ids() == ["x/one", "x/two"]
        assert reader.group("x/one").attrs["checksum"] == s1["checksum"]
    with pytest.raises(StoreError, match="twice"):
        assemble_shard(tmp_path / "dup.h5", [parts[0], parts[0]])
    assert not (tmp_path / "dup.h5").exists() and not list(tmp_path.glob(".*.partial"))


def test_reader_is_lazy_and_picklable(tmp_path):
    write_shard(tmp_path / "s.h5", [_video("v")])
    reader = ShardReader(tmp_path / "s.h5")
    assert not reader.is_open  # nothing opened before first use (safe to fork)
    reader.features("v", "resnet18")
    assert reader.is_open
    clone = pickle.loads(pickle.dumps(reader))
    assert not clone.is_open
    np.testing.assert_array_equal(clone.features("v", "resnet18"), reader.features("v", "resnet18"))
    reader.close(), clone.close()


def test_wrong_schema_and_missing_files_are_store_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        ShardReader(tmp_path / "nope.h5")
    with h5py.File(tmp_path / "old.h5", "w") as handle:
        handle.attrs["schema_version"] = 99
    with pytest.raises(StoreError, match="schema_version"):
        ShardReader(tmp_path / "old.h5").video_ids()
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="not a readable HDF5"):
        ShardReader(tmp_path / "junk.h5").video_ids()


@pytest.mark.parametrize("frame_storage,compression", [("jpeg", "lzf"), ("uint8", "gzip"), ("jpeg", "none")])
def test_every_dataset_carries_a_checksum_per_chunk(tmp_path, frame_storage, compression):
    options = StorageOptions(frame_storage=frame_storage, flow_compression=compression)
    short = _video("short", frames=1)   # empty flow: a dataset with no rows is checksummed too
    short.flow = short.flow[:0]
    write_shard(tmp_path / "s.h5", [_video("v"), short], options=options)
    write_video_file(tmp_path / "part.h5", _video("p"), options)
    assemble_shard(tmp_path / "assembled.h5", [tmp_path / "part.h5"])
    for path in ("s.h5", "part.h5", "assembled.h5"):
        assert unchecked_datasets(tmp_path / path) == [], path
    with h5py.File(tmp_path / "s.h5", "r") as handle:
        flow = handle["videos/v/flow"]
        assert flow.compression == (None if compression == "none" else compression)  # kept beside the checksum


def _long_video(video_id: str, frames: int = 40) -> VideoData:
    """Noisy frames: their JPEG bytes fill several 32 KiB chunks."""
    video = _video(video_id, frames=frames)
    rng = np.random.default_rng(7)
    video.frames = rng.integers(0, 256, video.frames.shape, dtype=np.uint8)
    return video


@pytest.mark.parametrize("what", ["features", "scores", "flow", "jpeg frames", "raw frames", "frame_indices"])
def test_a_flipped_byte_in_a_chunk_is_one_line_naming_file_video_and_fix(tmp_path, what):
    storage = "uint8" if what == "raw frames" else "jpeg"
    video = _long_video("Class/v_one")
    path = tmp_path / "shard.h5"
    write_shard(path, [video, _video("Class/v_two")], options=StorageOptions(frame_storage=storage),
                kind="hpcvid.extract")
    dataset = {"features": "features/resnet18", "scores": "scores/frame", "flow": "flow", "jpeg frames": "frames",
               "raw frames": "frames", "frame_indices": "frame_indices"}[what]
    flip_byte(path, f"videos/{group_name('Class/v_one')}/{dataset}", chunk=1 if what == "jpeg frames" else 0)
    read = {"features": lambda r: r.features("Class/v_one", "resnet18"),
            "scores": lambda r: r.scores("Class/v_one", "frame"),
            "flow": lambda r: r.flow("Class/v_one"),
            "jpeg frames": lambda r: r.frames("Class/v_one"),
            "raw frames": lambda r: r.frames("Class/v_one"),
            "frame_indices": lambda r: r.info("Class/v_one")}[what]
    with ShardReader(path) as reader:
        message = store_error_line(lambda: read(reader))
        assert str(path) in message and "'Class/v_one'" in message and "re-extract it with --force" in message
        np.testing.assert_array_equal(reader.features("Class/v_two", "resnet18"),   # the rest stays readable
                                      _video("Class/v_two").features["resnet18"])


def test_jpeg_reads_of_any_set_of_frames_equal_frame_by_frame_reads(tmp_path):
    video = _long_video("v", frames=40)
    write_shard(tmp_path / "s.h5", [video], options=StorageOptions(jpeg_quality=90))
    with ShardReader(tmp_path / "s.h5") as reader:
        with h5py.File(tmp_path / "s.h5", "r") as handle:
            assert handle["videos/v/frames"].id.get_num_chunks() >= 2   # a frame straddles a chunk border
        single = [reader.frames("v", [i])[0] for i in range(40)]
        for i in (0, 17, 39):  # each frame is the JPEG of its own image (offsets point at the right bytes)
            np.testing.assert_array_equal(single[i], decode_jpeg(encode_jpeg(video.frames[i], 90)))
        for positions in ([], [5], list(range(40)), list(range(10, 30)), [39, 0, 20, 21, 22, 1],
                          [3, 3, 4, 3], [0, 1, 2, 1, 0, 1, 2], list(range(39, -1, -1))):
            got = reader.frames("v", positions)
            assert got.shape == (len(positions), 24, 32, 3)
            np.testing.assert_array_equal(got, np.array([single[i] for i in positions]).reshape(got.shape))
        np.testing.assert_array_equal(reader.frames("v"), np.stack(single))
        with pytest.raises(IndexError, match="outside"):
            reader.frames("v", [40])


@pytest.mark.parametrize("kind,fix", [("hpcvid.extract", "re-extract it with --force"),
                                      ("hpcvid.features", "hpcvid run features --force")])
def test_a_shard_of_the_previous_schema_is_refused_with_the_fix(tmp_path, kind, fix):
    path = tmp_path / "old.h5"
    write_shard(path, [_video("v")], kind=kind)
    set_schema_version(path, 1)
    message = store_error_line(lambda: ShardReader(path).features("v", "resnet18"))
    assert str(path) in message and "schema_version 1" in message and fix in message

