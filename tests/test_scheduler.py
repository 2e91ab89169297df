"""sacct/squeue parsers on literal text, and status/cancel against a scheduler faked at run_command."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from slurm_helpers import hpcvid

# sacct -n -P -D -X -o JobID,State,ExitCode,Start,End,Elapsed,NodeList -j 41,42,43  (as SLURM 22.05 prints it)
SACCT = """\
41_0|COMPLETED|0:0|2026-11-22T03:00:15|2026-11-22T03:00:18|00:00:03|n1
41_1|CANCELLED by 0|0:15|2026-11-22T03:00:15|2026-11-22T03:00:17|00:00:02|n2
41_2|REQUEUED|0:0|2026-11-22T03:00:15|2026-11-22T03:00:46|00:00:31|n3
41_2|RUNNING|0:0|2026-11-22T03:01:01|Unknown|00:00:07|n3
41_[3-4]|PENDING|0:0|Unknown|Unknown|00:00:00|None assigned
42|FAILED|1:0|2026-11-22T03:02:00|2026-11-22T03:02:05|00:00:05|n1
43|PENDING|0:0|Unknown|Unknown|00:00:00|None assigned
44|TIMEOUT|0:0|2026-11-22T03:02:00|2026-11-22T03:04:30|00:02:30|n2
"""
SQUEUE = """\
41_2|RUNNING|None
41_3|PENDING|JobArrayTaskLimit
41_4|PENDING|JobArrayTaskLimit
43|PENDING|DependencyNeverSatisfied
"""


def test_expand_array_ids():
    from hpcvid.launch.scheduler import expand_job_id

    assert expand_job_id("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]
    assert expand_job_id("12_7") == ["12_7"] and expand_job_id("13") == ["13"]


def test_parse_sacct_states_requeues_and_pending_ranges():
    from hpcvid.launch.scheduler import parse_sacct

    jobs = parse_sacct(SACCT)
    assert jobs["41_0"].state == "COMPLETED" and jobs["41_0"].finished
    assert jobs["41_1"].state == "CANCELLED" and jobs["41_1"].exit_code == "0:15"
    assert jobs["41_2"].state == "RUNNING" and jobs["41_2"].requeues == 1 and not jobs["41_2"].finished
    assert jobs["41_3"].state == jobs["41_4"].state == "PENDING"
    assert jobs["42"].state == "FAILED" and jobs["44"].state == "TIMEOUT" and jobs["44"].finished
    assert "41_2.batch" not in parse_sacct("41_2.batch|COMPLETED|0:0|a|b|c|n1\n")


def test_parse_squeue_reasons_and_merge():
    from hpcvid.launch.scheduler import merge_views, parse_sacct, parse_squeue

    queued = parse_squeue(SQUEUE)
    assert queued["43"] == ("PENDING", "DependencyNeverSatisfied")
    merged = merge_views(parse_sacct(SACCT), queued)
    assert merged["43"].reason == "DependencyNeverSatisfied" and merged["41_2"].reason == ""
    assert merged["41_3"].reason == "JobArrayTaskLimit"
    assert merged["41_2"].requeues == 1, "squeue's view must keep sacct's requeue count"


def test_malformed_scheduler_output_is_a_clear_error():
    from hpcvid.errors import SchedulerError
    from hpcvid.launch.scheduler import parse_sacct, parse_squeue

    with pytest.raises(SchedulerError, match="unexpected sacct line"):
        parse_sacct("41_0 COMPLETED\n")
    with pytest.raises(SchedulerError, match="unexpected squeue line"):
        parse_squeue("41_0\n")


class FakeSlurm:
    """Answers sacct/squeue/scancel with literal text, records every call (the command boundary only)."""

    def __init__(self, sacct: str = SACCT, squeue: str = SQUEUE, squeue_rc: int = 0):
        self.sacct, self.squeue, self.squeue_rc, self.calls = sacct, squeue, squeue_rc, []

    def __call__(self, argv, **kwargs):
        self.calls.append(list(argv))
        if argv[0] == "sacct":
            return subprocess.CompletedProcess(argv, 0, self.sacct, "")
        if argv[0] == "squeue":
            err = "" if self.squeue_rc == 0 else "slurm_load_jobs error: Invalid job id specified"
            return subprocess.CompletedProcess(argv, self.squeue_rc, self.squeue if not self.squeue_rc else "", err)
        if argv[0] == "scancel":
            return subprocess.CompletedProcess(argv, 0, "", "")
        raise AssertionError(f"unexpected command {argv}")


def _submission(work: Path, unit: str, tasks: list[tuple[str, int, int]], name: str) -> None:
    from hpcvid.launch.executors import Submission, write_submission

    write_submission(work, Submission(
        unit, "slurm", [t[0] for t in tasks],
        [{"job_id": j, "shard": i, "count": n, "name": f"{i:04d}-of-{n:04d}"} for j, i, n in tasks],
        "jobs/logs/%j", ["hpcvid", "submit", unit], name))


def _record(work: Path, unit: str, spec, **fields) -> None:
    """A shard record of the unit's current set (declared here when there is none), as a stage writes it."""
    from hpcvid.fileio import atomic_write_json
    from hpcvid.workfolder import Unit, WorkFolder

    folder = WorkFolder(work)
    shard_set = folder.ensure_set(Unit.parse(unit), spec.count, {"test": 1})
    atomic_write_json(folder.record_file(Unit.parse(unit), spec), {**fields, "set": shard_set.id})


