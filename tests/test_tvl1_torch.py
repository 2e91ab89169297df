"""TV-L1 in torch (``extract.flow = "tvl1_torch"``): its parts against OpenCV's, its flow against analytic motion
and against OpenCV's TV-L1 on the synthetic set's true motion, batching, the device, and the extract stage."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from hpcvid.config import ExtractConfig
from hpcvid.errors import ConfigError
from hpcvid.media.decode import read_video
from hpcvid.media.flow import TVL1_DEFAULTS, compute_flow, decode_flow, encode_flow, endpoint_error, to_gray
from test_flow import synthetic_clips  # noqa: F401 - the fixture: one decoded clip per class with its truth

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from hpcvid.media import tvl1_torch  # noqa: E402 - after the importorskip of torch

REDUCED = dict(TVL1_DEFAULTS)
"""The parameters every comparison runs at, on both sides: the pipeline's reduced TV-L1."""


@pytest.fixture(autouse=True)
def one_thread_each():
    """One OpenCV thread and one torch thread: the suite shares 2 cores, and it makes the sides comparable."""
    before = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    yield
    cv2.setNumThreads(before[0])
    torch.set_num_threads(before[1])


def opencv_tvl1(params: dict) -> "cv2.optflow.DualTVL1OpticalFlow":
    return cv2.optflow.DualTVL1OpticalFlow_create(
        tau=params["tau"], lambda_=params["lambda_"], theta=params["theta"], nscales=params["nscales"],
        warps=params["warps"], epsilon=params["epsilon"], innnerIterations=params["inner_iterations"],
        outerIterations=params["outer_iterations"], scaleStep=params["scale_step"],
        medianFiltering=params["median_filtering"])


def torch_tvl1(first: np.ndarray, second: np.ndarray, **params) -> np.ndarray:
    """One pair (or a batch of pairs) of uint8 gray frames through the torch TV-L1, as numpy."""
    batch = first.ndim == 2
    a, b = (torch.from_numpy(x[None] if batch else x) for x in (first, second))
    flow = tvl1_torch.tvl1_flow(a, b, **{**REDUCED, **params}).numpy()
    return flow[0] if batch else flow


# ----------------------------------------------------------------------------------- the parts
@pytest.mark.parametrize("height, width, step", [(64, 48, 0.5), (45, 47, 0.5), (112, 112, 0.8), (240, 320, 0.8)])
def test_pyramid_resize_is_opencvs_bilinear_resize(height, width, step) -> None:
    image = np.random.default_rng(0).uniform(0, 255, (height, width)).astype(np.float32)
    expected = cv2.resize(image, None, fx=step, fy=step, interpolation=cv2.INTER_LINEAR)
    h, w = expected.shape
    assert tvl1_torch.pyramid_sizes(height, width, 2, step)[1] == (h, w)
    rows, cols = tvl1_torch.resize_matrix(height, h, 1 / step), tvl1_torch.resize_matrix(width, w, 1 / step)
    np.testing.assert_allclose((rows @ torch.from_numpy(image) @ cols.T).numpy(), expected, atol=1e-3)
    back = cv2.resize(expected, (width, height), interpolation=cv2.INTER_LINEAR)  # the flow's way up
    rows, cols = tvl1_torch.resize_matrix(h, height, h / height), tvl1_torch.resize_matrix(w, width, w / width)
    np.testing.assert_allclose((rows @ torch.from_numpy(expected) @ cols.T).numpy(), back, atol=1e-3)


def test_pyramid_stops_before_a_side_under_16_pixels_like_opencv() -> None:
    assert tvl1_torch.pyramid_sizes(48, 48, 3, 0.5) == [(48, 48), (24, 24)]
    assert tvl1_torch.pyramid_sizes(224, 224, 5, 0.8) == [(224, 224), (179, 179), (143, 143), (114, 114), (91, 91)]


@pytest.mark.parametrize("size", [3, 5])
def test_median_filter_is_opencvs_median_blur(size) -> None:
    rng = np.random.default_rng(size)
    for image in (rng.normal(size=(37, 41)).astype(np.float32),
                  rng.integers(0, 3, (37, 41)).astype(np.float32)):  # many ties
        ours = tvl1_torch.median_filter(torch.from_numpy(image)[None, None], size)[0, 0].numpy()
        np.testing.assert_array_equal(ours, cv2.medianBlur(image, size))


def test_bad_parameters_are_refused_in_one_line() -> None:
    frames = torch.zeros(1, 32, 32, dtype=torch.uint8)
    for bad, match in (({"tau": 0}, "tau = 0 must be > 0"), ({"scale_step": 1.0}, "scale_step = 1.0 must be below 1"),
                       ({"median_filtering": 4}, "median_filtering = 4 must be odd"),
                       ({"warps": 0}, "warps = 0 must be at least 1")):
        with pytest.raises(ConfigError, match=match):
            tvl1_torch.tvl1_flow(frames, frames, **bad)
    with pytest.raises(ConfigError, match="unknown parameter"):
        compute_flow(np.zeros((2, 32, 32), np.uint8), "tvl1_torch", lamda=0.1)


