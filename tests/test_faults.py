"""Faults of the machine are not faults of the videos: a full or read-only work folder (a real tmpfs).

Extraction runs in a child process here, as a user's would, so that a crash of a native library on a full
disk shows as its exit code instead of ending the test session.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcvid.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CHEAP = ["--backbone", "none", "--flow", "farneback"]


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, kib) -> a fresh tmpfs of that size; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted: list[Path] = []

    def mount(name: str, kib: int) -> Path:
        target = tmp_path / name
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(target)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"a tmpfs cannot be mounted here: {done.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _job(folder: Path, dataset: Path, work: Path) -> Path:
    job = folder / f"{work.name}.toml"
    job.write_text(f'work = "{work}"\n[dataset]\nroot = "{dataset}"\nformat = "ucf101"\n'
                   '[extract]\nshards = 1\nsize = 32\n')
    return job


def _extract(job: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "hpcvid.cli", "run", "extract", "--config", str(job), *CHEAP,
                             *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _no_failed_markers(work: Path) -> bool:
    return not list(work.rglob("*.failed.json"))


def _checksums(work: Path) -> dict[str, str]:
    record = json.loads((work / "extract" / "shard-0000-of-0001.json").read_text())
    return {v["id"]: v["checksum"] for v in record["videos"]}


def test_a_shard_that_cannot_fit_is_refused_before_it_starts(tiny_synthetic, tmp_path, tmpfs):
    work = tmpfs("small", 1024) / "work"
    child = _extract(_job(tmp_path, tiny_synthetic, work))
    _, err = child.communicate(timeout=300)
    assert child.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("hpcvid: error: ") and "extract shard 0000-of-0001 needs about" in last
    assert "MiB are free: free space or use a larger file system" in last
    assert _no_failed_markers(work) and not (work / "extract" / "shard-0000-of-0001.h5").exists()


def test_a_disk_that_fills_up_stops_the_shard_and_the_rerun_equals_a_clean_run(tiny_synthetic, tmp_path, tmpfs):
    clean = tmp_path / "clean"
    assert main(["run", "extract", "--config", str(_job(tmp_path, tiny_synthetic, clean)), *CHEAP]) == 0
    disk = tmpfs("filling", 16 * 1024)
    work = disk / "work"
    job = _job(tmp_path, tiny_synthetic, work)
    child = _extract(job)
    parts = work / "extract" / "shard-0000-of-0001.parts"
    deadline = time.monotonic() + 120
    while not (parts.is_dir() and list(parts.glob("*.h5"))):
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGSTOP)            # another job fills the shared file system meanwhile
    ballast = disk / "ballast"
    try:
        with open(ballast, "wb") as handle:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
    except OSError:
        pass
    os.kill(child.pid, signal.SIGCONT)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 2, (child.returncode, err)          # not a crash (139), not exit 3 (bad videos)
    last = err.strip().splitlines()[-1]
    assert "no space is left" in last and "no video was recorded as failed" in last, last
    assert _no_failed_markers(work) and not (work / "extract" / "shard-0000-of-0001.json").exists()
    ballast.unlink()
    rerun = _extract(job)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert _checksums(work) == _checksums(clean)


def test_a_read_only_work_folder_is_one_line_for_every_stage(tiny_synthetic, tmp_path, tmpfs, capsys):
    disk = tmpfs("readonly", 32 * 1024)
    work = disk / "work"
    job = tmp_path / "ro.toml"
    job.write_text(f'work = "{work}"\n[dataset]\nroot = "{tiny_synthetic}"\nformat = "ucf101"\n'
                   '[extract]\nshards = 1\nsize = 32\nbackbone = "resnet18"\nflow = "none"\ndevice = "cpu"\n'
                   '[train]\nbackbone = "small"\nepochs = 1\ndevice = "cpu"\n')
    assert main(["run", "extract", "--config", str(job)]) == 0
    done = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"the tmpfs cannot be made read-only here: {done.stderr.strip()}")
    for argv in (["index", "--config", str(job)], ["run", "extract", "--config", str(job), "--force"],
                 ["run", "merge", "--config", str(job)], ["run", "train", "--config", str(job), "--model", "frame"],
                 ["run", "eval", "--config", str(job), "--model", "frame"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "read-only" in err and "Traceback" not in err, (argv, err)