@pytest.fixture
def work_with_jobs(tmp_path):
    from hpcvid.launch.progress import write_progress
    from hpcvid.launch.sharding import ShardSpec
    from hpcvid.workfolder import Unit

    work = tmp_path / "work"
    _submission(work, "extract", [("41_0", 0, 5), ("41_1", 1, 5), ("41_2", 2, 5), ("41_3", 3, 5),
                                  ("41_4", 4, 5)], "t1")
    _submission(work, "merge", [("43", 0, 1)], "t2")
    _record(work, "extract", ShardSpec(0, 5), videos=[{"id": "a"}, {"id": "b"}, {"id": "c"}],
            failed=[{"video": "d", "reason": "bad"}])
    write_progress(work, Unit("extract"), ShardSpec(2, 5), done=2, total=8, started=1000.0)
    return work


def test_status_makes_one_batched_query_and_shows_every_state(work_with_jobs, monkeypatch, capsys):
    from hpcvid.launch import scheduler

    fake = FakeSlurm()
    monkeypatch.setattr(scheduler, "run_command", fake)
    assert hpcvid("status", work_with_jobs) == 0
    out = capsys.readouterr().out
    assert [c[0] for c in fake.calls] == ["sacct", "squeue"], "one sacct and one squeue call, not one per shard"
    assert "41,43" in " ".join(fake.calls[0])
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith(("extract", "merge"))}
    lines["merge"] = next(line for line in out.splitlines() if line.startswith("merge"))
    assert "COMPLETED" in lines["0000-of-0005"] and "4/4" in lines["0000-of-0005"]
    assert " 1 " in lines["0000-of-0005"], "the failed video must be counted"
    assert "CANCELLED" in lines["0001-of-0005"]
    assert "RUNNING" in lines["0002-of-0005"] and "2/8" in lines["0002-of-0005"]
    assert "requeued 1x" in lines["0002-of-0005"]
    assert "DependencyNeverSatisfied" in lines["merge"] and "never start" in lines["merge"]
    assert "will never start" in out


def test_status_after_slurm_forgot_the_jobs_uses_the_files(work_with_jobs, monkeypatch, capsys):
    from hpcvid.launch import scheduler

    monkeypatch.setattr(scheduler, "run_command", FakeSlurm(sacct="", squeue_rc=1))
    assert hpcvid("status", work_with_jobs) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "0000-of-0005" in line)
    assert "COMPLETED" in row and "4/4" in row
    assert "UNKNOWN" in next(line for line in out.splitlines() if "0001-of-0005" in line)


def test_cancel_cancels_only_live_jobs_in_one_call(work_with_jobs, monkeypatch, capsys):
    from hpcvid.launch import scheduler

    fake = FakeSlurm()
    monkeypatch.setattr(scheduler, "run_command", fake)
    assert hpcvid("cancel", work_with_jobs) == 0
    scancels = [c for c in fake.calls if c[0] == "scancel"]
    assert scancels == [["scancel", "43", "41_2", "41_3", "41_4"]]
    assert "cancelled 4 job(s)" in capsys.readouterr().out


def _planned(config, unit: str, specs):
    """A node as submit plans it: the unit and the shards without a record."""
    from hpcvid.launch.pipeline import Node, Planned
    from hpcvid.stages import STAGES

    return Planned(Node(unit), STAGES[unit], config, unit, list(specs))


