"""The four models' forward contracts, rebuilding from init_args, cross-modality init, late fusion."""
import pytest
import torch
from torch import nn

from hpcvid.learn.models import (FlowModel, FrameModel, LSTMModel, TwoStreamModel, build_from_args, late_fusion,
                                 relative_standardise, widen_first_conv)

torch.set_num_threads(1)


def test_forward_contracts():
    frame = FrameModel(5, backbone="small")
    assert frame(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert frame.features(torch.randn(2, 3, 32, 32)).shape == (2, frame.feature_dim)
    flow = FlowModel(5, stack=4, backbone="small")
    assert flow(torch.randn(2, 8, 32, 32)).shape == (2, 5)
    two = TwoStreamModel(5, stack=4, backbone="small")
    assert two(torch.randn(2, 3, 32, 32), torch.randn(2, 8, 32, 32)).shape == (2, 5)
    probabilities = two.late(torch.randn(2, 3, 32, 32), torch.randn(2, 8, 32, 32))
    assert torch.allclose(probabilities.sum(-1), torch.ones(2))
    lstm = LSTMModel(5, input_dim=6, hidden=8, layers=3)
    logits, (h, c) = lstm(torch.randn(2, 7, 6), return_state=True)
    assert logits.shape == (2, 7, 5) and h.shape == (3, 2, 8)


def test_rebuild_from_init_args_gives_the_same_function():
    torch.manual_seed(0)
    model = TwoStreamModel(4, stack=2, backbone="small").eval()
    copy = build_from_args("twostream", model.init_args).eval()
    copy.load_state_dict(model.state_dict())
    rgb, flow = torch.randn(1, 3, 32, 32), torch.randn(1, 4, 32, 32)
    assert torch.equal(model(rgb, flow), copy(rgb, flow))


def test_widen_first_conv_averages_rgb_filters():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    rgb = net[0].weight.detach().clone()
    widen_first_conv(net, 6)
    assert net[0].in_channels == 6 and net[2].in_channels == 4
    expected = rgb.mean(dim=1, keepdim=True).repeat(1, 6, 1, 1)
    assert torch.allclose(net[0].weight, expected)


def test_resnet18_flow_trunk_takes_2l_channels():
    flow = FlowModel(3, stack=5, backbone="resnet18")
    assert flow(torch.randn(1, 10, 64, 64)).shape == (1, 3)


def test_late_fusion_weights():
    rgb = torch.tensor([[10.0, 0.0]])
    flow = torch.tensor([[0.0, 10.0]])
    assert late_fusion(rgb, flow, (1.0, 3.0))[0].argmax() == 1
    assert late_fusion(rgb, flow, (3.0, 1.0))[0].argmax() == 0


def test_frozen_trunk_and_frozen_stream_heads():
    frame = FrameModel(3, backbone="small", freeze_trunk=True)
    assert not any(p.requires_grad for p in frame.trunk.parameters())
    assert all(p.requires_grad for p in frame.head.parameters())
    two = TwoStreamModel(3, stack=2, backbone="small")
    assert not any(p.requires_grad for p in two.rgb.head.parameters())


def test_relative_standardise_keeps_tiny_features():
    x = torch.randn(2, 4, 8, dtype=torch.float64) * 1e-12
    y = relative_standardise(x)
    assert y.std() == pytest.approx(1.0, rel=0.05)
