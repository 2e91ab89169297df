"""Grad-CAM points at the evidence: a hand-built model whose class depends on one image region gets a heat map
whose top 10 % lies inside that region; the report's choice of examples; `hpcvid explain` on a real run."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hpcvid.learn.gradcam import colour_map, grad_cam, overlay
from hpcvid.stages.explain import class_index, pick_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32
REGION = (slice(4, 20), slice(18, 30))          # rows 4-19, columns 18-29: off-centre and not square


class Split(nn.Module):
    """Brightness at half resolution, as two channels: inside the region, and outside it."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = F.avg_pool2d(x.mean(dim=1, keepdim=True), 2)
        return torch.cat([brightness * (1 - self.mask), brightness * self.mask], dim=1)


class RegionModel(nn.Module):
    """Class 1: the region is brighter than the rest of the frame; class 0: the rest is brighter than the region.

    Brightness outside the region is evidence against class 1 (a negative gradient): Grad-CAM shows only
    what speaks for the class.
    """

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(SIZE // 2, SIZE // 2)
        mask[REGION[0].start // 2:REGION[0].stop // 2, REGION[1].start // 2:REGION[1].stop // 2] = 1.0
        self.split = Split(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outside, inside = self.split(x).mean(dim=(2, 3)).unbind(dim=1)
        return torch.stack([outside - inside, inside - outside], dim=1)


def _top_decile(heat: np.ndarray) -> np.ndarray:
    return heat >= np.quantile(heat, 0.9)


def test_the_hot_tenth_of_the_heat_map_lies_inside_the_region_the_class_depends_on():
    model = RegionModel().eval()
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    inside = np.zeros((SIZE, SIZE), bool)
    inside[REGION] = True
    result = grad_cam(model, [image], [model.split], 1, (SIZE, SIZE))
    heat = result.maps[0][0].numpy()
    assert heat.shape == (SIZE, SIZE) and heat.max() == pytest.approx(1.0)
    hot = _top_decile(heat)
    assert hot.sum() >= 0.1 * heat.size and np.all(inside[hot])
    # the other class's evidence is everywhere else
    other = grad_cam(model, [image], [model.split], 0, (SIZE, SIZE)).maps[0][0].numpy()
    assert not np.any(inside[_top_decile(other)])


def test_without_a_target_the_predicted_class_is_explained():
    model = RegionModel().eval()
    image = torch.full((1, 3, SIZE, SIZE), 0.1)
    image[..., REGION[0], REGION[1]] = 5.0                # bright inside: class 1 wins
    result = grad_cam(model, [image], [model.split], None, (SIZE, SIZE))
    assert result.predicted == 1 and result.target == 1
    assert result.probabilities.shape == (2,) and result.probabilities.sum() == pytest.approx(1.0)


def test_each_input_of_a_batch_gets_its_own_map():
    model = RegionModel().eval()
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    images[1] = 0.0                                        # a black frame: no evidence anywhere
    maps = grad_cam(model, [images], [model.split], 1, (SIZE, SIZE)).maps[0]
    assert maps.shape == (3, SIZE, SIZE) and maps[1].max() == 0 and maps[0].max() > 0


def test_colours_and_overlay():
    ramp = colour_map(np.array([[0.0, 0.5, 1.0]]))
    assert ramp[0, 0, 2] > ramp[0, 0, 0] and ramp[0, 2, 0] > ramp[0, 2, 2]     # cold blue, hot red
    frame = np.full((2, 3, 3), 100, np.uint8)
    assert overlay(frame, np.zeros((2, 3))).shape == (2, 3, 3)


def test_examples_one_wrong_one_right_per_class_least_accurate_first():
    ids = ["a1", "a2", "a3", "b1", "b2", "c1"]
    labels = [0, 0, 0, 1, 1, 2]
    guesses = [0, 1, 0, 1, 1, 0]            # class 0: 2/3 right, class 1: all right, class 2: all wrong
    assert pick_examples(ids, labels, guesses, 4) == [("c1", False), ("a2", False), ("a1", True), ("b1", True)]
    assert pick_examples(["a", "b", "c"], [0, 0, 1], [1, 0, 1], 2) == [("a", False), ("b", True)]
    assert pick_examples(ids, labels, guesses, 0) == []


def test_class_by_name_or_index():
    from hpcvid.errors import ConfigError

    classes = ["Run", "Jump"]
    assert class_index("Jump", classes) == 1 and class_index("0", classes) == 0 and class_index(None, classes) is None
    with pytest.raises(ConfigError, match="classes: Run, Jump"):
        class_index("Swim", classes)


@pytest.mark.slow
def test_explain_draws_a_trained_frame_model_and_refuses_the_feature_lstm(pipeline_work, tmp_path, capsys):
    from hpcvid.cli import main
    from hpcvid.stages.report import safe_name
    from hpcvid.storage.manifest import load_manifest

    work, _ = pipeline_work
    video = load_manifest(work).by_split("train")[0].id      # any split: the train videos have frames too
    assert main(["explain", "--run", str(work / "runs" / "frame"), "--video", video, "--frames", "3",
                 "--class", "1", "--out", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    [picture] = list(tmp_path.glob("*.png"))
    assert picture.name.startswith(safe_name(video)) and str(picture) in out and "heat map of" in out
    import matplotlib.image

    assert matplotlib.image.imread(picture).std() > 0.05       # a drawn picture, not a blank page
    assert main(["explain", "--run", str(work / "runs" / "lstm"), "--video", video, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a model that sees pixels" in err and len(err.strip().splitlines()) == 1
    assert main(["explain", "--run", str(work / "runs" / "frame"), "--video", "nope", "--out", str(tmp_path)]) == 2
