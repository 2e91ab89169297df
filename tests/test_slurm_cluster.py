"""Against the REAL one-machine SLURM (slurm/local-cluster.sh): arrays, status, cancel + resubmit,
requeue on the pre-timeout signal, and a dependency chain. Tiny work so all of it takes a few minutes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PIPELINE_JOB
from slurm_helpers import (SCRIPT, extract_job_file, hpcvid, job_states, slurm_cluster, toy_stages, wait_finished,  # noqa: F401
                           wait_until)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def _toy_work(tmp_path: Path, **knobs) -> Path:
    work = tmp_path / "work"
    work.mkdir(parents=True)
    (work / "toy.json").write_text(json.dumps({"items": 2, "sleep": 0.0, "fail": [], **knobs}))
    return work


def _last_submission(work: Path, stage: str) -> dict:
    paths = sorted((work / "jobs").glob(f"{stage}-*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(paths[-1].read_text())


def _started(work: Path) -> list[tuple[int, str, str]]:
    log = work / "toy" / "started.log"
    return [tuple(line.split()) for line in log.read_text().splitlines()] if log.exists() else []


def _status(work: Path, *extra: str) -> str:
    """`hpcvid status` in a NEW process: only the files and SLURM are shared."""
    out = subprocess.run([sys.executable, "-m", "hpcvid.cli", "status", str(work), *extra], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def walltime_job(slurm_cluster, tmp_path_factory):
    """A shard whose work (10 items x 12 s) outlasts its 3-minute walltime, queued when the module starts so
    that it runs beside the other tests; SLURM signals it 60 s (it can come up to 120 s) before the end."""
    from hpcvid.stages import STAGES
    from toystage import TOY

    work = _toy_work(tmp_path_factory.mktemp("walltime"), items=10, sleep=12.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(STAGES, "toy", TOY)
        patch.syspath_prepend(str(ROOT / "tests"))
        patch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
        assert hpcvid("submit", "toy", "--work", work, "--shards", "1", "--profile", ROOT / "slurm" / "local.toml",
                      "--walltime", "00:03:00", "--signal-delay", "60") == 0
    return work, _last_submission(work, "toy")["job_ids"][0]


def test_cluster_up_is_idempotent_and_status_answers(slurm_cluster, walltime_job):
    again = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already up" in again.stderr
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "n1=idle" in status.stdout.replace("n1=mix", "n1=idle")


def _checksums(work: Path) -> dict[str, str]:
    return {v["id"]: v["checksum"] for record in sorted((work / "extract").glob("shard-*.json"))
            for v in json.loads(record.read_text())["videos"]}


def test_extract_array_completes_and_equals_the_local_run(slurm_cluster, tiny_synthetic, tmp_path, capsys):
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    assert hpcvid("submit", "extract", "--config", extract_job_file(tmp_path, tiny_synthetic, on_slurm),
                  "--profile", ROOT / "slurm" / "local.toml", "--walltime", "00:10:00") == 0
    out = capsys.readouterr().out
    assert "submitted 3 job(s) on slurm" in out
    submission = _last_submission(on_slurm, "extract")
    assert [t["shard"] for t in submission["tasks"]] == [0, 1, 2]
    # the script sbatch received is the one --dry-run shows (and the golden files pin)
    from hpcvid.config import resolve_config
    from hpcvid.launch.executors import Resources, sbatch_text

    launch = resolve_config(extract_job_file(tmp_path, tiny_synthetic, on_slurm), ROOT / "slurm" / "local.toml",
                            {"launch.walltime": "00:10:00"}).launch
    base = submission["job_ids"][0].split("_")[0]
    sent = (on_slurm / "jobs" / "logs" / base / f"{base}_submission.sh").read_text()
    assert sent == sbatch_text(launch, Resources(name="hpcvid-extract"), on_slurm / submission["folder"], array=3)
    assert hpcvid("run", "extract", "--config", extract_job_file(tmp_path, tiny_synthetic, local)) == 0
    states = wait_finished(submission["job_ids"], timeout=240)
    assert {s.state for s in states.values()} == {"COMPLETED"}, states
    assert all(s.nodes.startswith("n") for s in states.values()), "the tasks ran on the fake nodes"
    expected = _checksums(local)
    assert len(expected) == 24 and _checksums(on_slurm) == expected
    table = _status(on_slurm)
    assert table.count("COMPLETED") == 3 and "3/3 jobs completed" in table
    done = sum(len(json.loads(p.read_text())["videos"]) for p in (on_slurm / "extract").glob("shard-*.json"))
    assert f"videos {done}/{done}" in table
    # a second submission finds every shard done and queues nothing
    assert hpcvid("submit", "extract", "--config", extract_job_file(tmp_path, tiny_synthetic, on_slurm),
                  "--profile", ROOT / "slurm" / "local.toml") == 0
    assert "nothing to submit" in capsys.readouterr().out


def test_cancelled_task_shows_cancelled_and_only_it_is_resubmitted(slurm_cluster, toy_stages, tmp_path, capsys):
    # shard 1 is slow enough that SLURM's KillWait (10 s) ends it: submitit ignores the SIGTERM of scancel
    work = _toy_work(tmp_path, items=3, sleep=1.0, sleep_by_shard={"1": 8.0})
    args = ("submit", "toy", "--work", work, "--shards", "3", "--profile", ROOT / "slurm" / "local.toml",
            "--walltime", "00:05:00")
    assert hpcvid(*args) == 0
    first = _last_submission(work, "toy")
    victim = first["tasks"][1]["job_id"]
    # cancel it while it runs (a task cancelled before it ever started leaves no accounting record)
    wait_until(lambda: any(s[0] == "1" for s in _started(work)), 90, "shard 1 to start")
    subprocess.run(["scancel", victim], check=True)
    wait_finished(first["job_ids"], timeout=120)
    table = _status(work)
    row = next(line for line in table.splitlines() if "0001-of-0003" in line)
    assert "CANCELLED" in row, table
    assert table.count("COMPLETED") == 2
    before = [s for s in _started(work) if s[0] != "1"]
    (work / "toy.json").write_text(json.dumps({"items": 3, "sleep": 0.0}))  # the rerun need not be slow
    capsys.readouterr()
    assert hpcvid(*args) == 0
    second = _last_submission(work, "toy")
    assert [t["shard"] for t in second["tasks"]] == [1], "only the cancelled shard is queued again"
    wait_finished(second["job_ids"], timeout=120)
    assert all((work / "toy" / f"shard-000{i}-of-0003.json").exists() for i in range(3))
    assert [s for s in _started(work) if s[0] != "1"] == before, "finished shards must not run again"
    table = _status(work)
    assert table.count("COMPLETED") == 3 and "CANCELLED" not in table


def test_pre_timeout_signal_requeues_and_the_rerun_redoes_only_the_item_in_flight(
        slurm_cluster, toy_stages, tmp_path):
    """SIGUSR2 is what SLURM sends signal_delay_s before the walltime (sent here with scancel -s
    USR2, because the real one can arrive up to 60 s early); submitit checkpoints and requeues the job."""
    work = _toy_work(tmp_path, items=6, sleep=1.5)
    assert hpcvid("submit", "toy", "--work", work, "--shards", "1", "--profile", ROOT / "slurm" / "local.toml",
                  "--walltime", "00:05:00", "--signal-delay", "60") == 0
    job_id = _last_submission(work, "toy")["job_ids"][0]
    wait_until(lambda: len(_started(work)) >= 3, 90, "three items to start")
    subprocess.run(["scancel", "-s", "USR2", job_id], check=True)
    wait_until(lambda: job_states([job_id]).get(job_id) is not None and job_states([job_id])[job_id].requeues >= 1,
               60, "the job to be requeued")
    states = wait_finished([job_id], timeout=180)
    assert states[job_id].state == "COMPLETED" and states[job_id].requeues == 1
    started = _started(work)
    items = [s[1] for s in started]
    assert sorted(set(items)) == [f"item{i:05d}" for i in range(6)]
    redone = [item for item in set(items) if items.count(item) > 1]
    assert len(redone) <= 1, f"more than the item in flight was redone: {redone}"
    assert {s[2] for s in started} == {"0", "1"}, "the second half must run in the requeued job"
    sacct = subprocess.run(["sacct", "-n", "-P", "-D", "-X", "-o", "State", "-j", job_id], capture_output=True,
                           text=True, check=True).stdout.split()
    assert sacct == ["REQUEUED", "COMPLETED"] and "TIMEOUT" not in sacct
    assert "requeued 1x" in _status(work)


def _chain_job_file(tmp_path: Path, work: Path, shards: int = 2) -> Path:
    job = tmp_path / "chain.toml"
    job.write_text(f'work = "{work}"\n[extract]\nshards = {shards}\n[launch]\nexecutor = "slurm"\n'
                   'partition = "debug"\ncpus_per_task = 1\nwalltime = "00:10:00"\nsignal_delay_s = 60\n')
    return job


def _submit_chain(job: Path) -> None:
    """toy -> toymerge through the graph submission `submit pipeline` uses (the study's own stages are slower)."""
    from hpcvid.config import resolve_config
    from hpcvid.launch.pipeline import Node, submit_graph

    submit_graph(resolve_config(job), [Node("toy"), Node("toymerge", after=("toy",))], argv=["hpcvid", "test"])


def test_dependency_chain_runs_in_order_and_a_failure_is_named_then_picked_up(
        slurm_cluster, toy_stages, tmp_path, capsys):
    ok = _toy_work(tmp_path / "ok", items=2, sleep=1.0)
    _submit_chain(_chain_job_file(tmp_path / "ok", ok))
    bad = _toy_work(tmp_path / "bad", items=1, sleep=0.0, fail=[0])
    bad_job = _chain_job_file(tmp_path / "bad", bad)
    _submit_chain(bad_job)
    merge_ok = _last_submission(ok, "toymerge")
    toy_ok = _last_submission(ok, "toy")
    assert merge_ok["dependency"] == "afterok:" + toy_ok["job_ids"][0].split("_")[0]
    states = wait_finished(merge_ok["job_ids"] + toy_ok["job_ids"], timeout=180)
    merged = json.loads((ok / "toy" / "merged.json").read_text())
    assert merged["shards"] == 2     # the merge read both shards' records (it refuses to run without them)
    assert max(states[j].end for j in toy_ok["job_ids"]) <= states[merge_ok["job_ids"][0]].start

    merge_bad = _last_submission(bad, "toymerge")["job_ids"][0]
    failed_toy = _last_submission(bad, "toy")["tasks"][0]["job_id"]
    wait_until(lambda: job_states([merge_bad]).get(merge_bad) is not None
               and job_states([merge_bad])[merge_bad].reason == "DependencyNeverSatisfied", 120,
               "the merge to wait on a failed dependency")
    # slurmdbd records a finished job a moment after squeue forgets it; until then status says UNKNOWN
    wait_until(lambda: getattr(job_states([failed_toy]).get(failed_toy), "state", None) == "FAILED", 60,
               "SLURM's accounting to record the failed task")
    table = _status(bad)
    assert "FAILED" in next(line for line in table.splitlines() if line.startswith("toy "))
    row = next(line for line in table.splitlines() if line.startswith("toymerge"))
    assert "PENDING" in row and f"never starts: waits for toy (FAILED, job {failed_toy})" in row, table
    assert "will never start" in table
    # the cause fixed, the same submission picks up: the failed shard and the stuck merge are queued again
    (bad / "toy.json").write_text(json.dumps({"items": 1, "sleep": 0.0, "fail": []}))
    capsys.readouterr()
    _submit_chain(bad_job)
    out = capsys.readouterr().out
    assert f"cancelled 1 waiting job(s)" in out and merge_bad in out
    again = [_last_submission(bad, unit)["job_ids"] for unit in ("toy", "toymerge")]
    assert [t["shard"] for t in _last_submission(bad, "toy")["tasks"]] == [0], "only the failed shard"
    states = wait_finished(again[0] + again[1] + [merge_bad], timeout=180)
    assert states[merge_bad].state == "CANCELLED" and states[again[1][0]].state == "COMPLETED"
    assert json.loads((bad / "toy" / "merged.json").read_text())["shards"] == 2


# the session's pipeline job, with 2 extraction shards and 1 eval shard: fewer jobs, the same graph
STUDY_JOB = PIPELINE_JOB.replace("shards = 3", "shards = 2").replace("[eval]\n", "[eval]\nshards = 1\n")

STUDY_PROFILE = """\
[launch]
executor = "slurm"
partition = "debug"
cpus_per_task = 1
walltime = "00:20:00"
array_parallelism = 3
signal_delay_s = 60
[launch.train]
cpus_per_task = 2
[launch.reduce]
container = "{image}"
python = "{python}"
setup = ["echo setup ran on $(hostname) >> {log}"]
"""

FAKE_APPTAINER = """#!/bin/bash
# stands in for apptainer: notes how it was called, then runs what follows the image on the host
echo "$@" >> "{log}"
[ "$1" = exec ] || exit 2
shift
while [ "$1" != "{image}" ]; do shift; done
shift
exec "$@"
"""


def _cpus_per_task(job_id: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", job_id.split("_")[0]], capture_output=True, text=True,
                         check=True).stdout
    return int(re.search(r"CPUs/Task=(\d+)", out).group(1))


def test_the_four_model_study_runs_as_one_graph_with_per_stage_resources(slurm_cluster, tiny_synthetic, tmp_path,
                                                                         monkeypatch):
    """extract -> merge; frame and flow; twostream after both; features after frame, lstm after them; each eval
    after its training; one reduce (in a container, after its setup line) that reports all four."""
    from hpcvid.launch.pipeline import study_graph

    work, results = tmp_path / "study", tmp_path / "results"
    image, log = tmp_path / "hpcvid.sif", tmp_path / "container.log"
    image.write_text("an image")
    shim = tmp_path / "bin" / "apptainer"
    shim.parent.mkdir()
    shim.write_text(FAKE_APPTAINER.format(log=log, image=image))
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}{os.pathsep}{os.environ['PATH']}")   # sbatch passes it to the jobs
    job, profile = tmp_path / "study.toml", tmp_path / "site.toml"
    job.write_text(STUDY_JOB.format(work=work, data=tiny_synthetic))
    profile.write_text(STUDY_PROFILE.format(image=image, python=sys.executable, log=tmp_path / "setup.log"))
    assert hpcvid("submit", "pipeline", job, "--models", "frame,flow,twostream,lstm", "--profile", profile,
                  "--results", results) == 0
    graph = study_graph(("frame", "flow", "twostream", "lstm"))
    chain = {node.name: _last_submission(work, node.name.replace("/", "-")) for node in graph}
    assert _cpus_per_task(chain["extract"]["job_ids"][0]) == 1, "extraction: [launch]'s one core"
    assert _cpus_per_task(chain["train/frame"]["job_ids"][0]) == 2, "training: [launch.train]'s two"
    ids = [j for sub in chain.values() for j in sub["job_ids"]]
    states = wait_finished(ids, timeout=600)
    assert {s.state for s in states.values()} == {"COMPLETED"}, states
    for node in graph:      # every job started after the jobs of everything it reads had ended
        started = min(states[j].start for j in chain[node.name]["job_ids"])
        for upstream in node.after:
            assert max(states[j].end for j in chain[upstream]["job_ids"]) <= started, (upstream, node.name)
    summary = json.loads((results / "summary.json").read_text())
    assert sorted(summary["runs"]) == ["flow", "frame", "lstm", "twostream"]
    assert "setup ran on" in (tmp_path / "setup.log").read_text()
    called = log.read_text()
    assert f"exec --bind {work},{tiny_synthetic} {image} {sys.executable} -u -m submitit.core._submit" in called
    table = _status(work)
    assert f"{len(ids)}/{len(ids)} jobs completed" in table
    frame = next(line for line in table.splitlines() if line.startswith("train/frame"))
    assert "1/1" in frame and "best val acc" in frame