def test_resubmission_skips_shards_still_queued_and_requeues_jobs_that_never_start(work_with_jobs, monkeypatch):
    from hpcvid.config import resolve_config
    from hpcvid.launch import scheduler
    from hpcvid.launch.pipeline import find_active
    from hpcvid.launch.sharding import ShardSpec, all_shards

    fake = FakeSlurm()
    monkeypatch.setattr(scheduler, "run_command", fake)
    config = resolve_config(overrides={"work": str(work_with_jobs), "launch.executor": "slurm"})
    extract, merge = _planned(config, "extract", all_shards(5)), _planned(config, "merge", [ShardSpec(0, 1)])
    find_active([extract, merge], work_with_jobs, force=False, skip_completed=True)   # a pipeline again
    assert [c[0] for c in fake.calls] == ["sacct", "squeue"], "one query for every unit"
    # 41_0 completed and wrote its record: done; 41_1 cancelled: queued again; 41_2 running, 41_3/41_4
    # pending: not twice
    assert extract.finished == {0: "41_0"} and [s.index for s in extract.to_queue()] == [1]
    assert extract.pending == {3: "41_3", 4: "41_4"}
    # 43 waits for a failed job (DependencyNeverSatisfied): it can never start, so it is queued again
    assert merge.stuck == {0: "43"} and [s.index for s in merge.to_queue()] == [0]


def test_a_unit_queued_again_takes_its_waiting_dependants_with_it(tmp_path):
    """eval/x waits (PENDING, reason Dependency) for train/x's old job; train/x is queued again now, so the
    old eval job would wait for the old train job: it must be queued again behind the new one."""
    from hpcvid.config import resolve_config
    from hpcvid.launch.pipeline import Node, Planned, requeue_behind_new_jobs
    from hpcvid.launch.sharding import ShardSpec
    from hpcvid.stages import STAGES

    config = resolve_config(overrides={"work": str(tmp_path)})
    train = Planned(Node("train", "x"), STAGES["train"], config, "train/x", [ShardSpec(0, 1)])
    evaluate = Planned(Node("eval", "x", ("train/x",)), STAGES["eval"], config, "eval/x", [ShardSpec(0, 2)],
                       active={0: "60_0"}, pending={0: "60_0"})
    running = Planned(Node("eval", "y", ("train/y",)), STAGES["eval"], config, "eval/y", [ShardSpec(0, 1)],
                      active={0: "61"}, pending={0: "61"})
    requeue_behind_new_jobs([train, evaluate, running])
    assert evaluate.stuck == {0: "60_0"} and [s.index for s in evaluate.to_queue()] == [0]
    assert running.stuck == {} and running.to_queue() == [], "its upstream is not queued again: it stays"


def test_status_shows_shards_run_locally_without_a_submission(tmp_path, monkeypatch, capsys):
    """`hpcvid run` writes progress files but no submission record; status must still show those shards."""
    from hpcvid.launch import scheduler
    from hpcvid.launch.progress import write_progress
    from hpcvid.launch.sharding import ShardSpec
    from hpcvid.workfolder import Unit

    fake = FakeSlurm()
    monkeypatch.setattr(scheduler, "run_command", fake)
    work = tmp_path / "w"
    write_progress(work, Unit("extract"), ShardSpec(0, 2), done=3, total=3, started=1000.0)
    _record(work, "extract", ShardSpec(0, 2), videos=[{"id": "a"}] * 3, failed=[])
    write_progress(work, Unit("extract"), ShardSpec(1, 2), done=1, total=4, started=1000.0)
    progress_file = work / ".progress" / "extract" / "shard-0001-of-0002.json"
    stale = json.loads(progress_file.read_text())
    stale["pid"] = 2 ** 22 + 7  # above the kernel's pid limit here: a process that no longer exists
    progress_file.write_text(json.dumps(stale))
    assert hpcvid("status", work) == 0
    out = capsys.readouterr().out
    assert fake.calls == [], "no SLURM job to ask about"
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("extract")}
    assert "COMPLETED" in rows["0000-of-0002"] and "3/3" in rows["0000-of-0002"]
    assert "STOPPED" in rows["0001-of-0002"] and "1/4" in rows["0001-of-0002"]


def test_status_of_an_untouched_folder_is_a_clear_error(tmp_path, capsys):
    assert hpcvid("status", tmp_path) == 2
    assert "nothing was submitted or run" in capsys.readouterr().err


