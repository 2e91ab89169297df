"""The synthetic action dataset: small videos in UCF-101's layout, with true motion.

Why it is built this way:

* Classes = 2 appearances (shape + colour) x N motions. With the default 3 motions (expand, contract,
  rotate left) appearance alone reaches at most 1/3 of the classes; only a model that sees motion gets all.
  More classes add motions (rotate right, then translations, which pooled CNN features barely see: the
  class that shows what optical flow adds).
* No single frame carries a motion cue *at the middle frame*: for one appearance, the object's centre,
  size and orientation at frame ``T // 2`` are drawn from the same distribution for every motion, and the
  trajectory extends both ways from there. The *first* frame does leak size (a growing object starts
  small), so models that look at one frame must use the middle (or a random) frame.
* A textured, noisy background (fresh noise each frame) and a random-walk camera jitter (whole-frame
  integer shifts) mean no trivial pixel rule solves it, and flow must be camera-compensated.
* Objects are big (about 20-50 % of the frame side) and textured (the texture moves with them), so pooled
  CNN features change under expansion/rotation and optical flow is well posed inside the object.
* The true motion is written beside each video (``<stem>.motion.npz``), so optical flow can be *scored*.

Layout under OUT::

    classInd.txt                     "1 TriangleExpand"
    trainlist0{1,2,3}.txt            "TriangleExpand/v_TriangleExpand_g01_c01.avi 1"
    testlist0{1,2,3}.txt             "TriangleExpand/v_TriangleExpand_g01_c01.avi"
    <Class>/v_<Class>_gXX_cYY.avi    mpeg4, qscale 2, yuv420p, bit-exact
    <Class>/v_<Class>_gXX_cYY.motion.npz
    synth.json                       settings, classes, motions; "complete": true once everything is written

Motion file (``np.load``): ``flow`` float16 (T-1, H, W, 2), OpenCV's convention: ``flow[t][y, x] =
(dx, dy)`` moves pixel (x, y) of frame t (pixel centres at integer coordinates, x = column) to its
position in frame t+1; it covers the whole frame (background pixels move with the camera jitter, object
pixels with the object plus the jitter). ``mask`` bool (T-1, H, W): object pixels of frame t.
``centre`` float32 (T, 2) object centre (x, y) in frame coordinates incl. jitter; ``scale`` float32 (T,)
circumradius in pixels; ``angle`` float32 (T,) radians (counter-clockwise on screen); ``jitter`` int32
(T, 2) camera shift (x, y); ``label`` and ``motion`` (str) and ``appearance`` (str).
"""
from __future__ import annotations

import argparse
import logging
import math
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcvid.config import SynthConfig
from hpcvid.errors import ConfigError, DatasetError
from hpcvid.fileio import atomic_path, atomic_write_json, atomic_write_text, read_json, remove_stale_partials

log = logging.getLogger(__name__)

# 2: expand/contract change the size 2.5x (was 1.8x). A set written by another version is regenerated.
SYNTH_SCHEMA_VERSION = 2
RECORD_NAME = "synth.json"
SPLITS_WRITTEN = (1, 2, 3)

# Appearances: a convex polygon (unit circumradius, y down) and an RGB colour. Neither is rotationally
# symmetric below 180 degrees, so rotation is visible.
APPEARANCES: dict[str, tuple[tuple[tuple[float, float], ...], tuple[int, int, int]]] = {
    "Triangle": (((0.0, -1.0), (0.62, 0.78), (-0.62, 0.78)), (225, 45, 40)),
    "Bar": (((-0.92, -0.38), (0.92, -0.38), (0.92, 0.38), (-0.92, 0.38)), (40, 70, 230)),
}
# Motions in the order classes are added (classes = 2 x the first N). Rates are totals over one clip.
MOTIONS = ("Expand", "Contract", "RotateLeft", "RotateRight", "MoveRight", "MoveLeft", "MoveUp", "MoveDown")
# expand/contract: size ratio between last and first frame. At 1.8 the object's area changed 3.2x over a
# clip, too little for the pooled per-frame features an LSTM reads (CI-size LSTM 91-99 % over four seeds);
# at 2.5 (6.25x) the two weakest seeds went from 91.1 and 92.2 % to 98.9 % each.
SCALE_CHANGE = 2.5
ROTATION = math.pi          # rotate: radians over the clip
TRANSLATION = 0.2           # move: fraction of the frame side over the clip
RATE_SPREAD = 0.15          # each clip's rate is the nominal one times U(1 - s, 1 + s)
MID_RADIUS = (0.18, 0.24)   # circumradius at the middle frame, fraction of the frame's shorter side
MAX_JITTER = 3              # camera shift bound in pixels
NOISE_SIGMA = 3.0           # per-frame pixel noise (0-255 scale)


