"""Backbones: shapes and feature sizes, weights files (round trip, torchvision state dicts, missing,
garbage, wrong network) and the input preprocessing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcvid.learn.backbones import (IMAGENET_MEAN, IMAGENET_STD, build_backbone, pick_device, preprocess,
                              save_backbone)
from hpcvid.errors import CheckpointError, ConfigError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch(n: int = 2, size: int = 64) -> torch.Tensor:
    frames = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return preprocess(frames)


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("googlenet", 1024)])
def test_random_trunk_gives_pooled_features(name, dim) -> None:
    trunk, head, feature_dim = build_backbone(name)
    assert feature_dim == dim and head is None and trunk.random_init
    assert trunk.weights_source == "random initialisation"
    with torch.inference_mode():
        out = trunk.eval()(batch())
    assert out.shape == (2, dim) and torch.isfinite(out).all() and out.abs().max() > 0
    _, head, _ = build_backbone(name, num_classes=7)
    assert head.out_features == 7 and head.in_features == dim


@pytest.mark.parametrize("name", ["resnet18", "googlenet"])
def test_saved_backbone_round_trips(tmp_path, name) -> None:
    torch.manual_seed(0)
    trunk, head, _ = build_backbone(name, num_classes=5)
    path = save_backbone(trunk, head, tmp_path / "frame_cnn.pt")
    again, again_head, _ = build_backbone(name, path)
    assert not again.random_init and again.weights_source == str(path)
    assert again_head is not None and again_head.out_features == 5  # the file's own head
    x = batch()
    with torch.inference_mode():
        assert torch.equal(trunk.eval()(x), again.eval()(x))
        assert torch.equal(head(trunk(x)), again_head(again(x)))
    _, other_head, _ = build_backbone(name, path, num_classes=3)  # a new task: fresh head, same trunk
    assert other_head.out_features == 3


def test_plain_torchvision_state_dict_loads_with_its_head(tmp_path) -> None:
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)  # as saved from DDP
    trunk, head, _ = build_backbone("resnet18", path)
    assert head.out_features == 1000
    x = batch()
    with torch.inference_mode():
        assert torch.allclose(head(trunk.eval()(x)), model.eval()(x), atol=1e-5)


def test_googlenet_imagenet_style_file_ignores_aux_heads(tmp_path) -> None:
    import torchvision

    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    path = tmp_path / "googlenet.pth"
    torch.save(model.state_dict(), path)
    trunk, head, dim = build_backbone("googlenet", path)
    assert dim == 1024 and head.out_features == 1000 and trunk.transform_input  # TF-converted convention


def test_missing_file_is_a_checkpoint_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist.*random initialisation"):
        build_backbone("resnet18", tmp_path / "nothere.pt")


def test_garbage_file_is_a_checkpoint_error(tmp_path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00not a torch file at all" * 10)
    with pytest.raises(CheckpointError, match=str(path)):
        build_backbone("googlenet", path)


def test_pickled_objects_are_refused(tmp_path) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module, not a state dict: weights_only refuses it
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        build_backbone("resnet18", path)


def test_weights_of_another_network_are_refused(tmp_path) -> None:
    trunk, head, _ = build_backbone("resnet18", num_classes=2)
    path = save_backbone(trunk, head, tmp_path / "r18.pt")
    with pytest.raises(CheckpointError, match="resnet18 backbone, not googlenet"):
        build_backbone("googlenet", path)
    plain = tmp_path / "r18-plain.pt"
    torch.save({k: v for k, v in trunk.state_dict().items()}, plain)
    with pytest.raises(CheckpointError, match="does not fit torchvision's googlenet"):
        build_backbone("googlenet", plain)


def test_preprocess_normalises_with_imagenet_constants() -> None:
    frames = np.zeros((1, 4, 4, 3), np.uint8)
    frames[..., 0] = 255
    x = preprocess(frames)
    assert x.shape == (1, 3, 4, 4) and x.is_contiguous(memory_format=torch.channels_last)
    expected = [(1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1],
                -IMAGENET_MEAN[2] / IMAGENET_STD[2]]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected), atol=1e-5)
    with pytest.raises(ValueError):
        preprocess(np.zeros((1, 4, 4, 3), np.float32))


def test_pick_device() -> None:
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            pick_device("cuda")
    with pytest.raises(ConfigError, match="unknown; choose one of resnet18, resnet50"):
        build_backbone("alexnet")


# --------------------------------------------------------------------------- the backbones the studies compared
# seconds to build here: the large ones (VGG-16 has 138 M parameters) run with the slow tests
LIGHT = ("resnet18", "googlenet", "mobilenet_v3_large", "mobilenet_v3_small")
HEAVY = tuple(pytest.param(name, marks=pytest.mark.slow) for name in ("resnet50", "resnet101", "vgg16"))


@pytest.mark.parametrize("name", [*LIGHT, *HEAVY])
def test_every_architecture_gives_its_feature_size(name) -> None:
    from hpcvid.learn.backbones import FEATURE_DIMS, last_feature_map

    torch.manual_seed(0)
    trunk, _, dim = build_backbone(name, num_classes=4)
    with torch.inference_mode():
        out = trunk.eval()(batch(1, 64))
    assert out.shape == (1, dim) == (1, FEATURE_DIMS[name]) and torch.isfinite(out).all()
    captured = []
    handle = last_feature_map(trunk).register_forward_hook(lambda m, i, o: captured.append(o.shape))
    with torch.inference_mode():
        trunk(batch(1, 64))
    handle.remove()
    assert len(captured) == 1 and len(captured[0]) == 4 and captured[0][-1] >= 2    # a spatial map for Grad-CAM


@pytest.mark.parametrize("name", [*LIGHT, HEAVY[0]])
def test_a_torchvision_state_dict_of_each_architecture_loads_with_its_head(tmp_path, name) -> None:
    import torchvision

    from hpcvid.learn.backbones import ARCHITECTURES

    torch.manual_seed(1)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    trunk, head, _ = build_backbone(name, path)
    assert head.out_features == 1000 and not trunk.random_init
    x = batch(1, 64)
    with torch.inference_mode():
        assert torch.allclose(head(trunk.eval()(x)), model(x), atol=1e-4)
    saved = save_backbone(trunk, head, tmp_path / "again.pt")
    again, again_head, _ = build_backbone(name, saved)
    stored = torch.load(saved, weights_only=True)["state_dict"]
    assert f"{ARCHITECTURES[name].head}.weight" in stored            # the head under its torchvision name
    with torch.inference_mode():
        assert torch.equal(again_head(again.eval()(x)), head(trunk(x)))


@pytest.mark.parametrize("given,asked", [
    ("mobilenet_v3_small", "mobilenet_v3_large"), ("resnet18", "googlenet"),
    pytest.param("resnet50", "resnet101", marks=pytest.mark.slow),
    pytest.param("resnet18", "vgg16", marks=pytest.mark.slow)])
def test_a_file_of_another_architecture_is_refused_with_one_line(tmp_path, given, asked) -> None:
    import torchvision

    path = tmp_path / f"{given}.pth"
    torch.save(getattr(torchvision.models, given)(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError, match=f"does not fit torchvision's {asked}") as caught:
        build_backbone(asked, path)
    assert "\n" not in str(caught.value)


def test_flow_and_difference_trunks_start_from_the_rgb_network(tmp_path) -> None:
    """Cross-modality initialisation: the widened first conv holds the mean of the RGB filters per channel."""
    import torchvision

    from hpcvid.learn.models import FlowModel, TSNModel

    torch.manual_seed(2)
    rgb = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    path = tmp_path / "googlenet.pth"
    torch.save(rgb.state_dict(), path)
    flow = FlowModel(3, stack=4, backbone="googlenet", weights=str(path))
    first = flow.trunk.trunk.conv1.conv.weight
    assert first.shape[1] == 8 and not flow.trunk.trunk.transform_input
    assert torch.allclose(first, rgb.conv1.conv.weight.mean(dim=1, keepdim=True).repeat(1, 8, 1, 1))
    assert flow.eval()(torch.randn(1, 8, 64, 64)).shape == (1, 3)
    diff = TSNModel(3, modality="diff", segments=2, stack=2, backbone="mobilenet_v3_small")
    assert diff.trunk.trunk.features[0][0].in_channels == 6
    assert diff.eval()(torch.randn(1, 2, 6, 64, 64)).shape == (1, 3)
