"""Ping-pong padding, window sampling, input preparation and the datasets on literal examples."""
import numpy as np
import pytest
import torch

from hpcvid.learn.statistics import feature_statistics
from hpcvid.learn.datasets import (Augment, FeatureDataset, FeatureItem, FlowDataset, FrameDataset, MemoryFeatureSource,
                             MemoryVideoSource, TwoStreamDataset, VideoItem, centre_in_time, compensate_camera,
                             crop_resize, hold_out, normalise_features, ping_pong_indices, prepare_flow,
                             sequence_indices, window_start, window_starts)

torch.set_num_threads(1)


def test_ping_pong_literal():
    assert ping_pong_indices(3, 7) == [0, 1, 2, 1, 0, 1, 2]
    assert ping_pong_indices(4, 4) == [0, 1, 2, 3]
    assert ping_pong_indices(2, 5) == [0, 1, 0, 1, 0]
    assert ping_pong_indices(1, 3) == [0, 0, 0]
    assert ping_pong_indices(5, 3) == [0, 1, 2]


def test_window_sampling_literal():
    assert sequence_indices(3, 5) == [0, 1, 2, 1, 0]           # short: padded, whatever the rng
    assert sequence_indices(10, 4) == [3, 4, 5, 6]             # long, no rng: the centre window
    rng = np.random.default_rng(0)
    starts = {window_start(10, 4, rng) for _ in range(200)}
    assert starts == set(range(7))                             # every legal start, none beyond
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(4, 8, 3) == [0]


def test_feature_preparation_survives_tiny_scales():
    x = (np.arange(12, dtype=np.float32).reshape(4, 3) + 1) * 1e-12
    normed = normalise_features(x, x.mean(0), x.std(0))
    assert np.all(np.isfinite(normed)) and normed.std(0).min() > 0.9   # a fixed eps would give ~0
    x[:, 2] = 5e-12                                                    # a constant column
    mean, std, _ = feature_statistics([x[:2], x[2:]])
    normed = normalise_features(x, mean, std)
    assert np.all(np.isfinite(normed)) and np.allclose(normed.std(0)[:2], 1, atol=1e-5) and np.all(normed[:, 2] == 0)
    with pytest.raises(ValueError, match="feature_statistics"):        # an unfloored std is refused, never NaN
        normalise_features(x, x.mean(0), x.std(0))
    centred = centre_in_time(np.array([[1.0, 2.0], [3.0, 6.0]], dtype=np.float32))
    assert centred.tolist() == [[-1.0, -2.0, 2.0, 4.0], [1.0, 2.0, 2.0, 4.0]]


def test_camera_compensation_removes_global_motion():
    rng = np.random.default_rng(0)
    local = np.zeros((2, 8, 8, 2), np.float32)
    local[:, 2:4, 2:4, 0] = 3.0                         # a small moving object
    jitter = local + rng.normal(size=(2, 1, 1, 2)).astype(np.float32) * 5
    assert np.allclose(compensate_camera(jitter, "median"), local, atol=1e-5)
    stacked = prepare_flow(local, "none")
    assert stacked.shape == (4, 8, 8) and stacked[0, 2, 2] == 3.0 and stacked[1, 2, 2] == 0.0


def test_flow_flip_negates_horizontal_motion():
    flow = torch.zeros(2, 4, 4)
    flow[0] = 1.0                                        # everything moves right
    flipped = crop_resize(flow, (0, 0, 4, 4, True), flow_channels=True)
    assert torch.all(flipped[0] == -1.0) and torch.all(flipped[1] == 0.0)


def _video_source(n_videos=3, frames=5, size=16):
    rng = np.random.default_rng(1)
    frames_ = {f"v{i}": rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8) for i in range(n_videos)}
    flow = {f"v{i}": rng.normal(size=(frames - 1, size, size, 2)).astype(np.float32) for i in range(n_videos)}
    items = [VideoItem(f"v{i}", i % 2, frames) for i in range(n_videos)]
    return MemoryVideoSource(frames_, flow), items