@dataclass(frozen=True)
class Trajectory:
    """Per-frame object parameters in frame coordinates (centre incl. jitter)."""

    centre: np.ndarray   # (T, 2) float64, x, y
    scale: np.ndarray    # (T,) circumradius in pixels
    angle: np.ndarray    # (T,) radians, counter-clockwise on screen
    jitter: np.ndarray   # (T, 2) int camera shift


def class_names(classes: int) -> list[str]:
    """Class names, appearance-major: classes 1..N/2 are the triangle's motions, then the bar's."""
    motions = motions_for(classes)
    return [f"{look}{motion}" for look in APPEARANCES for motion in motions]


def motions_for(classes: int) -> tuple[str, ...]:
    if classes % len(APPEARANCES) or classes < len(APPEARANCES):
        raise ConfigError(f"synth.classes = {classes}: must be a positive multiple of {len(APPEARANCES)} "
                          f"({len(APPEARANCES)} appearances x N motions)")
    count = classes // len(APPEARANCES)
    if count > len(MOTIONS):
        raise ConfigError(f"synth.classes = {classes}: at most {len(APPEARANCES) * len(MOTIONS)} classes "
                          f"({len(APPEARANCES)} appearances x {len(MOTIONS)} motions: {', '.join(MOTIONS)})")
    return MOTIONS[:count]


def parse_size(text: str) -> tuple[int, int]:
    """'112x96' -> (112, 96); both must be even (yuv420p)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"synth.size = {text!r}: use WIDTHxHEIGHT, e.g. 112x112") from None
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ConfigError(f"synth.size = {text!r}: width and height must be even and at least 16 "
                          "(the encoder's yuv420p needs even sides)")
    return width, height


def video_name(class_name: str, index: int) -> str:
    """UCF-101 naming: 4 clips per group, groups and clips counted from 1."""
    return f"v_{class_name}_g{index // 4 + 1:02d}_c{index % 4 + 1:02d}"


def motion_path(video: Path | str) -> Path:
    """The ground-truth file beside a video: ``X/v_..._c01.avi`` -> ``X/v_..._c01.motion.npz``."""
    video = Path(video)
    return video.with_name(video.stem + ".motion.npz")


def load_motion(video: Path | str) -> dict[str, np.ndarray]:
    """The stored motion of a synthetic video (see the module docstring for the arrays)."""
    with np.load(motion_path(video), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def held_out_indices(per_class: int, test_per_class: int, split: int) -> set[int]:
    """Which clip indices of a class are test clips in ``split``: a block that moves with the split."""
    start = ((split - 1) * test_per_class) % per_class
    return {(start + k) % per_class for k in range(test_per_class)}


# ------------------------------------------------------------------------------------------ motion
def make_trajectory(rng: np.random.Generator, motion: str, frames: int, width: int, height: int) -> Trajectory:
    """Draw the middle-frame state (same law for every motion), then extend it both ways in time."""
    side = min(width, height)
    mid = frames // 2
    steps = np.arange(frames, dtype=np.float64) - mid
    # The middle frame: the same random calls, in the same order, for every motion.
    radius_mid = rng.uniform(*MID_RADIUS) * side
    # The middle-frame object always fits; an expanding one may touch the border near the clip's ends.
    margin = MID_RADIUS[1] * side + TRANSLATION / 2 * side * (1 + RATE_SPREAD) + MAX_JITTER
    centre_mid = np.array([rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)])
    angle_mid = rng.uniform(0.0, 2 * math.pi)
    rate = rng.uniform(1 - RATE_SPREAD, 1 + RATE_SPREAD) / max(frames - 1, 1)

    scale = np.full(frames, radius_mid)
    angle = np.full(frames, angle_mid)
    centre = np.tile(centre_mid, (frames, 1))
    if motion in ("Expand", "Contract"):
        sign = 1.0 if motion == "Expand" else -1.0
        scale = radius_mid * np.exp(sign * math.log(SCALE_CHANGE) * rate * steps)
    elif motion in ("RotateLeft", "RotateRight"):
        sign = 1.0 if motion == "RotateLeft" else -1.0
        angle = angle_mid + sign * ROTATION * rate * steps
    else:
        direction = {"MoveRight": (1, 0), "MoveLeft": (-1, 0), "MoveUp": (0, -1), "MoveDown": (0, 1)}[motion]
        centre = centre_mid + np.outer(steps * TRANSLATION * side * rate, direction)
    jitter = _camera_jitter(rng, frames)
    return Trajectory(centre=centre + jitter, scale=scale, angle=angle, jitter=jitter)


def _camera_jitter(rng: np.random.Generator, frames: int) -> np.ndarray:
    """A bounded random walk of integer whole-frame shifts (a hand-held camera)."""
    steps = rng.choice([-1, 0, 0, 1], size=(frames, 2))
    walk = np.zeros((frames, 2), dtype=np.int64)
    for t in range(1, frames):
        walk[t] = np.clip(walk[t - 1] + steps[t], -MAX_JITTER, MAX_JITTER)
    return walk


# ----------------------------------------------------------------------------------------- drawing
def _local_coordinates(traj: Trajectory, t: int, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in the object's unit frame (circumradius 1, its own orientation)."""
    cos, sin = math.cos(traj.angle[t]), math.sin(traj.angle[t])
    dx, dy = (xs - traj.centre[t, 0]) / traj.scale[t], (ys - traj.centre[t, 1]) / traj.scale[t]
    # Inverse of the screen-counter-clockwise rotation used in true_flow.
    return cos * dx - sin * dy, sin * dx + cos * dy


