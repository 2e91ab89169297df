"""The launcher without a cluster: sbatch text (golden), validation before sbatch, records, local executors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_helpers import hpcvid, toy_stages, wait_until  # noqa: F401 (fixture)

GOLDEN = Path(__file__).parent / "golden"


def _toy_work(tmp_path: Path, items: int = 2, sleep: float = 0.0, fail=()) -> Path:
    work = tmp_path / "work"
    work.mkdir(parents=True)
    (work / "toy.json").write_text(json.dumps({"items": items, "sleep": sleep, "fail": list(fail)}))
    return work


# ------------------------------------------------------------------------------------------ sbatch text
def test_sbatch_text_of_an_array_matches_the_golden_file():
    from hpcvid.config import LaunchConfig
    from hpcvid.launch.executors import Resources, sbatch_text

    launch = LaunchConfig(executor="slurm", partition="debug", account="proj1", qos="normal", gres="gpu:2",
                          cpus_per_task=4, mem="16G", walltime="02:30:00", array_parallelism=4, signal_delay_s=120)
    text = sbatch_text(launch, Resources(name="hpcvid-extract", dependency="afterok:12"),
                       Path("/W/jobs/logs/%j"), array=12)
    assert text.replace(sys.executable, "<PYTHON>") == (GOLDEN / "sbatch_extract_array.txt").read_text()


def test_sbatch_text_of_a_multi_node_training_job_matches_the_golden_file():
    from hpcvid.config import LaunchConfig
    from hpcvid.launch.executors import Resources, sbatch_text

    text = sbatch_text(LaunchConfig(executor="slurm", walltime="08:00:00"),
                       Resources(name="hpcvid-train", nodes=2, tasks_per_node=4, gpus_per_node=4),
                       Path("/W/jobs/logs/%j"))
    assert text.replace(sys.executable, "<PYTHON>") == (GOLDEN / "sbatch_train_2x4.txt").read_text()


def test_dry_run_prints_the_script_and_queues_nothing(tmp_path, toy_stages, capsys):
    work = _toy_work(tmp_path)
    assert hpcvid("submit", "toy", "--work", work, "--shards", "3", "--executor", "slurm",
                  "--walltime", "00:10:00", "--partition", "long", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-2%3" in out and "#SBATCH --partition=long" in out and "--time=10" in out
    assert not (work / "jobs").exists()


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("flags, message", [
    (["--walltime", "2h"], "launch.walltime"),
    (["--walltime", "00:61:00"], "launch.walltime"),
    (["--shards", "-1"], "extract.shards"),
    (["--shards", "0"], "extract.shards"),
    (["--gres", "gpu::"], "launch.gres"),
    (["--mem", "lots"], "launch.mem"),
    (["--executor", "pbs"], "launch.executor"),
    (["--walltime", "00:01:00", "--signal-delay", "90"], "signal_delay_s"),
])
def test_bad_launch_settings_fail_before_sbatch(tmp_path, toy_stages, capsys, monkeypatch, flags, message):
    from hpcvid.launch import external as commands

    def no_commands(*args, **kwargs):  # nothing may reach sbatch/sinfo
        raise AssertionError(f"ran {args}")

    monkeypatch.setattr(commands, "run_command", no_commands)
    work = _toy_work(tmp_path)
    assert hpcvid("submit", "toy", "--work", work, "--executor", "slurm", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (work / "jobs").exists()


def test_unknown_key_in_a_cluster_profile_names_the_key_and_the_file(tmp_path, toy_stages, capsys):
    profile = tmp_path / "cluster.toml"
    profile.write_text('[launch]\nexecutor = "slurm"\npartiton = "gpu"\n')
    assert hpcvid("submit", "toy", "--work", _toy_work(tmp_path), "--profile", profile) == 2
    err = capsys.readouterr().err
    assert "unknown key launch.partiton" in err and str(profile) in err and "partition" in err


def test_unknown_partition_is_refused_with_the_cluster_s_partitions(tmp_path, toy_stages, capsys, monkeypatch):
    from hpcvid.launch import external as commands

    def fake_sinfo(argv, **kwargs):
        assert argv[0] == "sinfo"
        return subprocess.CompletedProcess(argv, 0, "debug*\nlong\n", "")

    monkeypatch.setattr(commands, "run_command", fake_sinfo)
    assert hpcvid("submit", "toy", "--work", _toy_work(tmp_path), "--executor", "slurm", "--partition", "gpu") == 2
    err = capsys.readouterr().err
    assert "launch.partition = 'gpu' does not exist" in err and "debug, long" in err


def test_profiles_in_the_repository_resolve():
    from hpcvid.config import resolve_config

    root = Path(__file__).resolve().parents[1]
    local = resolve_config(profile=root / "slurm" / "local.toml")
    assert local.launch.executor == "slurm" and local.launch.partition == "debug"
    example = resolve_config(profile=root / "slurm" / "example.toml")
    assert example.launch.account and example.launch.walltime


# ------------------------------------------------------------------------------------------ local executors
def test_run_with_jobs_uses_local_processes_and_matches_in_process(tmp_path, toy_stages):
    serial, parallel = _toy_work(tmp_path / "a"), _toy_work(tmp_path / "b")
    assert hpcvid("run", "toy", "--work", serial, "--shards", "3") == 0
    assert hpcvid("run", "toy", "--work", parallel, "--shards", "3", "--jobs", "2") == 0
    names = sorted(p.relative_to(serial).as_posix() for p in (serial / "toy").rglob("*.txt"))
    assert len(names) == 6
    assert names == sorted(p.relative_to(parallel).as_posix() for p in (parallel / "toy").rglob("*.txt"))
    assert list((parallel / "jobs" / "logs").iterdir()), "the shards did not run through submitit"


@pytest.mark.slow
def test_submit_local_returns_at_once_and_status_reads_the_record(tmp_path, toy_stages, capsys):
    work = _toy_work(tmp_path, items=2, sleep=0.5)
    assert hpcvid("submit", "toy", "--work", work, "--shards", "2", "--executor", "local") == 0
    assert "submitted 2 job(s) on local" in capsys.readouterr().out
    record = json.loads(next((work / "jobs").glob("toy-*.json")).read_text())
    assert [t["name"] for t in record["tasks"]] == ["0000-of-0002", "0001-of-0002"]
    assert record["executor"] == "local" and record["argv"] and record["folder"]
    wait_until(lambda: all((work / "toy" / f"shard-000{i}-of-0002.json").exists() for i in range(2)), 60,
               "the local jobs")
    capsys.readouterr()
    assert hpcvid("status", work) == 0
    out = capsys.readouterr().out
    assert out.count("COMPLETED") == 2 and "2/2" in out
    # a second submission finds nothing to do
    assert hpcvid("submit", "toy", "--work", work, "--shards", "2", "--executor", "local") == 0
    assert "nothing to submit" in capsys.readouterr().out


def test_local_jobs_share_the_cores_instead_of_oversubscribing(tmp_path, monkeypatch):
    """N local shard processes get cores // N CPU threads each (at least 1), not all cores each."""
    from types import SimpleNamespace

    import submitit

    from hpcvid.config import resolve_config
    from hpcvid.launch import executors as launch
    from hpcvid.launch.sharding import all_shards
    from toystage import TOY

    caps: list[int] = []

    class Recording:  # stands in for the local executor: records each job's cap, runs nothing
        def __init__(self, folder) -> None:
            pass

        def update_parameters(self, **kwargs) -> None:
            pass

        def submit(self, job):
            caps.append(job.threads)
            return SimpleNamespace(done=lambda: True, result=lambda: {"index": job.index})

    monkeypatch.setattr(submitit, "LocalExecutor", Recording)
    monkeypatch.setattr(launch, "usable_cores", lambda: 4)
    config = resolve_config(overrides={"work": str(tmp_path)})
    assert launch.run_shards_locally(config, TOY, all_shards(3), jobs=2) == [{"index": i} for i in range(3)]
    launch.run_shards_locally(config, TOY, all_shards(1), jobs=2)
    launch.run_shards_locally(config, TOY, all_shards(8), jobs=8)
    assert caps == [2, 2, 2, 4] + [1] * 8