# ----------------------------------------------------------------------------- analytic motion
def wave_texture(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """uint8 image of a sum of 24 random plane waves (periods >= 10 px), evaluated at any (x, y).

    Sampling the same continuous function at moved coordinates gives a second frame whose true motion is
    known exactly, with no interpolation error (only the uint8 rounding of both frames).
    """
    rng = np.random.default_rng(7)
    freqs, phases, amps = rng.uniform(-0.6, 0.6, (24, 2)), rng.uniform(0, 2 * np.pi, 24), rng.uniform(0.5, 1, 24)
    waves = sum(a * np.cos(fx * x + fy * y + p) for (fx, fy), p, a in zip(freqs, phases, amps))
    return np.rint(np.clip(128 + 40 * waves / np.sqrt((amps ** 2).sum() / 2), 0, 255)).astype(np.uint8)


SIDE = 64
GRID_Y, GRID_X = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)


def test_known_subpixel_translation() -> None:
    """The texture moves by (1.3, -0.7) px. Tolerance 0.1 px mean end-point error over the interior: OpenCV's
    TV-L1 scores 0.056 on this pair (the TV term shortens the flow by ~0.04 px), while a swapped axis or sign
    is >= 2 px off and a flow left at a coarser level's scale >= 0.3 px."""
    dx, dy = 1.3, -0.7
    first, second = wave_texture(GRID_X, GRID_Y), wave_texture(GRID_X - dx, GRID_Y - dy)
    flow = torch_tvl1(first, second)
    assert flow.shape == (SIDE, SIDE, 2) and flow.dtype == np.float32
    truth = np.broadcast_to(np.array([dx, dy], np.float32), flow.shape)
    interior = np.zeros((SIDE, SIDE), bool)
    interior[8:-8, 8:-8] = True  # pixels whose neighbourhood did not leave the frame
    ours, theirs = endpoint_error(flow, truth, interior), endpoint_error(opencv_tvl1(REDUCED).calc(first, second, None),
                                                                        truth, interior)
    assert ours < 0.1 and abs(ours - theirs) < 0.02


def test_known_small_rotation() -> None:
    """The texture turns 3 degrees about the image centre: flow(p) = R(p - c) + c - p, up to 1.25 px at the
    rim of the disc scored. Tolerance 0.1 px mean end-point error (OpenCV: 0.043, ours 0.029 here); zero
    flow scores 0.6 and the opposite turn 1.2."""
    angle, centre = np.deg2rad(3.0), (SIDE - 1) / 2
    cos, sin = np.cos(angle), np.sin(angle)
    px, py = GRID_X - centre, GRID_Y - centre
    first = wave_texture(GRID_X, GRID_Y)
    second = wave_texture(cos * px + sin * py + centre, -sin * px + cos * py + centre)  # the first, turned
    truth = np.stack([cos * px - sin * py - px, sin * px + cos * py - py], axis=-1).astype(np.float32)
    disc = px ** 2 + py ** 2 < (SIDE / 2 - 8) ** 2
    flow = torch_tvl1(first, second)
    assert endpoint_error(flow, truth, disc) < 0.1
    assert endpoint_error(-flow, truth, disc) > 0.5  # the test can tell the direction of the turn


# ------------------------------------------------------------------------ against OpenCV, batching
@pytest.fixture(scope="module")
def synthetic_pairs(synthetic_clips):
    """The first 4 frames (3 pairs) of one clip per class, gray, with their true motion and object mask."""
    return [(to_gray(frames[:4]), truth[:3], mask[:3]) for frames, truth, mask in synthetic_clips]


def test_endpoint_error_within_10_percent_of_opencv_tvl1(synthetic_pairs) -> None:
    """Mean end-point error on the moving objects of 18 synthetic pairs (6 motions), both at the pipeline's
    TV-L1 parameters: measured 0.99 x OpenCV's here; the issue's bound is 10 %."""
    ours, theirs, zero = [], [], []
    opencv = opencv_tvl1(REDUCED)
    for gray, truth, mask in synthetic_pairs:
        flow = torch_tvl1(gray[:-1], gray[1:])
        reference = np.stack([opencv.calc(gray[t], gray[t + 1], None) for t in range(len(gray) - 1)])
        ours.append(endpoint_error(flow, truth, mask))
        theirs.append(endpoint_error(reference, truth, mask))
        zero.append(endpoint_error(np.zeros_like(flow), truth, mask))
        assert np.abs(flow - reference).mean() < 0.05  # the same method, not only the same score
    assert abs(np.mean(ours) / np.mean(theirs) - 1) <= 0.10
    assert np.mean(ours) < 0.8 * np.mean(zero)


