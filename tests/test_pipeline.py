"""The study as one dependency graph, and job arrays split at MaxArraySize, with SLURM faked at its commands:
an sbatch on PATH that keeps the scripts (submitit's own submission code runs), and canned answers of
scontrol, sinfo, sacct, squeue and scancel at hpcvid's one command gateway."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from slurm_helpers import fake_sbatch, hpcvid, toy_stages  # noqa: F401 (fixtures)

SCONTROL = "Configuration data as of 2026-12-01T20:46:20\nMaxArraySize            = {size}\nMaxJobCount             = {jobs}\n"


class Cluster:
    """Canned answers at ``run_command``; ``jobs`` maps job ids to (state, reason) for sacct and squeue."""

    def __init__(self, max_array_size: int = 1001, max_job_count: int = 10000):
        self.limits = SCONTROL.format(size=max_array_size, jobs=max_job_count)
        self.jobs: dict[str, tuple[str, str]] = {}
        self.calls: list[list[str]] = []

    def __call__(self, argv, **kwargs):
        argv = list(argv)
        self.calls.append(argv)
        answers = {"scontrol": self.limits, "sinfo": "debug*\nlong\n", "scancel": "", "sbatch": "", "git": "",
                   "sacct": "".join(f"{j}|{s}|0:0|a|b|c|n1\n" for j, (s, _) in self.jobs.items()),
                   "squeue": "".join(f"{j}|{s}|{r}\n" for j, (s, r) in self.jobs.items() if s in ("PENDING", "RUNNING"))}
        if argv[0] not in answers:
            raise AssertionError(f"unexpected command {argv}")
        return subprocess.CompletedProcess(argv, 0, answers[argv[0]], "")

    def install(self, monkeypatch) -> "Cluster":
        from hpcvid.launch import external, scheduler

        monkeypatch.setattr(external, "run_command", self)
        monkeypatch.setattr(scheduler, "run_command", self)
        return self


def _records(work: Path) -> dict[str, dict]:
    """The newest submission record of each unit."""
    latest = {}
    for path in sorted((work / "jobs").glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
        record = json.loads(path.read_text())
        latest[record["unit"]] = record
    return latest


def _sbatch_line(folder: Path, job: str, name: str) -> str:
    match = re.search(rf"^#SBATCH --{name}=(.*)$", (folder / f"{job.split('_')[0]}.sh").read_text(), re.M)
    return match.group(1) if match else ""


# ------------------------------------------------------------------------------------------ the graph
def test_the_study_graph_for_four_models():
    from hpcvid.launch.pipeline import study_graph

    graph = {node.name: node.after for node in study_graph(("lstm", "twostream", "flow", "frame"))}
    assert list(graph) == ["extract", "merge", "train/frame", "train/flow", "train/twostream", "features/frame",
                           "train/lstm", "eval/frame", "eval/flow", "eval/twostream", "eval/lstm", "reduce"]
    assert graph["train/frame"] == graph["train/flow"] == ("extract",), "frame and flow run side by side"
    assert graph["train/twostream"] == ("extract", "train/frame", "train/flow")
    assert graph["features/frame"] == ("train/frame",) and graph["train/lstm"] == ("features/frame",)
    assert graph["eval/lstm"] == ("train/lstm",) and graph["merge"] == ("extract",)
    assert graph["reduce"] == ("eval/frame", "eval/flow", "eval/twostream", "eval/lstm")


def test_the_other_kinds_train_after_extract_and_are_chosen_by_name():
    from hpcvid.config import PipelineConfig
    from hpcvid.launch.pipeline import study_graph

    assert PipelineConfig().models == ("frame", "flow", "twostream", "lstm")     # the default study stays the four
    graph = {node.name: node.after for node in study_graph(("cnnlstm", "tsn_flow", "frame", "c3d", "tsn_rgb"))}
    assert [name for name in graph if name.startswith("train/")] == ["train/frame", "train/tsn_rgb", "train/tsn_flow",
                                                                      "train/c3d", "train/cnnlstm"]
    assert all(graph[f"train/{m}"] == ("extract",) for m in ("tsn_rgb", "tsn_flow", "c3d", "cnnlstm"))
    assert graph["reduce"] == ("eval/frame", "eval/tsn_rgb", "eval/tsn_flow", "eval/c3d", "eval/cnnlstm")


def test_the_study_s_stages_are_the_stage_table_s_order():
    from hpcvid.launch.pipeline import STUDY_STAGES
    from hpcvid.stages import PIPELINE_ORDER, STAGES

    assert STUDY_STAGES == PIPELINE_ORDER and set(STUDY_STAGES) <= set(STAGES)


def test_smaller_studies_and_stage_subsets():
    from hpcvid.errors import ConfigError
    from hpcvid.launch.pipeline import study_graph

    lstm_only = {node.name: node.after for node in study_graph(["lstm"])}
    assert lstm_only["train/lstm"] == ("merge",) and "features/frame" not in lstm_only
    assert {n.name: n.after for n in study_graph(["twostream"])}["train/twostream"] == ("extract",)
    later = [node.name for node in study_graph(["frame", "flow"], stages=["eval", "reduce"])]
    assert later == ["eval/frame", "eval/flow", "reduce"]
    reduce = study_graph(["frame"], report_runs=["frame", "old"])[-1]
    assert dict(reduce.settings)["report.runs"] == ("frame", "old")
    with pytest.raises(ConfigError, match="pipeline.stages: unknown stage.s. predict; choose from extract"):
        study_graph(["frame"], stages=["extract", "predict"])


# ------------------------------------------------------------------------------------------ the pipeline
JOB = """work = "{work}"
[dataset]
root = "{data}"
[extract]
shards = 2
[eval]
shards = 1
[launch]
executor = "slurm"
partition = "debug"
cpus_per_task = 1
[launch.train]
cpus_per_task = 2
sbatch = {{constraint = "a100"}}
"""


def test_submit_pipeline_queues_the_graph_with_per_stage_resources_then_picks_up_after_a_failure(
        tmp_path, tiny_synthetic, fake_sbatch, monkeypatch, capsys):
    from hpcvid.fileio import atomic_write_json
    from hpcvid.launch.sharding import ShardSpec
    from hpcvid.workfolder import Unit, WorkFolder

    cluster = Cluster().install(monkeypatch)
    work = tmp_path / "work"
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(work=work, data=tiny_synthetic))
    monkeypatch.setattr("sys.argv", ["/venv/bin/hpcvid", "submit", "pipeline", str(job)])   # what records keep
    assert hpcvid("submit", "pipeline", job) == 0
    first = _records(work)
    ids = {unit: record["job_ids"][0].split("_")[0] for unit, record in first.items()}
    assert list(ids) == ["extract", "merge", "train/frame", "train/flow", "train/twostream", "features/frame", "train/lstm", "eval/frame", "eval/flow", "eval/twostream", "eval/lstm",
                         "reduce"]
    after = {unit: record["dependency"] for unit, record in first.items()}
    assert after["extract"] == "" and after["train/flow"] == f"afterok:{ids['extract']}"
    assert after["train/twostream"] == f"afterok:{ids['extract']}:{ids['train/frame']}:{ids['train/flow']}"
    assert after["train/lstm"] == f"afterok:{ids['features/frame']}"
    assert after["reduce"] == "afterok:" + ":".join(ids[f"eval/{m}"] for m in ("frame", "flow", "twostream", "lstm"))
    # each stage asked for its own resources; the script sbatch got says so
    assert _sbatch_line(fake_sbatch, ids["extract"], "cpus-per-task") == "1"
    assert _sbatch_line(fake_sbatch, ids["extract"], "array") == "0-1%2"
    assert _sbatch_line(fake_sbatch, ids["train/flow"], "cpus-per-task") == "2"
    assert _sbatch_line(fake_sbatch, ids["train/flow"], "constraint") == "a100"
    assert _sbatch_line(fake_sbatch, ids["eval/flow"], "constraint") == ""
    assert _sbatch_line(fake_sbatch, ids["reduce"], "dependency") == after["reduce"]

    # The jobs ran: extract, merge, frame, features, lstm and their evals completed and wrote their records;
    # train/flow FAILED, so twostream waits for ever, and eval/flow, eval/twostream, reduce wait behind them.
    folder = WorkFolder(work)
    for unit, count in (("extract", 2), ("features/frame", 2), ("eval/frame", 1), ("eval/lstm", 1)):
        current = folder.current_set(Unit.parse(unit))
        for index in range(count):
            atomic_write_json(folder.record_file(Unit.parse(unit), ShardSpec(index, count)), {"set": current.id})
    for unit in ("merge", "train/frame", "train/lstm"):
        atomic_write_json(folder.record_file(Unit.parse(unit), ShardSpec(0, 1)), {"done": True})
    states = {unit: ("COMPLETED", "None") for unit in ids}
    states.update({"train/flow": ("FAILED", "None"), "train/twostream": ("PENDING", "DependencyNeverSatisfied"),
                   "eval/flow": ("PENDING", "DependencyNeverSatisfied"), "eval/twostream": ("PENDING", "Dependency"),
                   "reduce": ("PENDING", "Dependency")})
    cluster.jobs = {job_id: states[unit] for unit, record in first.items() for job_id in record["job_ids"]}
    capsys.readouterr()
    assert hpcvid("status", work) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("eval/twostream"))
    assert f"never starts: waits for train/flow (FAILED, job {ids['train/flow']})" in row, table
    assert "will never start" in table and f"\n  hpcvid submit pipeline {job}\n" in table, table


    cluster.calls.clear()
    assert hpcvid("submit", "pipeline", job) == 0
    out = capsys.readouterr().out
    second = _records(work)
    requeued = sorted(unit for unit in second if second[unit]["job_ids"] != first[unit]["job_ids"])
    assert requeued == ["eval/flow", "eval/twostream", "reduce", "train/flow", "train/twostream"], out
    scancel = [call for call in cluster.calls if call[0] == "scancel"]
    assert scancel == [["scancel", *sorted((ids[u] for u in ("train/twostream", "eval/flow", "eval/twostream",
                                                              "reduce")), key=lambda s: (len(s), s))]]
    new = {unit: second[unit]["job_ids"][0] for unit in requeued}
    assert second["train/flow"]["dependency"] == "", "extract is done: nothing to wait for"
    assert second["train/twostream"]["dependency"] == f"afterok:{new['train/flow']}"
    assert second["reduce"]["dependency"] == f"afterok:{new['eval/flow']}:{new['eval/twostream']}"
    assert "train/frame: done (job" in out
    assert [call[0] for call in cluster.calls].count("sacct") == 1, "SLURM is asked once about every earlier job"


def test_a_typo_in_one_stage_s_sbatch_options_queues_nothing(tmp_path, tiny_synthetic, fake_sbatch, monkeypatch,
                                                            capsys):
    Cluster().install(monkeypatch)
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(work=tmp_path / "work", data=tiny_synthetic).replace("constraint", "constrain"))
    assert hpcvid("submit", "pipeline", job, "--models", "frame") == 2
    err = capsys.readouterr().err
    assert "train/frame: launch.sbatch.constrain: sbatch has no option --constrain; did you mean constraint" in err
    assert not list(fake_sbatch.glob("*.sh")) and not (tmp_path / "work" / "jobs").exists()


# ------------------------------------------------------------------------------------------ array limits
def test_more_shards_than_max_array_size_are_queued_as_several_arrays_and_handled_as_one_unit(
        tmp_path, toy_stages, fake_sbatch, monkeypatch, capsys):
    cluster = Cluster(max_array_size=4).install(monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    (work / "toy.json").write_text(json.dumps({"items": 1, "sleep": 0.0}))
    args = ("submit", "toy", "--work", work, "--shards", "10", "--executor", "slurm", "--array-parallelism", "6")
    assert hpcvid(*args) == 0
    assert "as 3 job arrays (this cluster's MaxArraySize): 100 101 102" in capsys.readouterr().out
    record = _records(work)["toy"]
    assert record["arrays"] == ["100", "101", "102"]
    assert [t["job_id"] for t in record["tasks"]] == [f"{a}_{i}" for a, n in (("100", 4), ("101", 4), ("102", 2))
                                                      for i in range(n)]
    assert [t["shard"] for t in record["tasks"]] == list(range(10))
    assert [_sbatch_line(fake_sbatch, a, "array") for a in ("100", "101", "102")] == ["0-3%2", "0-3%2", "0-1%2"], \
        "the arrays share the profile's parallelism (6 over 3 arrays)"
    assert [call[:2] for call in cluster.calls].count(["scontrol", "show"]) == 1, "the limits are read once"

    # status and cancel see one unit of 10 shards across the three arrays
    cluster.jobs = {f"{a}_{i}": ("PENDING", "JobArrayTaskLimit") for a, n in (("100", 4), ("101", 4), ("102", 2))
                    for i in range(n)}
    cluster.jobs["100_0"] = ("RUNNING", "None")
    capsys.readouterr()
    assert hpcvid("status", work) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("toy ")]
    assert len(rows) == 10 and sum("PENDING" in row for row in rows) == 9
    assert hpcvid("cancel", work) == 0
    assert [call for call in cluster.calls if call[0] == "scancel"][-1][1:] == sorted(
        cluster.jobs, key=lambda s: (len(s), s))
    assert "cancelled 10 job(s)" in capsys.readouterr().out
    # cancelled: a second submit queues every shard again, again as three arrays
    cluster.jobs = {job_id: ("CANCELLED", "None") for job_id in cluster.jobs}
    assert hpcvid(*args) == 0
    assert _records(work)["toy"]["arrays"] == ["103", "104", "105"]


def test_more_jobs_than_max_job_count_are_refused_before_sbatch(tmp_path, toy_stages, fake_sbatch, monkeypatch,
                                                                 capsys):
    Cluster(max_array_size=4, max_job_count=9).install(monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    (work / "toy.json").write_text(json.dumps({"items": 1, "sleep": 0.0}))
    assert hpcvid("submit", "toy", "--work", work, "--shards", "10", "--executor", "slurm") == 2
    assert "10 jobs exceed this cluster's MaxJobCount (9" in capsys.readouterr().err
    assert not list(fake_sbatch.glob("*.sh"))


def test_dry_run_shows_each_array_of_a_split(tmp_path, toy_stages, monkeypatch, capsys):
    Cluster(max_array_size=4).install(monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    (work / "toy.json").write_text(json.dumps({"items": 1, "sleep": 0.0}))
    assert hpcvid("submit", "toy", "--work", work, "--shards", "6", "--executor", "slurm", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "# toy: shard(s) 0000-of-0006 .. 0003-of-0006, array 1 of 2" in out and "#SBATCH --array=0-3%4" in out
    assert "# toy: shard(s) 0004-of-0006 .. 0005-of-0006, array 2 of 2" in out and "#SBATCH --array=0-1%2" in out