def test_limit_threads_caps_torch_and_opencv_in_a_fresh_process():
    import subprocess
    import sys

    code = ("from hpcvid.launch.executors import limit_threads; limit_threads(1); import cv2, torch; "
            "print(torch.get_num_threads(), cv2.getNumThreads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1"]


def test_debug_executor_runs_in_process(tmp_path, toy_stages):
    work = _toy_work(tmp_path)
    assert hpcvid("submit", "toy", "--work", work, "--shards", "2", "--executor", "debug") == 0
    assert (work / "toy" / "shard-0001-of-0002.json").exists()


def test_shard_job_checkpoint_requeues_the_same_shard_without_force(monkeypatch):
    from hpcvid.launch.executors import ShardJob
    from hpcvid.launch.sharding import ShardSpec
    from toystage import TOY

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    job = ShardJob(TOY, {"work": "/w"}, 2, 5, force=True)
    assert job.spec == ShardSpec(2, 5, force=True)
    again = job.checkpoint().function
    assert again.spec == ShardSpec(2, 5) and again.stage == TOY   # the rerun resumes; it does not start over
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")                 # requeued by SLURM itself (node failure)
    assert job.spec == ShardSpec(2, 5)


@pytest.mark.parametrize("skip", [False, True])
def test_a_job_process_ends_without_the_last_collections(skip):
    """Python's collections at exit cost a job process with torch loaded about a second; after
    exit_without_collecting they do not run (a garbage cycle's finalizer shows whether they did), while exit
    handlers still run and an object dropped during the run is still finalized at once."""
    code = """if True:
        import atexit, gc, sys
        from hpcvid.launch.executors import exit_without_collecting
        gc.disable()            # only the collections at exit may find the cycle
        class Loud:
            def __init__(self, name):
                self.name, self.me = name, self
            def __del__(self):
                print(self.name, "finalized", flush=True)
        if sys.argv[1] == "True":
            exit_without_collecting()
        atexit.register(print, "exit handler ran", flush=True)
        dropped = Loud("dropped")
        dropped.me = None
        del dropped
        cycle = Loud("cycle")
        del cycle
        """
    out = subprocess.run([sys.executable, "-c", code, str(skip)], capture_output=True, text=True,
                         check=True).stdout
    assert "exit handler ran" in out and "dropped finalized" in out
    assert ("cycle finalized" in out) is not skip