def test_a_batch_gives_exactly_the_flow_of_its_pairs_one_by_one(synthetic_pairs) -> None:
    """Pairs converge after different numbers of steps; a converged pair is frozen, not carried along."""
    gray = np.concatenate([g for g, _, _ in synthetic_pairs[:2]])  # a pair across clips: big motion, many steps
    batched = compute_flow(gray, "tvl1_torch", batch_size=16, device="cpu")
    single = compute_flow(gray, "tvl1_torch", batch_size=1, device="cpu")
    mixed = compute_flow(gray, "tvl1_torch", batch_size=3, device="cpu")
    assert batched.shape == (len(gray) - 1, 48, 48, 2)
    np.testing.assert_array_equal(batched, single)
    np.testing.assert_array_equal(batched, mixed)


def close_flows(a: np.ndarray, b: np.ndarray) -> bool:
    """Flows from the same steps with arithmetic that may differ in the last bits (fused multiply-adds, another
    summation order): a stopping decision may flip on such a bit, so they are close, not equal."""
    return bool(np.abs(a - b).mean() < 0.01 and np.abs(a - b).max() < 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible: the GPU path of tvl1_torch is not tested here")
def test_cuda_gives_the_cpu_flow(synthetic_pairs) -> None:
    gray = np.concatenate([g for g, _, _ in synthetic_pairs])
    cpu = compute_flow(gray, "tvl1_torch", device="cpu")
    gpu = compute_flow(gray, "tvl1_torch", device="cuda")
    assert close_flows(gpu, cpu)
    assert close_flows(compute_flow(gray, "tvl1_torch", device="cuda", compile=True), cpu)
    first = torch.from_numpy(gray[:-1]).cuda()
    assert tvl1_torch.tvl1_flow(first, torch.from_numpy(gray[1:]).cuda(), **REDUCED).device.type == "cuda"


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("gcc") or shutil.which("cc")), reason="torch.compile on the CPU needs a C compiler")
def test_the_compiled_step_gives_the_plain_steps_flow(synthetic_pairs) -> None:
    """torch.compile of the primal-dual step (meant for GPUs), checked where it can be: on the CPU, where
    compiling takes ~30 s."""
    gray = synthetic_pairs[0][0][:2]
    assert close_flows(compute_flow(gray, "tvl1_torch", device="cpu", compile=True),
                       compute_flow(gray, "tvl1_torch", device="cpu"))


def test_device_cuda_without_a_gpu_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        compute_flow(np.zeros((2, 32, 32), np.uint8), "tvl1_torch", device="cuda")


# ------------------------------------------------------------------------------- the extract stage
JOB = """\
[extract]
size = 32
backbone = "none"
flow = "tvl1_torch"
flow_storage = "{storage}"
device = "cpu"
"""


@pytest.mark.parametrize("storage", ["uint8", "float16"])
def test_run_extract_stores_tvl1_torch_flow_like_any_other(tiny_synthetic, tmp_path, storage) -> None:
    """`hpcvid run extract --flow tvl1_torch` on 6 clips: the shard's flow, read back by ShardReader, is
    compute_flow's on the stored frames' source, through the same encoding as every algorithm."""
    from extract_helpers import write_folder_manifest
    from hpcvid.cli import main
    from hpcvid.storage.shards import ShardReader

    work, job = tmp_path / "work", tmp_path / "job.toml"
    job.write_text(JOB.format(storage=storage))
    clips = sorted(tiny_synthetic.rglob("*.avi"))[::4]
    write_folder_manifest(tiny_synthetic, work, files=clips)
    assert main(["run", "extract", "--config", str(job), "--work", str(work), "--dataset", str(tiny_synthetic),
                 "--flow", "tvl1_torch"]) == 0
    record = json.loads((work / "extract" / "shard-0000-of-0001.json").read_text())
    assert record["n_videos"] == len(clips) and record["n_failed"] == 0
    assert record["config"]["extract"]["flow"] == "tvl1_torch"
    with ShardReader(work / "extract" / record["file"]) as reader:
        video_id = reader.video_ids()[0]
        stored = reader.video(video_id).flow
        source = tiny_synthetic / f"{video_id}.avi"
    frames = read_video(source, ExtractConfig(size=32)).frames
    expected = compute_flow(frames, "tvl1_torch", **{**TVL1_DEFAULTS, "device": "cpu"})
    data, attrs = encode_flow(expected, storage, 20.0)
    np.testing.assert_array_equal(stored, decode_flow(data, attrs))
    assert stored.shape == (len(frames) - 1, 32, 32, 2) and np.abs(stored).max() > 0.1
