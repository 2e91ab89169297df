"""Segment networks, clips and frame sequences: segment sampling and crop sets on literal examples, partial
BatchNorm after a real training step, and the shapes of TSN, C3D and the end-to-end CNN-LSTM."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcvid.learn.clips import (ClipDataset, FrameSequenceDataset, SegmentDataset, covering_starts,
                                prepare_differences, segment_starts, square_crop)
from hpcvid.learn.datasets import Augment, MemoryVideoSource, VideoItem, prepare_frames
from hpcvid.learn.models import C3DModel, CNNLSTMModel, TSNModel, build_from_args, freeze_bn_statistics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------ segment sampling
def test_segment_starts_at_the_centres_in_evaluation():
    assert segment_starts(16, 1, 3) == [2, 8, 13]            # parts [0, 5.3), [5.3, 10.7), [10.7, 16)
    assert segment_starts(16, 6, 3) == [1, 5, 9]             # 11 valid starts of a 6-frame snippet
    assert segment_starts(9, 1, 9) == list(range(9))
    assert segment_starts(2, 1, 3) == [0, 1, 1]              # fewer starts than segments: repeated
    assert segment_starts(3, 5, 3) == [0, 0, 0]              # a snippet longer than the video: start 0


def test_segment_starts_in_training_stay_inside_their_segment_and_cover_it():
    seen: list[set[int]] = [set(), set(), set()]
    for draw in range(300):
        starts = segment_starts(16, 1, 3, np.random.default_rng(draw))
        for k, start in enumerate(starts):
            seen[k].add(start)
    assert seen == [{0, 1, 2, 3, 4, 5}, {5, 6, 7, 8, 9, 10}, {10, 11, 12, 13, 14, 15}]


def test_covering_starts():
    assert covering_starts(16, 16, 8) == [0]
    assert covering_starts(40, 16, 8) == [0, 8, 16, 24]
    assert covering_starts(30, 16, 8) == [0, 8, 14]          # and the last full window
    assert covering_starts(10, 16, 8) == [0]


# ------------------------------------------------------------------------------ crop sets
def test_corner_crops_with_scale_and_aspect_jittering_on_a_64_px_frame():
    """TSN's crops: height and width each drawn from {1, .875, .75, .66} of the short side (64 px: 64, 56,
    48, 42), placed at the centre or a corner."""
    augment = Augment(flip=False)
    boxes = {augment.draw(np.random.default_rng(i), 64, 64) for i in range(2000)}
    sides = {(h, w) for _, _, h, w, _ in boxes}
    assert sides == {(h, w) for h in (64, 56, 48, 42) for w in (64, 56, 48, 42)}
    places = {(top, left) for top, left, h, w, _ in boxes if (h, w) == (48, 56)}
    assert places == {(8, 4), (0, 0), (0, 8), (16, 0), (16, 8)}    # centre, then the four corners
    assert all(not flip for *_, flip in boxes)


def test_c3d_square_crop_of_112_from_128():
    assert square_crop(128, 171, 0.875, None) == (8, 29, 112)     # centred (C3D: 112 of 128 x 171)
    assert square_crop(64, 64, 0.875, None) == (4, 4, 56)          # the demo's frames scaled alike
    tops, lefts = set(), set()
    for i in range(400):
        top, left, side = square_crop(64, 64, 0.875, np.random.default_rng(i))
        assert side == 56
        tops.add(top)
        lefts.add(left)
    assert tops == lefts == set(range(9))


# ------------------------------------------------------------------------------ datasets
def _source(frames: int = 12, size: int = 16, videos: int = 2):
    rng = np.random.default_rng(4)
    pixels = {f"v{i}": rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8) for i in range(videos)}
    flow = {f"v{i}": rng.normal(size=(frames - 1, size, size, 2)).astype(np.float32) for i in range(videos)}
    return MemoryVideoSource(pixels, flow), [VideoItem(f"v{i}", i, frames) for i in range(videos)]


@pytest.mark.parametrize("modality,channels", [("rgb", 3), ("flow", 8), ("diff", 12)])
def test_segment_dataset_shapes_and_determinism(modality, channels):
    source, items = _source()
    data = SegmentDataset(source, items, modality=modality, segments=3, stack=4, train=True, seed=1,
                          augment=Augment())
    x, label = data[1]
    assert x.shape == (3, channels, 16, 16) and label == 1
    assert torch.equal(data[1][0], x)          # (seed, epoch, index) decides every draw
    data.set_epoch(1)
    assert not torch.equal(data[1][0], x)


def test_one_crop_box_serves_every_segment():
    """A video whose frames are all the same frame: after the random crop, its three snippets are equal."""
    frame = np.random.default_rng(2).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
    source = MemoryVideoSource({"v": np.repeat(frame, 9, axis=0)})
    data = SegmentDataset(source, [VideoItem("v", 0, 9)], modality="rgb", segments=3, stack=1, train=True,
                          augment=Augment())
    for epoch in range(5):
        data.set_epoch(epoch)
        x, _ = data[0]
        assert torch.allclose(x[0], x[1], atol=1e-5) and torch.allclose(x[0], x[2], atol=1e-5)


def test_rgb_difference_is_the_change_between_frames():
    frames = np.zeros((3, 2, 2, 3), np.uint8)
    frames[1] = 10
    frames[2] = 30
    diff = prepare_differences(frames)
    x = prepare_frames(frames)
    assert diff.shape == (6, 2, 2)
    assert torch.allclose(diff[:3], x[1] - x[0]) and torch.allclose(diff[3:], x[2] - x[1])
    assert diff[3:].abs().min() > diff[:3].abs().max()        # a larger change, a larger difference


def test_clip_and_frame_sequence_datasets():
    source, items = _source(frames=6)
    clip, label = ClipDataset(source, items, length=8, crop=0.875, train=True, flip=True)[1]
    assert clip.shape == (3, 8, 14, 14) and label == 1        # ping-pong padded to 8 frames, 14 of 16 px
    centred, _ = ClipDataset(source, items, length=4, crop=0.5, train=False)[0]
    expected = prepare_frames(source.frames("v0", [1, 2, 3, 4])[:, 4:12, 4:12]).transpose(0, 1)
    assert torch.equal(centred, expected)                     # the centre window, the centre crop
    sequence, _ = FrameSequenceDataset(source, items, length=5, train=False)[0]
    assert torch.equal(sequence, prepare_frames(source.frames("v0", [0, 1, 2, 3, 4])))


# ------------------------------------------------------------------------------ models
def test_tsn_c3d_and_cnnlstm_shapes():
    tsn = TSNModel(5, modality="flow", segments=3, stack=4, backbone="small")
    assert tsn(torch.randn(2, 3, 8, 32, 32)).shape == (2, 5)
    assert tsn.snippet_logits(torch.randn(2, 7, 8, 32, 32)).shape == (2, 7, 5)
    c3d = C3DModel(5, width=4, fc=16)
    assert c3d(torch.randn(2, 3, 16, 56, 56)).shape == (2, 5)
    assert c3d.features(torch.randn(1, 3, 16, 56, 56)).shape == (1, 32, 2, 3, 3)    # conv5b: 16 / 8 frames, 56 / 16 px
    assert c3d(torch.randn(1, 3, 4, 20, 20)).shape == (1, 5)                          # short clips fit too
    cnnlstm = CNNLSTMModel(5, backbone="small", hidden=8)
    assert cnnlstm(torch.randn(2, 6, 3, 32, 32)).shape == (2, 6, 5)
    for model, x in ((tsn, torch.randn(1, 3, 8, 32, 32)), (c3d, torch.randn(1, 3, 16, 56, 56)),
                     (cnnlstm, torch.randn(1, 6, 3, 32, 32))):
        copy = build_from_args({TSNModel: "tsn_flow", C3DModel: "c3d", CNNLSTMModel: "cnnlstm"}[type(model)],
                               model.init_args).eval()
        copy.load_state_dict(model.state_dict())
        assert torch.equal(copy(x), model.eval()(x))


def test_tsn_consensus_averages_the_segments_logits():
    tsn = TSNModel(4, modality="rgb", segments=3, backbone="small").eval()
    x = torch.randn(1, 3, 3, 32, 32)
    assert torch.allclose(tsn(x), tsn.snippet_logits(x).mean(dim=1))


def test_cnnlstm_gradients_reach_the_cnn():
    model = CNNLSTMModel(3, backbone="small", hidden=8)
    model(torch.randn(2, 4, 3, 32, 32))[:, -1].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trunk.parameters())


@pytest.mark.parametrize("partial", [True, False])
def test_partial_bn_keeps_every_running_statistic_but_the_first(partial):
    """After one real training step of a ResNet-18 TSN, only the first BatchNorm layer's statistics moved."""
    torch.manual_seed(0)
    model = TSNModel(3, modality="diff", segments=2, stack=2, backbone="resnet18", partial_bn=partial)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in layers]
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    torch.nn.functional.cross_entropy(model(torch.randn(2, 2, 6, 32, 32)), torch.tensor([0, 2])).backward()
    optimiser.step()
    moved = [not torch.equal(layer.running_mean, mean) or not torch.equal(layer.running_var, var)
             for layer, (mean, var) in zip(layers, before)]
    assert moved[0]
    assert not any(moved[1:]) if partial else all(moved)
    assert layers[1].training is not partial and layers[0].training


def test_freeze_bn_statistics_counts_what_it_froze():
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2),
                              torch.nn.BatchNorm1d(2))
    assert freeze_bn_statistics(net) == 2 and net[0].training and not net[2].training
    net.train()
    assert freeze_bn_statistics(net, keep_first=False) == 3