def test_status_without_submissions_is_a_clear_error(tmp_path, capsys):
    assert hpcvid("status", tmp_path) == 2
    assert "nothing was submitted" in capsys.readouterr().err


def test_help_does_not_import_submitit():
    code = "import sys; from hpcvid.cli import build_parser; build_parser(); print('submitit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("flags, key", [(["--nodes", "0"], "launch.nodes"),
                                        (["--gpus-per-node", "-1"], "launch.gpus_per_node"),
                                        (["--tasks-per-node", "-1"], "launch.tasks_per_node")])
def test_bad_training_allocation_is_refused(tmp_path, capsys, flags, key):
    assert hpcvid("submit", "train", "--work", tmp_path, "--executor", "slurm", "--dry-run", *flags) == 2
    err = capsys.readouterr().err
    assert key in err and "the command line" in err and err.count("\n") == 1


def test_training_dry_run_shows_nodes_tasks_and_gpus(tmp_path, capsys):
    assert hpcvid("submit", "train", "--work", tmp_path, "--executor", "slurm", "--dry-run", "--nodes", "2",
                  "--gpus-per-node", "4", "--walltime", "08:00:00") == 0
    out = capsys.readouterr().out
    assert "--nodes=2" in out and "--ntasks-per-node=4" in out and "--gpus-per-node=4" in out and "--time=480" in out