def test_when_slurm_cannot_be_asked_nothing_is_queued_twice(work_with_jobs, monkeypatch, capsys):
    """sacct and squeue both fail (slurmctld down): resubmitting would risk running a shard twice."""
    from hpcvid.config import resolve_config
    from hpcvid.errors import CommandError, SchedulerError
    from hpcvid.launch import scheduler
    from hpcvid.launch.pipeline import find_active
    from hpcvid.launch.sharding import all_shards

    def unreachable(argv, **kwargs):
        raise CommandError(list(argv), 1, stderr="slurm_load_jobs error: Unable to contact slurm controller")

    monkeypatch.setattr(scheduler, "run_command", unreachable)
    config = resolve_config(overrides={"work": str(work_with_jobs), "launch.executor": "slurm"})
    with pytest.raises(SchedulerError, match=r"extract: SLURM cannot be asked .* nothing queued, so that no shard "
                                             r"runs twice: try again, or pass --force"):
        find_active([_planned(config, "extract", all_shards(5))], work_with_jobs, force=False)
    forced = _planned(config, "extract", all_shards(5))
    find_active([forced], work_with_jobs, force=True)
    assert [s.index for s in forced.to_queue()] == [0, 1, 2, 3, 4]
    assert "queued anyway (--force)" in capsys.readouterr().out


def test_a_training_row_shows_epochs_best_validation_accuracy_and_eta(tmp_path, monkeypatch, capsys):
    import time
    from types import SimpleNamespace

    from hpcvid.launch import scheduler
    from hpcvid.launch.progress import write_progress
    from hpcvid.launch.sharding import ShardSpec
    from hpcvid.workfolder import Unit

    work = tmp_path / "work"
    _submission(work, "train/lstm", [("70", 0, 1)], "t1")
    _submission(work, "train/frame", [("71", 0, 1)], "t1")
    now = time.time()
    # the progress files are written "now" exactly: the expected rate and ETA never depend on how long
    # this test took between its steps
    monkeypatch.setattr("hpcvid.launch.progress.time", SimpleNamespace(time=lambda: now))
    # resumed at epoch 1 (a requeue): 2 epochs in the 60 s since, 7 to go -> 210 s
    write_progress(work, Unit("train", "lstm"), ShardSpec(0, 1), done=3, total=10, best_val_acc=0.8125,
                   stopped_early=False, started=now - 60, done_at_start=1)
    write_progress(work, Unit("train", "frame"), ShardSpec(0, 1), done=4, total=4, best_val_acc=0.5,
                   stopped_early=True, started=now - 40, done_at_start=0)
    fake = FakeSlurm(sacct="70|RUNNING|0:0|a|Unknown|00:01:00|n1\n71|COMPLETED|0:0|a|b|00:00:40|n2\n", squeue="")
    monkeypatch.setattr(scheduler, "run_command", fake)
    assert hpcvid("status", work) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("train/")}
    lstm = rows["train/lstm"].split()
    assert lstm[3:8] == ["RUNNING", "3/10", "-", "2.0", "0:03:30"], rows["train/lstm"]
    assert "epochs; best val acc 0.812" in rows["train/lstm"]
    assert "4/4" in rows["train/frame"] and "best val acc 0.500; stopped early" in rows["train/frame"]


def test_watch_refreshes_with_one_query_each_until_every_job_ends(work_with_jobs, monkeypatch, capsys):
    from hpcvid.cli import status
    from hpcvid.launch import scheduler

    answers = [SACCT, SACCT.replace("RUNNING", "COMPLETED").replace("PENDING", "CANCELLED")]
    fake = FakeSlurm()
    sleeps = []

    def next_answer(seconds):
        sleeps.append(seconds)
        fake.sacct, fake.squeue = answers[len(sleeps)], ""

    monkeypatch.setattr(scheduler, "run_command", fake)
    monkeypatch.setattr(status.time, "sleep", next_answer)
    assert hpcvid("status", work_with_jobs, "--watch", "5") == 0
    out = capsys.readouterr().out
    assert sleeps == [5] and out.count("UNIT ") == 2
    assert [c[0] for c in fake.calls] == ["sacct", "squeue", "sacct", "squeue"], "one batched query per refresh"
    assert "again in 5 s" in out and out.rstrip().endswith("watch: every job has ended")


def test_watch_stops_when_what_is_left_waits_for_a_failed_job(work_with_jobs, monkeypatch, capsys):
    """A job that waits for a failed one never ends by itself: watching it would never stop."""
    from hpcvid.cli import status
    from hpcvid.launch import scheduler

    fake = FakeSlurm(sacct=SACCT.replace("RUNNING", "COMPLETED").replace("41_[3-4]|PENDING", "41_[3-4]|CANCELLED"),
                     squeue="43|PENDING|DependencyNeverSatisfied\n")
    monkeypatch.setattr(scheduler, "run_command", fake)
    monkeypatch.setattr(status.time, "sleep", lambda s: pytest.fail("slept: the watch should have ended"))
    assert hpcvid("status", work_with_jobs, "--watch") == 0
    assert "watch: every job has ended" in capsys.readouterr().out
