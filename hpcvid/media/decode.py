"""Decoding and frame sampling: one video file -> the sampled, resized RGB frames.

Two decoders give the same frames (up to colour-conversion rounding):

* ``pyav`` — the fast path. PyAV decodes in-process (no pipe), frames that sampling skips are decoded
  (the codec needs them) but never converted to RGB, and kept frames are resized with
  ``cv2.resize(INTER_LINEAR)``. measured here, this reaches raw ``ffmpeg -f null`` speed; INTER_AREA was
  2.7x slower at 320 -> 224.
* ``imageio`` — imageio-ffmpeg's bundled ffmpeg binary piping raw RGB; slower (pipe overhead) but it
  works wherever a static ffmpeg runs.

Sampling (``ExtractConfig.sampling``) picks source frame indices:

* ``all`` — every frame; ``every`` — frames 0, k, 2k, ...;
* ``fps`` — the first frame at or after each tick of a ``target_fps`` clock (frame i is kept when
  ``floor(i * target / fps)`` steps up); a target at or above the source rate keeps every frame;
* ``count`` — N frames at the centres of N equal segments (TSN-style, ``floor((k + 0.5) * T / N)``):
  N = 1 gives the middle frame, never the first (a growing object's first frame is small: its size leaks the motion);
* ``named`` — the frames of :func:`named_frame_indices` listed in ``named_frames``.

``max_frames`` then caps the kept frames to the first ``max_frames`` (decoding stops there).
:func:`stream_video` yields the kept, resized frames in chunks of a given number of frames, so memory
holds one chunk however long or large the source is; :func:`read_video` joins them into one array.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from hpcvid.config import ExtractConfig
from hpcvid.errors import ConfigError, VideoError

log = logging.getLogger(__name__)

NAMED_POSITIONS: dict[str, float] = {
    "first": 0.0, "quarter": 0.25, "middle": 0.5, "three_quarter": 0.75, "last": 1.0,
}
MIN_SIDE = 16
"""Smallest source width/height accepted: below it a frame carries no usable appearance or motion."""
MAX_RAW_BYTES = 8 << 30
"""Refuse ``resize = none`` outputs larger than this (a huge video would otherwise exhaust memory)."""
IMAGE_FORMATS = ("image2", "gif", "webp", "apng")
"""Container formats that hold still images; ffmpeg opens them, but they are not videos."""
Convert = Callable[..., np.ndarray]
"""``convert(size, out=None)``: a decoded frame as RGB at ``size`` = (width, height), into ``out`` if given.
Made only for the frames sampling keeps."""


@dataclass(frozen=True)
class DecodedVideo:
    """The kept frames of one video and where they came from.

    ``width``/``height`` are the *source* frame size; ``frames.shape[1:3]`` is the resized size.
    ``total_frames`` is the number of frames in the source (counted by decoding to the end when the
    sampling did so, otherwise the container's count).
    """

    frames: np.ndarray  # uint8 (T, H, W, 3) RGB
    indices: np.ndarray  # int64 (T,) source frame index of each kept frame
    fps: float
    total_frames: int
    width: int
    height: int

    def __len__(self) -> int:
        return int(self.frames.shape[0])


@dataclass(frozen=True)
class StreamInfo:
    """What the container says before decoding (``frames`` may be 0 when unknown)."""

    fps: float
    frames: int
    width: int
    height: int
    sample_aspect: float = 1.0
    pixel_format: str = ""


# ------------------------------------------------------------------------------------------ sampling
def named_frame_indices(total: int) -> dict[str, int]:
    """first, quarter, middle, three_quarter and last frame of a ``total``-frame video.

    Position p maps to ``round_half_up(p * (total - 1))``; a 1-frame video gives 0 for every name.
    """
    if total < 1:
        raise ValueError(f"a video needs at least one frame, got total={total}")
    return {name: int(math.floor(p * (total - 1) + 0.5)) for name, p in NAMED_POSITIONS.items()}


def count_indices(total: int, count: int) -> np.ndarray:
    """``count`` frames at the centres of ``count`` equal segments of ``total`` frames (unique, sorted)."""
    if count >= total:
        return np.arange(total, dtype=np.int64)
    centres = np.floor((np.arange(count) + 0.5) * total / count).astype(np.int64)
    return np.unique(np.clip(centres, 0, total - 1))


def fps_keep(index: int, source_fps: float, target_fps: float) -> bool:
    """Keep frame ``index`` when it is the first one at or after a tick of the target clock."""
    if target_fps >= source_fps:
        return True
    ratio = target_fps / source_fps
    eps = 1e-9  # i * ratio lands on whole numbers exactly in theory; guard float rounding
    return index == 0 or math.floor(index * ratio + eps) != math.floor((index - 1) * ratio + eps)


def sample_indices(total: int, cfg: ExtractConfig, fps: float) -> np.ndarray:
    """All kept source indices of a ``total``-frame video, capped by ``max_frames`` (for literal tests)."""
    selector = make_selector(cfg, fps, total)
    kept = [i for i in range(total) if selector.keep(i)]
    return np.asarray(kept[: cfg.max_frames] if cfg.max_frames else kept, dtype=np.int64)


@dataclass(frozen=True)
class Selector:
    """Decides per source index whether it is kept; ``last`` = no later index is kept (stop decoding)."""

    keep: Callable[[int], bool]
    last: int | None = None  # None: keep deciding until the video ends
    needs_total: bool = False


def make_selector(cfg: ExtractConfig, fps: float, total: int | None) -> Selector:
    """The selector for ``cfg.sampling``; ``count`` and ``named`` need ``total`` (the frame count)."""
    if cfg.sampling == "all":
        return Selector(lambda i: True)
    if cfg.sampling == "every":
        return Selector(lambda i: i % cfg.every == 0)
    if cfg.sampling == "fps":
        if not fps or fps <= 0:
            raise VideoError("its frame rate is unknown, so sampling = 'fps' cannot be applied; use "
                             "sampling = 'every' or 'count'")
        return Selector(lambda i: fps_keep(i, fps, cfg.target_fps))
    if cfg.sampling in ("count", "named"):
        if total is None:
            return Selector(lambda i: False, needs_total=True)
        if cfg.sampling == "count":
            wanted = count_indices(total, cfg.count)
        else:
            names = named_frame_indices(total)
            unknown = [n for n in cfg.named_frames if n not in names]
            if unknown:
                raise ConfigError(f"extract.named_frames: unknown name(s) {unknown}; choose from {list(names)}")
            wanted = np.unique([names[n] for n in cfg.named_frames])
        wanted_set = frozenset(int(i) for i in wanted)
        return Selector(wanted_set.__contains__, last=max(wanted_set), needs_total=True)
    raise ConfigError(f"extract.sampling = {cfg.sampling!r} is not valid; choose all, every, fps, count, named")


# ------------------------------------------------------------------------------------------- resizing
def output_size(width: int, height: int, cfg: ExtractConfig) -> tuple[int, int]:
    """(width, height) of the kept frames.

    Sizes are in stored pixels: a non-square sample aspect ratio is recorded (:class:`StreamInfo`) but
    not undone, so both decoders give the same frames (imageio-ffmpeg does not report it).
    """
    if cfg.resize == "square":
        return cfg.size, cfg.size
    if cfg.resize == "none":
        return width, height
    scale = cfg.size / min(width, height)
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB frame to ``size`` = (width, height) with bilinear interpolation (the fast choice)."""
    import cv2

    if frame.shape[1] == size[0] and frame.shape[0] == size[1]:
        return frame
    return cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR)