@pytest.mark.slow
def test_status_of_a_failed_local_shard_says_stopped(tmp_path, toy_stages, capsys):
    work = _toy_work(tmp_path, items=1, fail=[0])
    assert hpcvid("submit", "toy", "--work", work, "--shards", "2", "--executor", "local") == 0
    wait_until(lambda: (work / "toy" / "shard-0001-of-0002.json").exists(), 60, "the good shard")
    record = json.loads(next((work / "jobs").glob("toy-*.json")).read_text())

    def ended() -> bool:  # this test process started the job (in-process CLI): reap it like init would
        pid = int(record["tasks"][0]["job_id"])
        try:
            return os.waitpid(pid, os.WNOHANG)[0] == pid
        except ChildProcessError:
            return True

    wait_until(ended, 60, "the failing shard's process to end")
    capsys.readouterr()
    assert hpcvid("status", work) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("toy")}
    assert "STOPPED" in rows["0000-of-0002"] and "COMPLETED" in rows["0001-of-0002"]


def test_submit_means_slurm_unless_a_file_or_flag_says_otherwise(tmp_path, toy_stages, capsys):
    from hpcvid.cli.submit import launch_overrides
    import argparse

    work = _toy_work(tmp_path)
    assert launch_overrides(argparse.Namespace(executor=None, config=None, profile=None))["launch.executor"] == "slurm"
    profile = tmp_path / "here.toml"
    profile.write_text('[launch]\nexecutor = "local"\n')
    assert launch_overrides(argparse.Namespace(executor=None, config=None, profile=str(profile))) \
        .get("launch.executor") is None, "the profile's executor must not be overridden"
    assert hpcvid("submit", "toy", "--work", work, "--shards", "2", "--dry-run") == 0
    assert "#SBATCH --array=0-1%2" in capsys.readouterr().out


def test_training_with_a_missing_weights_file_is_refused_before_sbatch(tmp_path, capsys):
    missing = tmp_path / "resnet18-imagenet.pth"
    assert hpcvid("submit", "train", "--work", tmp_path, "--executor", "slurm", "--dry-run", "--model", "frame",
                  "--backbone", "resnet18", "--weights", missing) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err
    assert not (tmp_path / "jobs").exists()


def test_queued_shard_jobs_are_capped_at_the_allocation_s_cpus(tmp_path, monkeypatch):
    """On a node with more cores than the job's cpus_per_task, torch would otherwise start a thread per core."""
    import contextlib

    from hpcvid.config import resolve_config
    from hpcvid.launch import executors as launch
    from hpcvid.launch.sharding import all_shards
    from hpcvid.stages import STAGES

    submitted = []

    class CapturingExecutor:
        def submit(self, job):
            submitted.append(job)
            return type("Job", (), {"job_id": str(len(submitted)), "result": lambda self: None})()

        def batch(self):
            return contextlib.nullcontext()

    monkeypatch.setattr(launch, "make_executor", lambda folder, cfg, resources: CapturingExecutor())
    for executor, expected in (("slurm", 3), ("debug", 0)):
        submitted.clear()
        config = resolve_config(overrides={"work": str(tmp_path / executor), "launch.executor": executor,
                                           "launch.cpus_per_task": 3})
        launch.submit_shards(config, STAGES["extract"], all_shards(2), launch.Resources(name="x"), ["t"])
        assert [job.threads for job in submitted] == [expected, expected]


# ------------------------------------------------------------------------------------------ site profiles
def _site_stage(stage: str, array: int = 0, **overrides) -> str:
    """The sbatch text of one stage under slurm/example.toml (every key of the profile shows in it)."""
    from hpcvid.config import resolve_config
    from hpcvid.launch.executors import resources_for, sbatch_text
    from hpcvid.stages import STAGES

    root = Path(__file__).resolve().parents[1]
    config = resolve_config(profile=root / "slurm" / "example.toml",
                            overrides={"work": "/W", "dataset.root": "/D", **overrides}).for_stage(stage)
    resources = resources_for(STAGES[stage], config, "afterok:41", name=f"hpcvid-{stage}")
    return sbatch_text(config.launch, resources, Path("/W/jobs/logs/%j"), array=array).replace(sys.executable,
                                                                                              "<PYTHON>")