def test_video_datasets_shapes_and_determinism():
    source, items = _video_source()
    frames = FrameDataset(source, items, train=True, seed=3, augment=Augment())
    a, label = frames[1]
    assert a.shape == (3, 16, 16) and label == 1
    assert torch.equal(frames[1][0], a)                  # same (seed, epoch, index): same sample
    frames.set_epoch(1)
    assert not torch.equal(frames[1][0], a)
    flow = FlowDataset(source, items, stack=6, train=True)   # 4 pairs < 6: ping-pong padded
    stack, _ = flow[0]
    assert stack.shape == (12, 16, 16)
    rgb, stack, label = TwoStreamDataset(source, items, stack=2, train=False)[2]
    assert rgb.shape == (3, 16, 16) and stack.shape == (4, 16, 16) and label == 0


def test_feature_dataset_windows():
    arrays = [np.arange(10 * 2, dtype=np.float32).reshape(10, 2), np.ones((3, 2), np.float32)]
    source = MemoryFeatureSource(arrays, mean=np.zeros(2), std=np.ones(2))
    items = [FeatureItem(0, "a", 0, 10), FeatureItem(1, "b", 1, 3)]
    val = FeatureDataset(source, items, seq_len=4, train=False, centring=False)
    x, _ = val[0]
    assert x[:, 0].tolist() == pytest.approx([6.0, 8.0, 10.0, 12.0], rel=1e-3)   # centre window 3..6
    padded, _ = FeatureDataset(source, items, seq_len=5, train=False, centring=True)[1]
    assert padded.shape == (5, 4)


def test_hold_out_is_per_class_and_deterministic():
    items = [VideoItem(f"c{c}_{i}", c, 4) for c in range(3) for i in range(10)]
    train, val = hold_out(items, 0.2, seed=0)
    assert len(val) == 6 and sorted(v.label for v in val) == [0, 0, 1, 1, 2, 2]
    assert not {v.id for v in val} & {t.id for t in train}
    assert hold_out(items, 0.2, seed=0)[1] == val


def _damaged_shard(tmp_path):
    """A shard of three videos (JPEG frames, features "f"); the features and frames of v1 are damaged."""
    from damage import flip_byte
    from hpcvid.storage.shards import VideoData, write_shard

    rng = np.random.default_rng(0)
    videos = [VideoData(f"v{i}", {"label": i % 2, "class_name": "c", "split": "train"}, np.arange(6),
                        frames=rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8),
                        features={"f": rng.normal(size=(6, 4)).astype(np.float32)}) for i in range(3)]
    path = tmp_path / "shard-0000-of-0001.h5"
    write_shard(path, videos, kind="hpcvid.extract")
    flip_byte(path, "videos/v1/features/f")
    flip_byte(path, "videos/v1/frames")
    return path


@pytest.mark.slow  # torch takes 5 s to stop a worker whose item failed
@pytest.mark.parametrize("data", ["features", "frames"])
def test_a_damaged_read_in_a_loader_worker_comes_back_as_one_line(tmp_path, data):
    from torch.utils.data import DataLoader

    from damage import store_error_line
    from hpcvid.errors import StoreError
    from hpcvid.learn.datasets import ShardFeatureSource, ShardVideoSource, one_line_errors

    path = _damaged_shard(tmp_path)
    if data == "features":
        source = ShardFeatureSource([path], "f")
        source.mean, source.std = np.zeros(4), np.ones(4)
        dataset = FeatureDataset(source, source.items, seq_len=6, train=False)
    else:
        dataset = FrameDataset(ShardVideoSource({f"v{i}": str(path) for i in range(3)}),
                               [VideoItem(f"v{i}", 0, 6) for i in range(3)], train=False)
    if data == "features":
        with pytest.raises(StoreError) as pasted:   # what torch makes of it: the worker's traceback inside
            list(DataLoader(dataset, batch_size=1, num_workers=1))
        assert "Traceback" in str(pasted.value)
    message = store_error_line(lambda: list(one_line_errors(DataLoader(dataset, batch_size=1, num_workers=1))))
    assert message.startswith(f"{path}, video 'v1': ") and "--force" in message

