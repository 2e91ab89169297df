"""Probing a video: frame rate, frame count and size, read with the real decoder (PyAV).

The container's frame count is used when it is present and agrees with the stream's duration x rate
(AVI and MP4 headers usually do); otherwise (MKV/WebM carry none, a truncated file lies) the frames are
counted by decoding. ``exact=True`` always decodes, which also proves the whole file is readable.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    frames: int
    width: int
    height: int
    counted: bool = False  # True when the frames were counted by decoding, not read from the header


def probe_video(path: Path | str, *, exact: bool = False) -> VideoInfo:
    """fps, frame count and size of the first video stream; VideoError (one line, naming the file) if unreadable."""
    import av
    from av.error import FFmpegError

    from hpcvid.errors import VideoError

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
            width, height = stream.codec_context.width, stream.codec_context.height
            header_frames = int(stream.frames or 0)
            counted = exact or not _header_count_plausible(header_frames, stream, fps)
            frames = _decode_count(container, stream) if counted else header_frames
    except VideoError:
        raise
    except (FFmpegError, OSError, ValueError, EOFError) as exc:  # PyAV errors and broken files
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise VideoError(f"{path}: cannot be read as a video ({reason})") from None
    if frames <= 0:
        raise VideoError(f"{path}: no decodable frames")
    if fps <= 0:
        raise VideoError(f"{path}: no frame rate in the container")
    if not width or not height:
        raise VideoError(f"{path}: the video stream has no frame size")
    return VideoInfo(fps=fps, frames=frames, width=int(width), height=int(height), counted=counted)


def _header_count_plausible(frames: int, stream, fps: float) -> bool:
    """A header count is trusted when it is positive and matches duration x fps within 2 frames + 2 %."""
    if frames <= 0:
        return False
    if stream.duration is None or stream.time_base is None or fps <= 0:
        return True  # nothing to compare with; AVI/MP4 indexes are exact in practice
    expected = float(stream.duration * stream.time_base) * fps
    return abs(expected - frames) <= 2 + 0.02 * frames


def _decode_count(container, stream) -> int:
    """Frames the decoder really produces (slow path: decodes the whole stream, one thread)."""
    stream.thread_type = "SLICE"
    return sum(1 for _ in container.decode(stream))