def test_sbatch_text_of_the_example_profile_s_extract_stage_matches_the_golden_file():
    """[launch] defaults (account, setup lines, mail options) with [launch.extract]'s cpus, memory, walltime."""
    assert _site_stage("extract", array=12) == (GOLDEN / "sbatch_example_extract.txt").read_text()


def test_sbatch_text_of_the_example_profile_s_training_stage_matches_the_golden_file():
    """[launch.train]: GPU partition, an Apptainer image with --nv and the folders bound, its own setup line,
    and sbatch options merged into [launch]'s option by option."""
    assert _site_stage("train") == (GOLDEN / "sbatch_example_train.txt").read_text()


@pytest.mark.parametrize("stage, lines", [
    ("merge", ["--cpus-per-task=2", "--time=60", "--partition=cpu", "--mem=16G"]),
    ("features", ["--cpus-per-task=4", "--time=120", "--partition=gpu", "--gpus-per-node=1"]),
    ("eval", ["--cpus-per-task=4", "--time=60", "--partition=gpu", "--gpus-per-node=1"]),
    ("reduce", ["--cpus-per-task=1", "--time=30", "--partition=cpu", "--mem=4G"]),
])
def test_every_stage_table_of_the_example_profile_reaches_its_script(stage, lines):
    text = _site_stage(stage)
    for line in lines + ["--mail-type=END,FAIL", "--signal=USR2@120", "--account=my-project"]:
        assert f"#SBATCH {line}\n" in text, (stage, line)
    assert "apptainer" not in text and "module load python/3.11" in text, "only [launch.train] has the container"
    assert "--constraint" not in text and "--exclusive" not in text


def test_the_example_profile_s_requeue_and_executor_settings():
    from hpcvid.config import resolve_config

    launch = resolve_config(profile=Path(__file__).resolve().parents[1] / "slurm" / "example.toml").launch
    assert (launch.executor, launch.max_requeues, launch.qos, launch.container_runtime) == ("slurm", 3, "", "apptainer")


def test_a_flag_wins_over_every_stage_table():
    assert "#SBATCH --time=15\n" in _site_stage("train", **{"launch.walltime": "00:15:00"})
    assert "#SBATCH --time=15\n" in _site_stage("extract", **{"launch.walltime": "00:15:00"})


def test_a_typo_in_an_sbatch_option_is_refused_before_sbatch_runs(tmp_path, toy_stages, capsys, monkeypatch):
    from hpcvid.launch import external

    asked = []

    def only_sbatch_help(argv, **kwargs):   # nothing but `sbatch --help` may run: no job is queued
        asked.append(list(argv))
        assert list(argv) == ["sbatch", "--help"], f"ran {argv}"
        return subprocess.CompletedProcess(argv, 0, "      --constraint=list   specify a list of constraints\n", "")

    monkeypatch.setattr(external, "run_command", only_sbatch_help)
    profile = tmp_path / "site.toml"
    profile.write_text('[launch]\nexecutor = "slurm"\n[launch.toy]\nsbatch = {constrant = "a100"}\n')
    work = _toy_work(tmp_path)
    assert hpcvid("submit", "toy", "--work", work, "--shards", "2", "--profile", profile) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "toy: launch.sbatch.constrant: sbatch has no option --constrant" in err
    assert "did you mean constraint" in err and "valid options: " in err
    assert asked == [["sbatch", "--help"]] and not (work / "jobs").exists()
    assert hpcvid("submit", "toy", "--work", work, "--shards", "2", "--sbatch", "reservaton=r1") == 2
    assert "did you mean reservation" in capsys.readouterr().err
