"""The work folder's contract: one owner of paths, the current shard set, verified reads, relocation, locks.

The rules on literal values first, then against a work folder made by the real stages (pipeline_work).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcvid.cli import main
from hpcvid.errors import ConfigError, LockedError, StoreError
from hpcvid.launch.sharding import ShardSpec
from hpcvid.workfolder import Unit, WorkFolder
from slurm_helpers import toy_stages  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ the rules
def test_units_name_their_folders_records_progress_and_locks(tmp_path):
    work = WorkFolder(tmp_path)
    spec = ShardSpec(1, 4)
    assert str(Unit("eval", "lstm")) == "eval/lstm" and Unit.parse("eval/lstm") == Unit("eval", "lstm")
    assert Unit("eval", "lstm").slug == "eval-lstm" and Unit.parse("extract") == Unit("extract")
    assert work.record_file(Unit("eval", "lstm"), spec) == tmp_path / "eval" / "lstm" / "pred-0001-of-0004.json"
    assert work.record_file(Unit("eval", "frame"), spec) != work.record_file(Unit("eval", "lstm"), spec)
    assert work.shard_file(Unit("extract"), spec) == tmp_path / "extract" / "shard-0001-of-0004.h5"
    assert work.run_dir("lstm") == tmp_path / "runs" / "lstm"
    assert work.progress_file(Unit("eval", "lstm"), spec) == tmp_path / ".progress" / "eval" / "lstm" / \
        "shard-0001-of-0004.json"
    assert work.lock_file(Unit("train", "lstm"), ShardSpec(0, 1)).parent == tmp_path / ".locks" / "train" / "lstm"
    assert work.merged_file(Unit("extract")) == tmp_path / "features.h5"
    assert work.merged_file(Unit("features", "frame")) == tmp_path / "features" / "frame" / "features.h5"
    with pytest.raises(ConfigError, match="cannot name a stage or run"):
        Unit("eval", "../x")


def _record(work: WorkFolder, unit: Unit, spec: ShardSpec, set_id: str) -> None:
    work.record_file(unit, spec).parent.mkdir(parents=True, exist_ok=True)
    work.record_file(unit, spec).write_text(json.dumps({"set": set_id, "file": "x.h5", "index": spec.index}))


def test_only_records_of_the_current_set_count(tmp_path):
    work, unit = WorkFolder(tmp_path), Unit("extract")
    old = work.declare_set(unit, 2, {"settings": "a"})
    for spec in (ShardSpec(0, 2), ShardSpec(1, 2)):
        _record(work, unit, spec, old.id)
    assert len(work.current_records(unit)) == 2
    assert [s.name for s in work.plan(unit, 3, {"settings": "a"})] == ["0000-of-0003", "0001-of-0003",
                                                                         "0002-of-0003"]
    with pytest.raises(StoreError, match=r"0000-of-0003, 0001-of-0003, 0002-of-0003 of the current 3-shard set"):
        work.current_records(unit)
    assert sorted(p.name for p in work.stale_records(unit)) == ["shard-0000-of-0002.json", "shard-0001-of-0002.json"]
    # same count, other settings: the records made before are not done either
    new = work.declare_set(unit, 2, {"settings": "b"})
    assert new.id != old.id and not work.is_current(unit, ShardSpec(0, 2))
    assert len(work.plan(unit, 2, {"settings": "b"})) == 2


def test_planning_checks_the_shard_first_and_a_dry_run_changes_nothing(tmp_path):
    from hpcvid.workfolder import dry_run

    work, unit = WorkFolder(tmp_path), Unit("extract")
    current = work.declare_set(unit, 3, {"settings": "a"})
    with pytest.raises(ConfigError, match="shard index 5 is out of range"):
        work.plan(unit, 2, {"settings": "b"}, only=5)
    with dry_run():
        assert len(work.plan(unit, 4, {"settings": "b"})) == 4
    assert work.current_set(unit) == current


def test_a_dry_run_submission_leaves_the_current_set_alone(tmp_path, toy_stages, capsys):
    from slurm_helpers import hpcvid

    work = tmp_path / "work"
    work.mkdir()
    (work / "toy.json").write_text(json.dumps({"items": 1}))
    assert hpcvid("submit", "toy", "--work", work, "--shards", "3", "--executor", "slurm", "--dry-run") == 0
    assert "#SBATCH --array=0-2%3" in capsys.readouterr().out
    assert WorkFolder(work).current_set(Unit("toy")) is None


def test_train_force_sets_the_old_run_aside(tmp_path):
    from hpcvid.config import resolve_config
    from hpcvid.stages import train

    run = tmp_path / "runs" / "frame"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"weeks of training")
    config = resolve_config(overrides={"work": str(tmp_path), "train.model": "frame"})
    assert train.plan(config) == [ShardSpec(0, 1)] and (run / "best.pt").exists()
    assert train.plan(config, force=True) == [ShardSpec(0, 1, force=True)]
    [aside] = (tmp_path / "runs").glob("frame.replaced-*")
    assert (aside / "best.pt").read_bytes() == b"weeks of training" and not run.exists()


def test_a_shard_never_joins_a_set_planned_otherwise_but_fills_a_pending_input(tmp_path):
    work, unit = WorkFolder(tmp_path), Unit("eval", "lstm")
    work.declare_set(unit, 2, {"checkpoint": None, "extract": "e1"})        # queued before training ended
    filled = work.ensure_set(unit, 2, {"checkpoint": "abc", "extract": "e1"})  # the first shard that runs
    assert work.current_set(unit) == filled and filled.identity["checkpoint"] == "abc"
    assert work.ensure_set(unit, 2, {"checkpoint": "abc", "extract": "e1"}) == filled
    with pytest.raises(StoreError, match="made with other checkpoint"):
        work.ensure_set(unit, 2, {"checkpoint": "def", "extract": "e1"})
    with pytest.raises(StoreError, match="2 shards, this one is of 3"):
        work.ensure_set(unit, 3, {"checkpoint": "abc", "extract": "e1"})


def test_paths_stored_inside_work_are_relative(tmp_path):
    work = WorkFolder(tmp_path / "w")
    assert work.relative(tmp_path / "w" / "runs" / "frame" / "best.pt") == "runs/frame/best.pt"
    assert work.absolute("runs/frame/best.pt") == tmp_path / "w" / "runs" / "frame" / "best.pt"
    assert work.relative("/elsewhere/x.pt") == "/elsewhere/x.pt"


def test_verify_reads_the_whole_file_once_until_it_changes(tmp_path, monkeypatch):
    from hpcvid import workfolder
    from hpcvid.fileio import sha256_file

    work = WorkFolder(tmp_path)
    shard = tmp_path / "extract" / "shard.h5"
    shard.parent.mkdir()
    shard.write_bytes(b"x" * 1000)
    digest = sha256_file(shard)
    calls = []
    monkeypatch.setattr(workfolder, "sha256_file", lambda path: calls.append(path) or sha256_file(path))
    work.verify(shard, digest, fix="redo it")
    work.verify(shard, digest, fix="redo it")
    assert len(calls) == 1
    with open(shard, "r+b") as handle:       # one byte changed in place
        handle.seek(500)
        handle.write(b"y")
    with pytest.raises(StoreError, match=r"shard.h5 does not match the sha256 in its record .*: redo it"):
        work.verify(shard, digest, fix="redo it")


# ------------------------------------------------------------------------------------------ locks
def test_stale_locks_are_recognised_from_their_holder():
    from hpcvid.launch.locks import STALE_AFTER_S, Holder, stale_reason

    me = Holder("n1", os.getpid(), "77_3", "aaaa", 0.0, restart=1)
    gone = Holder("n1", 2 ** 22 + 7, "", "bbbb", 0.0)
    assert "has ended" in stale_reason(gone, 1.0, me)
    alive_here = Holder("n1", os.getppid(), "", "cccc", 0.0)
    assert stale_reason(alive_here, 1.0, me) == ""
    other_host = Holder("n2", 1234, "80_1", "dddd", 0.0)
    assert stale_reason(other_host, 10.0, me) == ""
    assert "has not renewed it" in stale_reason(other_host, STALE_AFTER_S + 1, me)
    earlier_start = Holder("n2", 1234, "77_3", "eeee", 0.0, restart=0)
    assert "earlier start of this SLURM job" in stale_reason(earlier_start, 1.0, me)
    same_start = Holder("n2", 1234, "77_3", "ffff", 0.0, restart=1)    # two processes of one allocation
    assert stale_reason(same_start, 1.0, me) == ""


def _hold_lock_in_child(path: Path) -> subprocess.Popen:
    code = ("import sys, time; from hpcvid.launch.locks import UnitLock; "
            f"UnitLock({str(path)!r}, 'the test unit').acquire(); print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_live_holder_is_named_and_a_dead_one_is_broken(tmp_path):
    from hpcvid.launch.locks import UnitLock

    path = tmp_path / ".locks" / "extract" / "shard-0000-of-0001.lock"
    child = _hold_lock_in_child(path)
    try:
        with pytest.raises(LockedError, match=rf"the test unit is being worked on by pid {child.pid} on "):
            UnitLock(path, "the test unit").acquire()
    finally:
        child.kill()
        child.wait()
    with UnitLock(path, "the test unit") as lock:          # the holder is gone: its lock is broken and taken
        assert json.loads(path.read_text())["token"] == lock.holder.token
    assert not path.exists()


# ------------------------------------------------------------------------------------------ real stages
def _copy(pipeline_work, tmp_path: Path, name: str = "work") -> tuple[Path, Path]:
    work, job = pipeline_work
    copy = tmp_path / name
    shutil.copytree(work, copy)
    return copy, job


def _run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_every_stage_reads_the_current_set_and_status_names_the_stale_one(pipeline_work, tmp_path, capsys):
    """An old 2-shard and the current 3-shard extraction side by side: only the 3 shards are ever read."""
    from hpcvid.config import resolve_config
    from hpcvid.stages.train import load_data

    work, job = pipeline_work
    assert sorted(p.name for p in (work / "extract").glob("shard-*.json")) == [
        "shard-0000-of-0002.json", "shard-0000-of-0003.json", "shard-0001-of-0002.json",
        "shard-0001-of-0003.json", "shard-0002-of-0003.json"]
    config = resolve_config(job, overrides={"train.model": "frame"})
    bundle = load_data(config)
    assert len(bundle.train) + len(bundle.val) == 18               # the 18 training videos, once each
    lstm = load_data(resolve_config(job, overrides={"train.model": "lstm"}))
    assert len(lstm.train) + len(lstm.val) == 18
    features = sorted((work / "features" / "frame").glob("shard-*.json"))
    assert len(features) == 3 and sum(json.loads(p.read_text())["n_videos"] for p in features) == 24
    copy, _ = _copy(pipeline_work, tmp_path)
    assert main(["run", "eval", "--config", str(job), "--work", str(copy), "--model", "lstm"]) == 0
    record = json.loads((copy / "eval" / "lstm" / "pred-0000-of-0001.json").read_text())
    assert record["n_videos"] == 6 and record["failed"] == []      # 6 test videos, not 6 per shard set
    capsys.readouterr()
    assert main(["status", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "stale: 2 record(s) of another extract set" in out
    rows = [line.split() for line in out.splitlines()]
    units = {row[0] for row in rows if row}
    assert {"extract", "features/frame", "train/frame", "train/lstm", "eval/lstm"} <= units
    assert sum(1 for row in rows if row and row[0] == "extract") == 3


def _flip_byte(h5_file: Path, dataset: str) -> None:
    """Change one byte inside the stored data of ``dataset`` (its first chunk, or its contiguous block)."""
    import h5py

    with h5py.File(h5_file, "r") as handle:
        ds = handle[dataset]
        offset = ds.id.get_offset()
        if offset is None:
            offset = ds.id.get_chunk_info(0).byte_offset
    with open(h5_file, "r+b") as raw:
        raw.seek(offset + 3)
        byte = raw.read(1)
        raw.seek(offset + 3)
        raw.write(bytes([byte[0] ^ 0xFF]))


def _first_group(h5_file: Path) -> str:
    import h5py

    with h5py.File(h5_file, "r") as handle:
        return "videos/" + next(iter(handle["videos"]))


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and ".progress" not in p.parts and ".locks" not in p.parts and ".verified" not in p.parts
            and p.name != "config.resolved.json"}


@pytest.mark.slow
def test_a_flipped_byte_is_one_line_and_nothing_is_written_from_it(pipeline_work, tmp_path, capsys):
    work, job = _copy(pipeline_work, tmp_path)
    common = ["--config", str(job), "--work", str(work)]
    assert main(["run", "eval", *common, "--model", "frame"]) == 0
    shard = work / "extract" / "shard-0001-of-0003.h5"
    _flip_byte(shard, _first_group(shard) + "/features/resnet18")
    before = _snapshot(work)
    for argv in (["run", "merge", "--force"], ["run", "eval", "--model", "frame", "--force"],
                 ["run", "train", "--model", "frame", "--epochs", "2"], ["run", "features", "--force"]):
        code, err = _run(capsys, *argv, *common)
        assert code == 2 and err.count("\n") == 1, (argv, err)
        assert "shard-0001-of-0003.h5" in err and "--shard 1 --force" in err, (argv, err)
    after = _snapshot(work)
    # Features shard 0 reads only the intact extraction shard 0, so the forced rerun may rewrite it;
    # nothing that would have been read from the damaged shard 1 is written.
    rewritten = {name for name in after if after[name] != before.get(name)}
    assert rewritten <= {"features/frame/shard-0000-of-0003.h5", "features/frame/shard-0000-of-0003.json"}
    assert after.keys() == before.keys()                    # no new shard, record, checkpoint or file

    work, job = _copy(pipeline_work, tmp_path, "flow")
    common = ["--config", str(job), "--work", str(work)]
    shard = work / "extract" / "shard-0002-of-0003.h5"
    _flip_byte(shard, _first_group(shard) + "/flow")
    code, err = _run(capsys, "run", "train", "--model", "flow", *common)
    assert code == 2 and err.count("\n") == 1 and "shard-0002-of-0003.h5" in err
    assert not (work / "runs" / "flow" / "best.pt").exists()

    work, job = _copy(pipeline_work, tmp_path, "merged")
    common = ["--config", str(job), "--work", str(work)]
    merged = work / "features" / "frame" / "features.h5"
    _flip_byte(merged, "features/finetuned")
    before = _snapshot(work)
    code, err = _run(capsys, "run", "train", "--model", "lstm", "--epochs", "2", *common)
    assert code == 2 and err.count("\n") == 1 and "features/frame/features.h5" in err and "run merge --features-dir" in err
    assert _snapshot(work) == before

    work, job = _copy(pipeline_work, tmp_path, "pred")
    common = ["--config", str(job), "--work", str(work)]
    assert main(["run", "eval", *common, "--model", "lstm", "--shards", "2"]) == 0
    prediction = work / "eval" / "lstm" / "pred-0001-of-0002.h5"
    _flip_byte(prediction, "scores/windows")
    code, err = _run(capsys, "collect", work, "--out", tmp_path / "report")
    assert code == 2 and err.count("\n") == 1 and "pred-0001-of-0002.h5" in err
    assert not (tmp_path / "report" / "summary.json").exists()


@pytest.mark.slow
def test_a_copied_work_folder_reads_only_its_own_files(pipeline_work, tmp_path):
    """Copy a work folder, delete the original: eval and collect give the same numbers from the copy."""
    first, job = _copy(pipeline_work, tmp_path, "first")
    for model in ("frame", "lstm"):
        assert main(["run", "eval", "--config", str(job), "--work", str(first), "--model", model]) == 0
    assert main(["collect", str(first), "--out", str(tmp_path / "first-report")]) == 0
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    for model in ("frame", "lstm"):
        assert main(["run", "eval", "--config", str(job), "--work", str(moved), "--model", model, "--force"]) == 0
    assert main(["collect", str(moved), "--out", str(tmp_path / "moved-report")]) == 0

    def numbers(report: Path) -> dict:
        summary = json.loads((report / "summary.json").read_text())
        return {run: {s: (v["top1"], v["n_videos"]) for s, v in entry["strategies"].items()}
                for run, entry in summary["runs"].items()}

    assert numbers(tmp_path / "moved-report") == numbers(tmp_path / "first-report")
    assert set(numbers(tmp_path / "moved-report")) == {"frame", "lstm"}
    stored = "".join(p.read_text() for p in moved.rglob("*.json") if p.name != "config.resolved.json"
                     and "jobs" not in p.parts)
    assert str(first) not in stored


@pytest.mark.slow
def test_a_moved_dataset_needs_only_dataset(tiny_synthetic, tmp_path, capsys):
    before, after = tmp_path / "videos", tmp_path / "moved" / "videos"
    shutil.copytree(tiny_synthetic, before)
    work = tmp_path / "work"
    assert main(["index", "--dataset", str(before), "--work", str(work)]) == 0
    after.parent.mkdir()
    before.rename(after)
    cheap = ["--work", str(work), "--backbone", "none", "--flow", "none"]
    assert main(["run", "extract", *cheap]) == 3                     # the videos are no longer where indexed
    assert "pass --dataset NEW_ROOT" in capsys.readouterr().out + "".join(
        json.loads(p.read_text())["failed"][0]["reason"] for p in (work / "extract").glob("shard-*.json"))
    assert main(["run", "extract", *cheap, "--dataset", str(after), "--force"]) == 0
    record = json.loads(next((work / "extract").glob("shard-*.json")).read_text())
    assert record["n_videos"] == 24 and record["n_failed"] == 0


@pytest.mark.slow
def test_two_runs_of_one_shard_one_works_the_other_names_it_and_a_dead_holder_is_replaced(
        pipeline_work, tmp_path, capsys):
    work, job = _copy(pipeline_work, tmp_path)
    lock = work / ".locks" / "extract" / "shard-0000-of-0003.lock"
    argv = ["run", "extract", "--config", str(job), "--work", str(work), "--shard", "0", "--force"]
    first = subprocess.Popen([sys.executable, "-m", "hpcvid.cli", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not lock.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)         # it holds the lock while the second one starts
        code, err = _run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1
        assert f"extract shard 0000-of-0003 is being worked on by pid {first.pid}" in err
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0 and not lock.exists()
    assert json.loads((work / "extract" / "shard-0000-of-0003.json").read_text())["n_videos"] == 8

    second = subprocess.Popen([sys.executable, "-m", "hpcvid.cli", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not lock.exists():
        assert second.poll() is None and time.monotonic() < deadline, "the run never took the lock"
        time.sleep(0.02)
    second.kill()                                   # killed while holding it: a stale lock stays behind
    second.wait()
    assert lock.exists()
    code, err = _run(capsys, *argv)
    assert code == 0, err
    record = json.loads((work / "extract" / "shard-0000-of-0003.json").read_text())
    assert record["n_videos"] == 8 and not lock.exists()
