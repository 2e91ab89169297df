"""Kill-safety: `hpcvid run extract` SIGKILLed at random moments, then resumed, ends equal to a clean run.

Every kill is checked on the spot: nothing that looks complete is half-written (each visible part file
and shard opens; a record exists only beside a shard whose sha256 it names). After at least 10 kills the
shard is resumed to the end and compared, video by video and array by array, with an uninterrupted run.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from extract_helpers import write_folder_manifest
from hpcvid.fileio import read_json, sha256_file
from hpcvid.storage.shards import ShardReader

KILLS = 10
SHARD = "0000-of-0001"


def _command(work: Path, job: Path) -> list[str]:
    return [sys.executable, "-m", "hpcvid.cli", "run", "extract", "--config", str(job), "--work", str(work),
            "--shards", "1", "--shard", "0"]


def _environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _check_nothing_half_written(extract_dir: Path) -> int:
    """Every file with a final name opens; returns how many finished per-video parts there are."""
    record, shard = extract_dir / f"shard-{SHARD}.json", extract_dir / f"shard-{SHARD}.h5"
    if record.is_file():
        assert read_json(record)["sha256"] == sha256_file(shard)
    if shard.is_file():
        with ShardReader(shard) as reader:
            for video_id in reader.video_ids():
                reader.flow(video_id)
    parts = extract_dir / f"shard-{SHARD}.parts"
    finished = sorted(parts.glob("*.h5")) if parts.is_dir() else []
    for part in finished:
        with ShardReader(part) as reader:
            assert len(reader.video_ids()) == 1 and reader.file.attrs["summary"]
    for failed in parts.glob("*.failed.json") if parts.is_dir() else []:
        read_json(failed)
    return len(finished)


def _finished_parts(extract_dir: Path) -> int:
    parts = extract_dir / f"shard-{SHARD}.parts"
    return len(list(parts.glob("*.h5"))) if parts.is_dir() else 0


def _wait_for_parts(process: subprocess.Popen, extract_dir: Path, target: int) -> bool:
    """Wait until the shard has ``target`` finished parts (True) or the process has ended (False)."""
    deadline = time.monotonic() + 300          # a hang, not a speed: the test fails rather than waits forever
    while process.poll() is None:
        if _finished_parts(extract_dir) >= target:
            return True
        assert time.monotonic() < deadline, "the extraction made no progress"
        time.sleep(0.01)
    return False


def _all_contents(shard: Path) -> dict[str, list]:
    with ShardReader(shard) as reader:
        out = {}
        for video_id in reader.video_ids():
            info = reader.info(video_id)
            out[video_id] = [{k: v for k, v in info.items() if k != "frame_indices"}, info["frame_indices"],
                             reader.frames(video_id), reader.flow(video_id)]
        return out


@pytest.mark.slow
def test_random_sigkills_then_resume_equal_a_clean_run(tiny_synthetic, tmp_path):
    job = tmp_path / "job.toml"
    # flow only: no torch import, so each start costs ~1 s and ten kills fit in well under a minute
    # max_attempts: random kills may land on the same video again and again; here that is not its fault
    job.write_text('[extract]\nsize = 32\nbackbone = "none"\nflow = "farneback"\nmax_attempts = 1000\n')
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    write_folder_manifest(tiny_synthetic, clean)
    write_folder_manifest(tiny_synthetic, killed)
    env = _environment()

    subprocess.run(_command(clean, job), env=env, check=True, capture_output=True, timeout=300)

    # Kill points are set by progress, never by a measured time: each run is killed once its shard has a
    # few more finished videos than before (0 to 3 more, so also before the first and between any two), a
    # random moment into the next one. On a slow or busy machine the kills land at the same places.
    rng = random.Random(1234)
    kills, kills_with_parts, finished_early = 0, 0, 0
    extract_dir = killed / "extract"
    while kills < KILLS:
        target = _finished_parts(extract_dir) + rng.randint(0, 3)
        process = subprocess.Popen(_command(killed, job), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        if _wait_for_parts(process, extract_dir, target):
            time.sleep(rng.uniform(0.0, 0.05))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            kills_with_parts += _check_nothing_half_written(extract_dir) > 0
        else:  # it finished before its kill: start this shard over, so the next kills hit real work
            assert process.returncode == 0
            finished_early += 1
            shutil.rmtree(extract_dir)
    resumed = subprocess.run(_command(killed, job), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert kills_with_parts >= 1, "no kill landed after a video was finished: the kills tested nothing"

    clean_record = read_json(clean / "extract" / f"shard-{SHARD}.json")
    killed_record = read_json(extract_dir / f"shard-{SHARD}.json")
    assert killed_record["videos"] == clean_record["videos"]  # ids, shapes, checksums, order
    assert killed_record["n_videos"] == 24 and killed_record["n_failed"] == 0
    assert not (extract_dir / f"shard-{SHARD}.parts").exists() and not list(extract_dir.glob(".*.partial"))
    expected = _all_contents(clean / "extract" / f"shard-{SHARD}.h5")
    got = _all_contents(extract_dir / f"shard-{SHARD}.h5")
    assert sorted(got) == sorted(expected)
    for video_id, values in expected.items():
        assert got[video_id][0] == values[0]
        for a, b in zip(got[video_id][1:], values[1:]):
            np.testing.assert_array_equal(a, b)
    print(f"{kills} kills ({kills_with_parts} after some videos were done), {finished_early} runs finished "
          "before their kill")
