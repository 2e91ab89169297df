"""Feature extraction: non-zero, finite float32 features for both backbones (untrained GoogLeNet's are
~1e-12: they must survive), batching does not change them, a built trunk or a weights file can be used,
and per-frame scores come from the head."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcvid.learn.backbones import build_backbone, save_backbone
from hpcvid.learn.extractor import FeatureExtractor


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (7, 48, 48, 3), dtype=np.uint8)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine without a fixed epsilon (a fixed one erases ~1e-12 features)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("googlenet", 1024)])
def test_untrained_features_are_finite_non_zero_float32(frames, name, dim) -> None:
    torch.manual_seed(0)
    extractor = FeatureExtractor(name, batch_size=4, device="cpu")
    features = extractor.extract(frames)
    assert features.shape == (7, dim) and features.dtype == np.float32
    assert np.isfinite(features).all()
    assert (np.abs(features).max(axis=1) > 0).all()  # every frame, not just some
    assert extractor.random_init and extractor.describe()["random_init"] is True
    assert extractor.describe()["precision"] in ("bf16", "fp32") and extractor.describe()["precision_reason"]
    # different frames give different features (a constant output would also be "non-zero")
    assert not np.allclose(features[0], features[1], rtol=1e-3, atol=0)


def test_untrained_googlenet_features_are_tiny_and_would_vanish_in_float16(frames) -> None:
    """Why features are returned (and must be stored) as float32."""
    torch.manual_seed(0)
    features = FeatureExtractor("googlenet", batch_size=8, device="cpu").extract(frames)
    assert 0 < np.abs(features).max() < 1e-6
    assert not np.abs(features.astype(np.float16)).any()


@pytest.mark.parametrize("name", ["resnet18", "googlenet"])
def test_batch_size_and_precision_do_not_change_features(frames, name) -> None:
    torch.manual_seed(0)
    trunk, _, _ = build_backbone(name)
    small = FeatureExtractor(trunk, batch_size=3, device="cpu").extract(frames)
    large = FeatureExtractor(trunk, batch_size=7, device="cpu").extract(frames)
    exact = FeatureExtractor(trunk, batch_size=7, device="cpu", precision="fp32").extract(frames)
    assert cosine(small, large).min() > 0.999
    assert cosine(large, exact).min() > 0.99


def test_built_trunk_and_weights_file_give_the_same_features_and_scores(tmp_path, frames) -> None:
    torch.manual_seed(0)
    trunk, head, _ = build_backbone("resnet18", num_classes=4)
    path = save_backbone(trunk, head, tmp_path / "frame_cnn.pt")
    from_module = FeatureExtractor(trunk, head=head, device="cpu", precision="fp32")
    from_file = FeatureExtractor("resnet18", weights=path, device="cpu", precision="fp32")
    assert not from_file.random_init and from_file.describe()["weights"] == str(path)
    features, scores = from_file.extract_with_scores(frames)
    assert scores.shape == (7, 4) and scores.dtype == np.float32
    assert np.allclose(features, from_module.extract(frames), atol=1e-5)
    with torch.inference_mode():
        expected = head(torch.from_numpy(features)).numpy()
    assert np.allclose(scores, expected, atol=1e-4)
    assert from_module.feature_dim == 512


def test_no_head_means_no_scores_and_empty_input_is_empty(frames) -> None:
    extractor = FeatureExtractor("resnet18", device="cpu")
    features, scores = extractor.extract_with_scores(frames[:2])
    assert scores is None and features.shape == (2, 512)
    assert extractor.extract(frames[:0]).shape == (0, 512)
    with pytest.raises(ValueError):
        extractor.extract(frames.astype(np.float32))


def test_a_training_module_keeps_its_mode(frames) -> None:
    torch.manual_seed(0)
    trunk, head, _ = build_backbone("resnet18", num_classes=3)
    reference = FeatureExtractor(trunk, device="cpu", batch_size=1, precision="fp32").extract(frames[:4])
    trunk.train()
    head.train()
    features, scores = FeatureExtractor(trunk, head=head, device="cpu", batch_size=4,
                                        precision="fp32").extract_with_scores(frames[:4])
    assert trunk.training and head.training  # restored after extraction
    # run in eval mode: in training mode BatchNorm would mix the frames of a batch
    assert np.allclose(features, reference, rtol=1e-4, atol=1e-5) and scores.shape == (4, 3)


def test_calibration_refuses_float16_for_vanishing_features(frames, monkeypatch) -> None:
    """What a CUDA GPU without bf16 would do (fp16 AMP), run on the CPU: untrained GoogLeNet's ~1e-12
    features are zero in float16, so the extractor must fall back to float32; ResNet-18 keeps float16."""
    monkeypatch.setattr(FeatureExtractor, "_low_precision", lambda self: "fp16")
    torch.manual_seed(0)
    googlenet = FeatureExtractor("googlenet", device="cpu")
    features = googlenet.extract(frames[:4])
    assert googlenet.precision == "fp32" and "disagrees" in googlenet.precision_reason
    assert (np.abs(features).max(axis=1) > 0).all()
    resnet = FeatureExtractor("resnet18", device="cpu")
    resnet.extract(frames[:4])
    assert resnet.precision == "fp16"


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "mobilenet_v3_small"])
def test_a_trunk_built_by_name_has_its_batchnorm_folded_and_gives_the_same_features(frames, name) -> None:
    """Folding is the same function up to float rounding (scale-free: untrained GoogLeNet's features are
    ~1e-12); a module the caller gives is never changed or replaced."""
    torch.manual_seed(0)
    folded = FeatureExtractor(name, batch_size=4, device="cpu", precision="fp32")
    torch.manual_seed(0)
    trunk = build_backbone(name).trunk
    given = FeatureExtractor(trunk, batch_size=4, device="cpu", precision="fp32")
    assert given.trunk is trunk and given.describe()["batchnorm"] == "as built"
    assert any("BatchNorm" in type(m).__name__ for m in trunk.modules())
    assert not any("BatchNorm" in type(m).__name__ for m in folded.trunk.modules())
    assert folded.describe()["batchnorm"].endswith("folded into their convolutions")
    a, b = folded.extract(frames), given.extract(frames)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert folded.random_init and folded.name == name