def test_more_shards_than_the_cluster_s_max_array_size_are_several_arrays_status_and_cancel_see_one_unit(
        slurm_cluster, toy_stages, tmp_path, capsys):
    """The cluster's own MaxArraySize (the shared test cluster keeps SLURM's 1001): one shard more than it
    allows, queued held (--sbatch hold) so that no task runs, then shown, cancelled and queued again."""
    from hpcvid.launch.cluster import Site

    limit = Site().limits.max_array_size
    if limit > 2000:
        pytest.skip(f"MaxArraySize is {limit} here: one array more would hold too many held jobs to be cheap")
    work = _toy_work(tmp_path, items=1)
    args = ("submit", "toy", "--work", work, "--shards", limit + 1, "--profile", ROOT / "slurm" / "local.toml",
            "--sbatch", "hold", "--sbatch", "comment=hpcvid-array-test")
    try:
        assert hpcvid(*args) == 0
        record = _last_submission(work, "toy")
        assert len(record["arrays"]) == 2 and len(record["tasks"]) == limit + 1
        assert record["tasks"][-1]["job_id"] == record["arrays"][1], "a piece of one shard is a plain job"
        table = _status(work)
        rows = [line for line in table.splitlines() if line.startswith("toy ")]
        assert len(rows) == limit + 1 and all("PENDING" in row for row in rows), rows[:3]
        assert "JobHeldUser" in rows[0] and "JobHeldUser" in rows[-1]
        capsys.readouterr()
        assert hpcvid("cancel", work) == 0
        assert f"cancelled {limit + 1} job(s)" in capsys.readouterr().out
        wait_until(lambda: not subprocess.run(["squeue", "-h", "-j", ",".join(record["arrays"])], capture_output=True,
                                              text=True).stdout.strip(), 60, "the held arrays to leave the queue")
        assert hpcvid(*args) == 0, "cancelled shards are queued again, in two arrays again"
        assert len(_last_submission(work, "toy")["arrays"]) == 2
    finally:    # never leave held jobs in a cluster others use
        arrays = [a for path in (work / "jobs").glob("toy-*.json") for a in json.loads(path.read_text())["arrays"]]
        if arrays:
            subprocess.run(["scancel", *arrays], capture_output=True)