def _coverage(local: tuple[np.ndarray, np.ndarray], scale: float, polygon: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from the signed distance (in pixels) to a convex polygon."""
    u, v = local
    distance = np.full(u.shape, -np.inf)
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0)):
        edge = np.array([x1 - x0, y1 - y0])
        normal = np.array([edge[1], -edge[0]]) / np.hypot(*edge)
        # Outward normal for a clockwise-on-screen (y down) vertex order; flip if it points inward.
        if normal @ (np.array([x0, y0]) - polygon.mean(axis=0)) < 0:
            normal = -normal
        distance = np.maximum(distance, (u - x0) * normal[0] + (v - y0) * normal[1])
    return np.clip(0.5 - distance * scale, 0.0, 1.0)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth, low-saturation texture, MAX_JITTER pixels larger on every side (float32, 0-255)."""
    import cv2

    big_w, big_h = width + 2 * MAX_JITTER, height + 2 * MAX_JITTER
    texture = np.zeros((big_h, big_w), dtype=np.float32)
    for cells, weight in ((4, 45.0), (12, 25.0), (40, 12.0)):
        coarse = rng.standard_normal((cells, cells)).astype(np.float32)
        texture += weight * cv2.resize(coarse, (big_w, big_h), interpolation=cv2.INTER_CUBIC)
    base = rng.uniform(100, 150)
    tint = rng.uniform(-10, 10, size=3).astype(np.float32)
    return np.clip(base + texture[..., None] + tint, 20, 235).astype(np.float32)


def _object_texture(local: tuple[np.ndarray, np.ndarray], phase: np.ndarray) -> np.ndarray:
    """Brightness pattern fixed to the object (it scales and turns with it), in [0.6, 1.0]."""
    u, v = local
    pattern = np.sin(5.0 * u + phase[0]) * np.sin(4.0 * v + phase[1]) + 0.5 * np.sin(9.0 * (u + v) + phase[2])
    return 0.8 + 0.13 * pattern


def _object_box(traj: Trajectory, t: int, width: int, height: int) -> tuple[slice, slice]:
    """Rows and columns that can hold object pixels in frame t (the circumscribed circle + 2 px)."""
    reach = traj.scale[t] + 2
    x0, x1 = (int(np.clip(math.floor(traj.centre[t, 0] + k * reach), 0, width)) for k in (-1, 1))
    y0, y1 = (int(np.clip(math.floor(traj.centre[t, 1] + k * reach), 0, height)) for k in (-1, 1))
    return slice(y0, y1 + 1), slice(x0, x1 + 1)


def render_clip(rng: np.random.Generator, appearance: str, traj: Trajectory, width: int, height: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W, 3) uint8 frames and the (T, H, W) bool object mask (coverage > 0.5)."""
    polygon = np.array(APPEARANCES[appearance][0])
    colour = np.array(APPEARANCES[appearance][1], dtype=np.float32)
    background = _background(rng, width, height)
    phase = rng.uniform(0, 2 * math.pi, size=3)
    frames = len(traj.scale)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    masks = np.zeros((frames, height, width), dtype=bool)
    for t in range(frames):
        # The camera moves by +jitter: the scene (background) appears shifted by +jitter.
        jx, jy = traj.jitter[t]
        frame = background[MAX_JITTER - jy:MAX_JITTER - jy + height, MAX_JITTER - jx:MAX_JITTER - jx + width].copy()
        box = _object_box(traj, t, width, height)
        local = _local_coordinates(traj, t, xs[box], ys[box])
        alpha = _coverage(local, traj.scale[t], polygon)[..., None].astype(np.float32)
        shade = _object_texture(local, phase)[..., None].astype(np.float32) * colour
        frame[box] = frame[box] * (1 - alpha) + shade * alpha
        frame += rng.standard_normal(frame.shape, dtype=np.float32) * NOISE_SIGMA
        video[t] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
        masks[t][box] = alpha[..., 0] > 0.5
    return video, masks


def clip_flow(traj: Trajectory, masks: np.ndarray, width: int, height: int) -> np.ndarray:
    """True flow for all pixels: object pixels (mask of frame t) follow the object, the rest the camera."""
    frames = len(traj.scale)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    flow = np.empty((frames - 1, height, width, 2), dtype=np.float32)
    for t in range(frames - 1):
        ratio = traj.scale[t + 1] / traj.scale[t]
        turn = traj.angle[t + 1] - traj.angle[t]
        cos, sin = math.cos(turn), math.sin(turn)
        dx, dy = xs - traj.centre[t, 0], ys - traj.centre[t, 1]
        # Screen counter-clockwise by `turn` with y pointing down.
        new_x = traj.centre[t + 1, 0] + ratio * (cos * dx + sin * dy)
        new_y = traj.centre[t + 1, 1] + ratio * (-sin * dx + cos * dy)
        camera = (traj.jitter[t + 1] - traj.jitter[t]).astype(np.float64)
        flow[t, ..., 0] = np.where(masks[t], new_x - xs, camera[0])
        flow[t, ..., 1] = np.where(masks[t], new_y - ys, camera[1])
    return flow


# ---------------------------------------------------------------------------------------- encoding
def encode_avi(path: Path, video: np.ndarray, fps: float) -> None:
    """mpeg4 in AVI at qscale 2 (near-lossless, so flow can be scored), bit-exact, written atomically."""
    import imageio_ffmpeg

    height, width = video.shape[1:3]
    with atomic_path(path) as temporary:
        writer = imageio_ffmpeg.write_frames(
            str(temporary), (width, height), fps=fps, codec="mpeg4", quality=None, macro_block_size=1,
            ffmpeg_log_level="error",
            output_params=["-qscale:v", "2", "-threads", "1", "-fflags", "+bitexact", "-flags:v", "+bitexact",
                           "-f", "avi"],
        )
        writer.send(None)
        writer.send(np.ascontiguousarray(video).tobytes())  # one write: all frames back to back
        writer.close()


def save_motion(path: Path, traj: Trajectory, flow: np.ndarray, masks: np.ndarray, meta: dict[str, str]) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez_compressed(
                handle, flow=flow.astype(np.float16), mask=masks[:-1],
                centre=traj.centre.astype(np.float32), scale=traj.scale.astype(np.float32),
                angle=traj.angle.astype(np.float32), jitter=traj.jitter.astype(np.int32),
                **{key: np.array(value) for key, value in meta.items()},
            )


# --------------------------------------------------------------------------------------- the dataset
def _record(config: SynthConfig) -> dict[str, Any]:
    return {"schema_version": SYNTH_SCHEMA_VERSION, "config": {
        "classes": config.classes, "per_class": config.per_class, "test_per_class": config.test_per_class,
        "frames": config.frames, "size": config.size, "fps": config.fps, "seed": config.seed}}


def render_class_clip(config: SynthConfig, label: int, index: int) -> tuple[np.ndarray, Trajectory, np.ndarray]:
    """Frames, trajectory and object masks of clip ``index`` of class ``label`` (its own random stream)."""
    width, height = parse_size(config.size)
    name = class_names(config.classes)[label]
    motions = motions_for(config.classes)
    appearance = next(look for look in APPEARANCES if name.startswith(look))
    rng = np.random.default_rng([config.seed, label, index])
    traj = make_trajectory(rng, motions[label % len(motions)], config.frames, width, height)
    video, masks = render_clip(rng, appearance, traj, width, height)
    return video, traj, masks


def make_clip(out: Path, config: SynthConfig, label: int, name: str, index: int) -> Path:
    """Render, encode and save the ground truth of one clip; return the video's path."""
    width, height = parse_size(config.size)
    motions = motions_for(config.classes)
    motion = motions[label % len(motions)]
    appearance = next(look for look in APPEARANCES if name.startswith(look))
    video, traj, masks = render_class_clip(config, label, index)
    path = out / name / f"{video_name(name, index)}.avi"
    encode_avi(path, video, config.fps)
    flow = clip_flow(traj, masks, width, height)
    save_motion(motion_path(path), traj, flow, masks, {"class_name": name, "motion": motion, "appearance": appearance})
    return path


def make_held_out(out: Path | str, config: SynthConfig, *, sequence: tuple[int, int] = (0, -1),
                  clips_per_part: int = 2) -> dict[str, Any]:
    """New clips of the set ``config`` describes that belong to no split, for trying a trained model.

    One clip per class (``OUT/<class>/held_out_<class>.avi``, drawn with clip indices past
    ``per_class``, so no split holds them) and one long clip of two classes one after the other
    (``OUT/sequence_<A>_then_<B>.avi``: ``clips_per_part`` clips of class ``sequence[0]``, then as many of
    ``sequence[1]``), whose change of class is at frame ``clips_per_part * frames``. Returns and writes
    (``OUT/held_out.json``) what each file holds.
    """
    out = Path(out)
    names = class_names(config.classes)
    first, second = (names[i] for i in sequence)
    labels = [names.index(first), names.index(second)]
    files: dict[str, Any] = {}
    for label, name in enumerate(names):
        path = out / name / f"held_out_{name}.avi"
        encode_avi(path, render_class_clip(config, label, config.per_class)[0], config.fps)
        files[str(path.relative_to(out))] = {"class": name}
    parts = [render_class_clip(config, label, config.per_class + 1 + k)[0]
             for label in labels for k in range(clips_per_part)]
    path = out / f"sequence_{first}_then_{second}.avi"
    encode_avi(path, np.concatenate(parts), config.fps)
    change = clips_per_part * config.frames
    files[path.name] = {"segments": [{"class": first, "start_frame": 0, "stop_frame": change},
                                     {"class": second, "start_frame": change, "stop_frame": 2 * change}]}
    record = {"fps": config.fps, "frames_per_clip": config.frames, "files": files}
    atomic_write_json(out / "held_out.json", record)
    return record


def generate(out_dir: Path | str, config: SynthConfig | None = None, *, progress: bool = False,
             workers: int = 3) -> Path:
    """Write the dataset under ``out_dir`` and return it. Reruns with the same settings do nothing.

    Each clip has its own random stream (seed, class, clip), so a clip does not depend on the others and
    the same seed gives the same decoded frames.
    """
    config = config or SynthConfig()
    out = Path(out_dir)
    parse_size(config.size)  # fail before any work
    names = class_names(config.classes)
    motions = motions_for(config.classes)
    if config.frames < 2:
        raise ConfigError(f"synth.frames = {config.frames}: a clip needs at least 2 frames to move")
    if not 0 <= config.test_per_class < config.per_class:
        raise ConfigError("synth.test_per_class must be smaller than synth.per_class")
    if _prepare_folder(out, config):
        log.info("%s is complete (same settings): nothing to do", out)
        return out

    clips = [(label, name, index) for label, name in enumerate(names) for index in range(config.per_class)]
    # Threads overlap the ffmpeg encoder processes (start-up, pipes) with numpy rendering; each clip has
    # its own random stream, so the order in which they finish does not matter.
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [pool.submit(make_clip, out, config, label, name, index) for label, name, index in clips]
        finished = as_completed(futures)
        if progress:
            from tqdm import tqdm

            finished = tqdm(finished, total=len(futures), desc="synth", unit="clip")
        for future in finished:
            future.result()
    finally:  # on an error or Ctrl-C, clips not started are dropped; the record still says "not complete"
        pool.shutdown(wait=True, cancel_futures=True)
    _write_split_files(out, names, config)
    atomic_write_json(out / RECORD_NAME, {**_record(config), "classes": names, "motions": list(motions),
                                          "middle_frame": config.frames // 2, "complete": True})
    return out


def _prepare_folder(out: Path, config: SynthConfig) -> bool:
    """True when ``out`` already holds this very set (same settings, same schema version: the clips a
    version draws may differ from another's). Otherwise clear an older or unfinished synthetic set
    there (only the files it makes), mark the folder as in progress, and return False. A non-empty folder
    that is not a synthetic set is refused, so a mistyped OUT never mixes clips into real data."""
    record_path = out / RECORD_NAME
    if record_path.is_file():
        old = read_json(record_path)
        wanted = _record(config)
        if old.get("complete") and all(old.get(key) == value for key, value in wanted.items()):
            return True
        _remove_generated(out, old.get("classes", []))
    elif out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out} is not empty and holds no synthetic dataset (no {RECORD_NAME}): "
                           "give hpcvid synth a new or empty folder")
    atomic_write_json(record_path, {**_record(config), "classes": class_names(config.classes), "complete": False})
    return False


def _remove_generated(out: Path, classes: list[str]) -> None:
    """Delete what an earlier run made (clips, motion files, partials, split files), nothing else."""
    for name in classes:
        folder = out / name
        if not folder.is_dir():
            continue
        remove_stale_partials(folder)
        for path in folder.glob(f"v_{name}_g*_c*"):
            if path.name.endswith((".avi", ".motion.npz")):
                path.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()
    for pattern in ("classInd.txt", "trainlist0?.txt", "testlist0?.txt"):
        for path in out.glob(pattern):
            path.unlink()


def _write_split_files(out: Path, names: list[str], config: SynthConfig) -> None:
    atomic_write_text(out / "classInd.txt", "".join(f"{i + 1} {name}\n" for i, name in enumerate(names)))
    for split in SPLITS_WRITTEN:
        test = held_out_indices(config.per_class, config.test_per_class, split)
        train_lines, test_lines = [], []
        for label, name in enumerate(names):
            for index in range(config.per_class):
                relative = f"{name}/{video_name(name, index)}.avi"
                if index in test:
                    test_lines.append(f"{relative}\n")
                else:
                    train_lines.append(f"{relative} {label + 1}\n")
        atomic_write_text(out / f"trainlist{split:02d}.txt", "".join(train_lines))
        atomic_write_text(out / f"testlist{split:02d}.txt", "".join(test_lines))


# --------------------------------------------------------------------------------------------- CLI
def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", nargs="?",
                        help="output folder; default: the job file's dataset.root (or data/synthetic)")
    parser.add_argument("--config", metavar="JOB.toml", help="job file whose [synth] section is read")
    parser.add_argument("--classes", type=int, help="number of classes: 2 appearances x N motions (default 6)")
    parser.add_argument("--per-class", type=int, help="videos per class, train + test (default 20)")
    parser.add_argument("--test-per-class", type=int, help="test videos per class (default 6)")
    parser.add_argument("--frames", type=int, help="frames per video (default 32)")
    parser.add_argument("--size", metavar="WxH", help="frame size, even sides (default 112x112)")
    parser.add_argument("--fps", type=float, help="frames per second written in the container (default 25)")
    parser.add_argument("--seed", type=int, help="random seed; the same seed gives the same frames (default 0)")


def main(args: argparse.Namespace) -> int:
    from hpcvid.cli import config_from_args

    keys = ("classes", "per_class", "test_per_class", "frames", "size", "fps", "seed")
    config = config_from_args(args, {f"synth.{key}": getattr(args, key) for key in keys})
    out = Path(args.out or config.dataset.root or "data/synthetic")
    generate(out, config.synth, progress=True)
    synth = config.synth
    print(f"synth: {out}: {synth.classes} classes x {synth.per_class} videos "
          f"({synth.test_per_class} test per class), {synth.frames} frames {synth.size} at {synth.fps:g} fps, "
          f"seed {synth.seed}; motion ground truth in <video>.motion.npz")
    return 0
