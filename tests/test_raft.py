"""RAFT (``extract.flow = "raft"``): weights only from a local file, refused in one line before any work when the
file is missing or of the other architecture; flow of the right shape and convention from saved weights.

No trained RAFT weights exist on this machine (nothing is downloaded), so the model is a randomly initialised
torchvision RAFT saved by the test: these tests check the plumbing, not the quality of RAFT's flow."""
from __future__ import annotations

import numpy as np
import pytest

from hpcvid.errors import CheckpointError
from hpcvid.media.flow import compute_flow

torch = pytest.importorskip("torch")
optical_flow = pytest.importorskip("torchvision.models.optical_flow")


@pytest.fixture(scope="module")
def raft_small_file(tmp_path_factory) -> str:
    """A state dict saved from a randomly initialised raft_small, as a user would save trained weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("raft") / "raft_small.pt"
    torch.save(optical_flow.raft_small(weights=None).state_dict(), path)
    return str(path)


def frames(count: int = 4, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_flow_from_saved_weights_has_the_pipelines_shape_and_is_batch_independent(raft_small_file,
                                                                                    one_torch_thread) -> None:
    clip = frames(4, 40)  # not a multiple of 8, and below RAFT's 128 px: padded, then cropped back
    batched = compute_flow(clip, "raft", weights=raft_small_file, iterations=2, device="cpu", batch_size=8)
    single = compute_flow(clip, "raft", weights=raft_small_file, iterations=2, device="cpu", batch_size=1)
    assert batched.shape == (3, 40, 40, 2) and batched.dtype == np.float32 and np.isfinite(batched).all()
    np.testing.assert_allclose(batched, single, atol=1e-4)  # eval mode: no statistics shared across a batch
    gray = compute_flow(clip[..., 0], "raft", weights=raft_small_file, iterations=2, device="cpu")
    assert gray.shape == (3, 40, 40, 2)  # a gray frame is repeated to RAFT's three channels


def test_a_missing_or_unnamed_weights_file_stops_run_extract_before_any_work(tiny_synthetic, tmp_path,
                                                                             capsys) -> None:
    from hpcvid.cli import main

    work = tmp_path / "work"
    for extra, message in ((["--flow-weights", str(tmp_path / "nope.pt")], "nope.pt does not exist"),
                           ([], "needs weights")):
        code = main(["run", "extract", "--work", str(work), "--dataset", str(tiny_synthetic), "--flow", "raft",
                     "--backbone", "none", *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert "extract.flow_weights" in err  # the message names the setting to fix
    assert not work.exists()  # refused first in plan: not even the dataset was indexed


def test_weights_of_the_other_architecture_are_refused_with_the_fix(raft_small_file) -> None:
    from hpcvid.media.raft import check_raft_weights

    assert str(check_raft_weights(raft_small_file, "raft_small")) == raft_small_file
    with pytest.raises(CheckpointError) as error:
        check_raft_weights(raft_small_file, "raft_large")
    message = str(error.value)
    assert "does not fit raft_large" in message and "set extract.raft_model = 'raft_small'" in message
    assert "\n" not in message


def test_a_file_that_is_not_a_raft_state_dict_is_refused(tmp_path) -> None:
    from hpcvid.media.raft import check_raft_weights

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be loaded as a torch state dict"):
        check_raft_weights(text, "raft_small")
    other = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match=r"does not fit raft_small \(\d+ missing"):
        check_raft_weights(other, "raft_small")


def test_plan_accepts_good_weights_and_records_them(tiny_work, tmp_path, raft_small_file) -> None:
    import shutil

    from hpcvid.config import load_resolved, replace
    from hpcvid.stages import extract

    work = tmp_path / "work"
    shutil.copytree(tiny_work, work)
    config = replace(load_resolved(work), work=str(work), **{"extract.flow": "raft",
                                                               "extract.flow_weights": raft_small_file})
    assert extract.plan(config)  # shards to do, nothing refused
    assert extract.flow_params(config.extract)["weights"] == raft_small_file