# ------------------------------------------------------------------------------------------ decoders
def i420_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray, size: tuple[int, int],
                out: np.ndarray | None = None) -> np.ndarray:
    """4:2:0 planes (limited-range BT.601, what mpeg4/h264 store) -> RGB uint8 (height, width, 3).

    Why resize first: a swscale conversion to RGB (``to_ndarray(format="rgb24")``) ran at ~1,400 frames/s
    at 320x240 here, a third of raw decode speed. Resizing the planes first — Y to the output size,
    U and V to half of it, ``INTER_LINEAR`` — and converting afterwards with
    ``cv2.cvtColor(COLOR_YUV2RGB_I420)`` converts 5-10x fewer pixels. Both decoders use this, so they
    give identical frames. Needs an even output size (callers fall back to RGB + resize otherwise).
    ``out``: a (height, width, 3) uint8 array to convert into (a row of a chunk), else a new one.
    """
    import cv2

    width, height = size
    i420 = np.empty((height * 3 // 2, width), np.uint8)  # Y, then U and V (H/2 x W/2 each), row-packed
    chroma = (width // 2, height // 2)
    if y.shape == (height, width):
        i420[:height] = y
    else:
        cv2.resize(y, (width, height), dst=i420[:height], interpolation=cv2.INTER_LINEAR)
    flat = i420.reshape(-1)
    n = chroma[0] * chroma[1]
    for start, plane in ((height * width, u), (height * width + n, v)):
        target = flat[start:start + n].reshape(chroma[1], chroma[0])
        if plane.shape == target.shape:
            target[...] = plane
        else:
            cv2.resize(plane, chroma, dst=target, interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420, dst=out)


def pyav_frame_to_rgb(frame, size: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """A decoded PyAV frame -> RGB uint8 (height, width, 3) at ``size`` = (width, height), into ``out`` if given.

    Limited-range 4:2:0 (``yuv420p``) of even size goes through :func:`i420_to_rgb`; anything else
    (4:4:4, full-range ``yuvj420p`` MJPEG, RGB, odd sizes) takes swscale's RGB + ``cv2.resize``, exactly
    like the imageio decoder, so both decoders still agree.
    """
    width, height = size
    if frame.width % 2 or frame.height % 2 or frame.format.name != "yuv420p":
        return _into(resize_frame(frame.to_ndarray(format="rgb24"), size), out)
    y, u, v = (_plane_view(plane) for plane in frame.planes)
    if width % 2 or height % 2:  # convert at the source size, then resize the RGB
        return _into(resize_frame(i420_to_rgb(y, u, v, (frame.width, frame.height)), size), out)
    return i420_to_rgb(y, u, v, size, out)


def _into(frame: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return frame
    out[...] = frame
    return out


def _plane_view(plane) -> np.ndarray:
    """A zero-copy (height, width) view of a PyAV frame plane (rows may be padded to ``line_size``)."""
    rows = np.frombuffer(plane, np.uint8, count=plane.line_size * plane.height)
    return rows.reshape(plane.height, plane.line_size)[:, :plane.width]


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoError(f"{path} does not exist")
    if path.is_dir():
        raise VideoError(f"{path} is a folder, not a video file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path} is empty (0 bytes): re-copy or re-download it")


def _check_size(path: Path, width: int, height: int) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise VideoError(f"{path}: frame size {width}x{height} is too small (minimum {MIN_SIDE} px per side)")


def _one_line(error: BaseException) -> str:
    reason = getattr(error, "strerror", None)  # av.FFmpegError: the reason without the repeated path
    if isinstance(reason, str) and reason:
        return reason
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _open_pyav(path: Path, threads: int):
    """Open ``path`` with PyAV; return (container, video stream, StreamInfo) or raise VideoError."""
    import av

    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.FFmpegError as exc:
        raise VideoError(f"{path} is not a readable video (ffmpeg: {_one_line(exc)})") from exc
    try:
        format_name = container.format.name or ""
        if any(part in IMAGE_FORMATS or part.endswith("_pipe") for part in format_name.split(",")):
            raise VideoError(f"{path} is an image ({format_name}), not a video")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoError(f"{path} has no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        stream.thread_count = threads
        stream.thread_type = "AUTO" if threads > 1 else "SLICE"
        ctx = stream.codec_context
        rate = stream.guessed_rate or stream.average_rate or stream.base_rate
        sar = ctx.sample_aspect_ratio
        info = StreamInfo(
            fps=float(rate) if rate else 0.0,
            frames=int(stream.frames or 0),
            width=int(ctx.width), height=int(ctx.height),
            sample_aspect=float(sar) if sar else 1.0,
            pixel_format=str(getattr(ctx, "pix_fmt", "") or ""),
        )
        if info.width == 0 or info.height == 0:
            raise VideoError(f"{path}: the video stream has no frame size (corrupt header?)")
        _check_size(path, info.width, info.height)
        return container, stream, info
    except BaseException:
        container.close()
        raise


def count_packets(path: Path | str) -> int:
    """Frames in the first video stream, counted by demuxing (no decoding): cheap and exact for
    ordinary files; used when ``count``/``named`` sampling needs the total before decoding."""
    import av

    with av.open(str(path), metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def _pyav_source(path: Path, cfg: ExtractConfig) -> tuple[StreamInfo, Iterator[tuple[int, Convert]]]:
    """(info, iterator of (index, convert)) where ``convert()`` makes the RGB array only when kept."""
    import av

    container, stream, info = _open_pyav(path, cfg.decoder_threads)

    def frames() -> Iterator[tuple[int, Convert]]:
        index = 0
        try:
            for frame in container.decode(stream):
                yield index, (lambda size, out=None, f=frame: pyav_frame_to_rgb(f, size, out))
                index += 1
        except av.FFmpegError as exc:
            if index == 0:
                raise VideoError(f"{path} has no decodable frame (ffmpeg: {_one_line(exc)})") from exc
            raise VideoError(f"{path} is truncated or corrupt: decoding failed after frame {index} "
                             f"(ffmpeg: {_one_line(exc)})") from exc
        finally:
            container.close()

    return info, _Source(frames(), container.close)


def _start_imageio(path: Path, pix_fmt: str, threads: list[str]):
    """Start imageio-ffmpeg's reader; (generator, metadata) or a VideoError naming the file."""
    import imageio_ffmpeg

    bits = {"yuv420p": 12, "rgb24": 24}[pix_fmt]
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt=pix_fmt, bits_per_pixel=bits, input_params=threads)
    try:
        return reader, next(reader)
    except (OSError, RuntimeError, StopIteration) as exc:
        reader.close()
        text = _one_line(exc)
        if "no video stream" in text.lower() or "could not find" in text.lower():
            raise VideoError(f"{path} has no video stream (ffmpeg: {text})") from exc
        raise VideoError(f"{path} is not a readable video (ffmpeg: {text})") from exc


def _imageio_source(path: Path, cfg: ExtractConfig) -> tuple[StreamInfo, Iterator[tuple[int, Convert]]]:
    """The portable decoder: imageio-ffmpeg's ffmpeg binary, raw 4:2:0 (or RGB) frames over a pipe."""
    threads = ["-threads", str(cfg.decoder_threads)]
    declared = _declared_info(path)  # PyAV's clear reasons (no video stream, image, too small) first
    source_format = declared.pixel_format if declared else "yuv420p"
    reader, meta = _start_imageio(path, "yuv420p" if source_format == "yuv420p" else "rgb24", threads)
    width, height = (int(v) for v in meta["size"])
    planar = width % 2 == 0 and height % 2 == 0 and source_format == "yuv420p"
    if source_format == "yuv420p" and not planar:  # odd 4:2:0 has rounded chroma planes: take RGB
        reader.close()
        reader, meta = _start_imageio(path, "rgb24", threads)
    codec = str(meta.get("codec", ""))
    if any(c in codec for c in ("png", "mjpeg", "jpeg", "bmp", "tiff", "webp", "gif")) and \
            float(meta.get("duration") or 0) == 0:
        reader.close()
        raise VideoError(f"{path} is an image ({codec}), not a video")
    try:
        _check_size(path, width, height)
    except VideoError:
        reader.close()
        raise
    fps = declared.fps if declared and declared.fps else float(meta.get("fps") or 0.0)  # exact 30000/1001
    info = StreamInfo(fps=fps, frames=declared.frames if declared else 0,
                     width=width, height=height, sample_aspect=declared.sample_aspect if declared else 1.0)
    luma = width * height
    frame_bytes = luma * 3 // 2 if planar else luma * 3

    def convert(raw: bytes, size: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
        data = np.frombuffer(raw, np.uint8)
        if not planar:
            return _into(resize_frame(data.reshape(height, width, 3), size), out)
        if size[0] % 2 or size[1] % 2:
            import cv2

            i420 = data.reshape(height * 3 // 2, width)
            return _into(resize_frame(cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420), size), out)
        quarter = luma // 4
        chroma = (height // 2, width // 2)
        return i420_to_rgb(data[:luma].reshape(height, width), data[luma:luma + quarter].reshape(chroma),
                           data[luma + quarter:].reshape(chroma), size, out)

    def frames() -> Iterator[tuple[int, Convert]]:
        index = 0
        try:
            for raw in reader:
                if len(raw) != frame_bytes:
                    break
                yield index, (lambda size, out=None, r=raw: convert(r, size, out))
                index += 1
        except (OSError, RuntimeError) as exc:
            raise VideoError(f"{path} is truncated or corrupt after frame {index} ({_one_line(exc)})") from exc
        finally:
            reader.close()
        if index == 0:
            raise VideoError(f"{path} has no decodable frame")

    return info, _Source(frames(), reader.close)


def _declared_info(path: Path) -> StreamInfo | None:
    """The container's facts via PyAV when it is installed (it is a dependency; imageio works without)."""
    try:
        import av  # noqa: F401
    except ImportError:
        return None
    container, _stream, info = _open_pyav(path, 1)
    container.close()
    return info


class _Source:
    """A frame iterator that releases its decoder on close(), even when it was never started."""

    def __init__(self, iterator: Iterator, release: Callable[[], None]) -> None:
        self._iterator = iterator
        self._release = release

    def __iter__(self) -> Iterator:
        return self._iterator

    def close(self) -> None:
        try:
            self._iterator.close()
        finally:
            self._release()


_SOURCES = {"pyav": _pyav_source, "imageio": _imageio_source}


def _total_for_selection(path: Path, cfg: ExtractConfig, info: StreamInfo) -> int:
    if cfg.decoder == "pyav":
        return count_packets(path)
    import imageio_ffmpeg

    try:
        return int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])
    except (OSError, RuntimeError) as exc:
        raise VideoError(f"{path}: cannot count its frames ({_one_line(exc)})") from exc


# ------------------------------------------------------------------------------------------ reading
READ_CHUNK_FRAMES = 64
"""Chunk of :func:`read_video`, which joins its chunks anyway: any value gives the same frames."""


@dataclass(frozen=True)
class FrameChunk:
    """Consecutive kept frames of a video: uint8 (n, H, W, 3) RGB and the source frame number of each."""

    frames: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.frames.shape[0])


@dataclass(frozen=True)
class Restart:
    """Sampling chose its frames from a frame count that decoding fell short of: everything streamed so far
    is void, and the video streams again, choosing from ``total`` (the frames that really decode)."""

    total: int


@dataclass(frozen=True)
class VideoFacts:
    """What is known once a video has streamed to its end: the last item of :func:`stream_video`."""

    fps: float
    total_frames: int
    width: int
    height: int
    kept: int


StreamItem = StreamInfo | FrameChunk | Restart | VideoFacts


def stream_video(path: Path | str, cfg: ExtractConfig, chunk_frames: int, total: int | None = None
                 ) -> Iterator[StreamItem]:
    """Decode, sample and resize one video in chunks of ``chunk_frames`` kept frames (bounded memory).

    Yields the container's :class:`StreamInfo`, then :class:`FrameChunk` s in order, then
    :class:`VideoFacts`. Each chunk is a new array, so a consumer may keep it. Frames are converted straight
    into their chunk, with no copy per frame. For ``count``/``named`` sampling pass ``total`` (else it is
    counted first); when decoding then falls short of the count the sampling chose from, it yields a
    :class:`Restart` and streams the video once more from the true count, so a consumer drops what it got
    before it. Raises VideoError with a one-line reason naming the file.
    """
    path = Path(path)
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")
    retried = False
    while True:
        info, total, selector, size, tracked = _stream(path, cfg, total)
        try:
            yield info
            kept = 0
            for chunk in _chunks(path, tracked, size, chunk_frames):
                kept += len(chunk)
                yield chunk
        finally:
            tracked.close()
        decoded, reached_end = tracked.state["decoded"], tracked.state["reached_end"]
        if decoded == 0:
            raise VideoError(f"{path} has no decodable frame")
        if selector.needs_total and reached_end and selector.last is not None and decoded <= selector.last:
            if retried:
                raise VideoError(f"{path}: only {decoded} of its frames decode")
            retried, total = True, decoded
            yield Restart(decoded)
            continue
        if reached_end:
            _check_not_truncated(path, decoded, info.frames)
        if kept == 0:
            raise VideoError(f"{path}: no video frames could be decoded")
        total_frames = decoded if reached_end else max(decoded, info.frames, total or 0)
        yield VideoFacts(fps=info.fps, total_frames=int(total_frames), width=info.width, height=info.height,
                         kept=kept)
        return


def _chunks(path: Path, tracked: "_Tracked", size: tuple[int, int], chunk_frames: int) -> Iterator[FrameChunk]:
    """The kept frames of ``tracked``, converted into chunk arrays of ``chunk_frames`` rows."""
    buffer = np.empty((chunk_frames, size[1], size[0], 3), np.uint8)
    indices: list[int] = []
    for index, convert in tracked:
        try:
            convert(size, buffer[len(indices)])
        except ValueError as exc:  # a frame of another size than the stream's first
            raise VideoError(f"{path}: the frame size changes mid-stream ({exc}); use resize = 'square' or "
                             "'short_side'") from exc
        indices.append(index)
        if len(indices) == chunk_frames:
            yield FrameChunk(buffer, np.asarray(indices, dtype=np.int64))
            buffer, indices = np.empty_like(buffer), []
    if indices:  # a copy of the last, partial chunk: the whole buffer need not stay alive behind it
        yield FrameChunk(buffer[:len(indices)].copy(), np.asarray(indices, dtype=np.int64))


def _stream(path: Path, cfg: ExtractConfig, total: int | None):
    """(info, total, selector, output size, iterator of (source index, convert) of the kept frames)."""
    if cfg.decoder not in _SOURCES:
        raise ConfigError(f"extract.decoder = {cfg.decoder!r} is not valid; choose {', '.join(_SOURCES)}")
    _check_file(path)
    info, source = _SOURCES[cfg.decoder](path, cfg)
    try:
        selector = make_selector(cfg, info.fps, total)
        if selector.needs_total and total is None:
            total = _total_for_selection(path, cfg, info)
            if total < 1:
                raise VideoError(f"{path} has no video frames")
            selector = make_selector(cfg, info.fps, total)
            _check_not_truncated(path, total, info.frames)
    except VideoError as exc:
        source.close()
        if str(exc).startswith(str(path)):
            raise
        raise VideoError(f"{path}: {exc}") from exc
    except BaseException:
        source.close()
        raise
    state = {"decoded": 0, "reached_end": False}

    def generator() -> Iterator[tuple[int, Convert]]:
        kept = 0
        try:
            for index, convert in source:
                state["decoded"] = index + 1
                if selector.keep(index):
                    yield index, convert
                    kept += 1
                    if cfg.max_frames and kept >= cfg.max_frames:
                        return
                if selector.last is not None and index >= selector.last:
                    return
            state["reached_end"] = True
        finally:
            source.close()

    return info, total, selector, output_size(info.width, info.height, cfg), _Tracked(generator(), state)


class _Tracked:
    """An iterator that also exposes how far decoding went (for the truncation checks)."""

    def __init__(self, iterator: Iterator, state: dict) -> None:
        self._iterator = iterator
        self.state = state

    def __iter__(self) -> "_Tracked":
        return self

    def __next__(self):
        return next(self._iterator)

    def close(self) -> None:
        self._iterator.close()


def read_video(path: Path | str, cfg: ExtractConfig) -> DecodedVideo:
    """Decode, sample and resize one whole video into memory (:func:`stream_video` joined; the extract stage
    streams instead). Raises :class:`VideoError` with a one-line reason naming the file."""
    path = Path(path)
    chunks: list[FrameChunk] = []
    facts = None
    for item in stream_video(path, cfg, READ_CHUNK_FRAMES):
        if isinstance(item, StreamInfo):
            if cfg.resize == "none":
                _check_raw_budget(path, item)
        elif isinstance(item, Restart):
            chunks = []
        elif isinstance(item, FrameChunk):
            chunks.append(item)
        else:
            facts = item
    assert facts is not None  # stream_video ends with its facts or raises
    return DecodedVideo(
        frames=chunks[0].frames if len(chunks) == 1 else np.concatenate([c.frames for c in chunks]),
        indices=np.concatenate([c.indices for c in chunks]),
        fps=facts.fps, total_frames=facts.total_frames, width=facts.width, height=facts.height,
    )


def _check_not_truncated(path: Path, found: int, declared: int) -> None:
    """A container that declares clearly more frames than exist was cut short (a partial copy)."""
    if declared and found < 0.9 * declared - 1:
        raise VideoError(f"{path} is truncated: the container declares {declared} frames, only {found} are there; "
                         "re-copy it")


def _check_raw_budget(path: Path, info: StreamInfo) -> None:
    expected = max(info.frames, 1) * info.width * info.height * 3
    if expected > MAX_RAW_BYTES:
        raise VideoError(f"{path}: {info.width}x{info.height} x {info.frames} frames is too large to hold "
                         f"unresized ({expected / 2**30:.1f} GiB); use resize = 'short_side' or 'square'")


def describe(cfg: ExtractConfig) -> dict:
    """The decoding settings, for a record."""
    return {
        "decoder": cfg.decoder, "sampling": cfg.sampling, "every": cfg.every, "target_fps": cfg.target_fps,
        "count": cfg.count, "named_frames": list(cfg.named_frames), "max_frames": cfg.max_frames,
        "resize": cfg.resize, "size": cfg.size, "interpolation": "bilinear (cv2.INTER_LINEAR)",
    }