def test_a_shard_longer_than_its_walltime_is_requeued_and_completes_without_timeout(walltime_job):
    """The real pre-timeout signal (no scancel): requeued, complete, only the item in flight redone."""
    work, job_id = walltime_job
    states = wait_finished([job_id], timeout=420)
    assert states[job_id].state == "COMPLETED" and states[job_id].requeues >= 1, states[job_id]
    sacct = subprocess.run(["sacct", "-n", "-P", "-D", "-X", "-o", "State", "-j", job_id], capture_output=True,
                           text=True, check=True).stdout.split()
    assert "TIMEOUT" not in sacct and sacct[-1] == "COMPLETED" and "REQUEUED" in sacct
    items = [s[1] for s in _started(work)]
    assert sorted(set(items)) == [f"item{i:05d}" for i in range(10)]
    redone = len(items) - len(set(items))
    assert redone <= states[job_id].requeues, f"{redone} items redone after {states[job_id].requeues} requeue(s)"
    assert json.loads((work / "toy" / "shard-0000-of-0001.json").read_text())["restart"] != "0"


def test_two_models_evaluate_side_by_side_and_merge_writes_where_asked(slurm_cluster, pipeline_work, tmp_path,
                                                                        capsys):
    """eval/frame and eval/lstm are two units: queued together, both run, status and collect show both.
    A flag that is a config key (merge --features-dir) reaches the queued job."""
    import shutil

    work, job = tmp_path / "work", pipeline_work[1]
    shutil.copytree(pipeline_work[0], work)
    features = work / "features" / "frame"
    for merged in (features / "features.h5", features / "features.json"):
        merged.unlink()
    common = ["--config", job, "--work", work, "--profile", ROOT / "slurm" / "local.toml", "--walltime", "00:10:00"]
    capsys.readouterr()
    assert hpcvid("submit", "eval", "--model", "frame", "--shards", "2", *common) == 0
    assert hpcvid("submit", "eval", "--model", "lstm", "--shards", "2", *common) == 0
    assert hpcvid("submit", "merge", "--features-dir", features, *common) == 0
    out = capsys.readouterr().out
    assert "eval/frame: submitted 2 job(s)" in out and "eval/lstm: submitted 2 job(s)" in out
    assert "already queued" not in out
    ids = [j for unit in ("eval-frame", "eval-lstm", "merge-frame") for j in _last_submission(work, unit)["job_ids"]]
    states = wait_finished(ids, timeout=300)
    assert {s.state for s in states.values()} == {"COMPLETED"}, states
    assert (features / "features.h5").is_file() and not (work / "features.h5").exists()
    table = _status(work)
    for unit in ("eval/frame", "eval/lstm"):
        rows = [line for line in table.splitlines() if line.startswith(unit + " ")]
        assert len(rows) == 2 and all("COMPLETED" in row for row in rows), table
    assert hpcvid("collect", work, "--out", tmp_path / "report") == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert sorted(summary["runs"]) == ["frame", "lstm"]
    assert all(entry["n_videos"] == 6 for entry in summary["runs"].values())


