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
    with pytest.raises(ConfigError):
        build_backbone("vgg16")