def test_submit_extract_asks_slurm_for_the_planned_walltime_and_refuses_less(slurm_cluster, tiny_synthetic, tmp_path):
    from hpcvid.config import resolve_config
    from hpcvid.workfolder import WorkFolder
    from test_planning import _tiny_job, slow_rates

    work = tmp_path / "work"
    job = _tiny_job(tmp_path, tiny_synthetic, work)
    site = tmp_path / "site.toml"          # a profile that leaves the walltime to the plan
    site.write_text('[launch]\nexecutor = "slurm"\npartition = "debug"\ncpus_per_task = 1\n')
    assert hpcvid("index", "--config", job) == 0
    WorkFolder(work).rates.write_text(json.dumps(slow_rates(resolve_config(job)).to_dict()))
    assert hpcvid("submit", "extract", "--config", job, "--profile", site, "--walltime", "00:05:00") == 2
    assert not (work / "jobs").exists()
    assert hpcvid("submit", "extract", "--config", job, "--profile", site) == 0
    ids = _last_submission(work, "extract")["job_ids"]
    base = ids[0].split("_")[0]
    try:
        shown = subprocess.run(["scontrol", "show", "job", base], capture_output=True, text=True, check=True).stdout
        limits = {field for field in shown.split() if field.startswith("TimeLimit=")}
        assert limits == {"TimeLimit=00:10:00"}, limits
    finally:
        subprocess.run(["scancel", base], check=False)
