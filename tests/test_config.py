"""Configuration: one precedence (defaults < job file < profile < flags) and errors that name key, file, choices."""
from __future__ import annotations

from pathlib import Path

import pytest

from hpcvid.cli import main as cli_main
from hpcvid.config import (
    Config,
    load_resolved,
    replace,
    resolve_config,
    walltime_minutes,
    write_resolved,
)
from hpcvid.errors import ConfigError

PROJECT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def job(tmp_path) -> Path:
    return write(tmp_path / "job.toml", 'work = "work/job"\n[extract]\nshards = 3\nflow = "dis"\n'
                                        '[train]\nepochs = 7\n[launch]\nwalltime = "00:10:00"\n')


@pytest.fixture
def profile(tmp_path) -> Path:
    return write(tmp_path / "cluster.toml", '[launch]\nexecutor = "slurm"\npartition = "gpu"\n'
                                            'walltime = "02:00:00"\n[extract]\nshards = 5\n')


def test_defaults_without_files():
    config = resolve_config()
    assert config == Config() and config.extract.shards == 1 and config.launch.executor == "local"


def test_each_layer_overrides_the_one_below(job, profile):
    only_job = resolve_config(job)
    assert (only_job.work, only_job.extract.shards, only_job.extract.flow, only_job.train.epochs) == (
        "work/job", 3, "dis", 7)
    assert only_job.extract.backbone == "resnet18"  # untouched keys keep their defaults

    with_profile = resolve_config(job, profile)
    assert with_profile.extract.shards == 5 and with_profile.launch.walltime == "02:00:00"
    assert with_profile.extract.flow == "dis" and with_profile.launch.partition == "gpu"

    with_flags = resolve_config(job, profile, {"extract.shards": 9, "work": "elsewhere", "train.epochs": None})
    assert (with_flags.extract.shards, with_flags.work, with_flags.train.epochs) == (9, "elsewhere", 7)


def test_flags_reach_the_config_through_the_cli(job, profile, tmp_path, tiny_synthetic):
    work = tmp_path / "w"
    assert cli_main(["index", "--config", str(job), "--profile", str(profile), "--dataset", str(tiny_synthetic),
                     "--work", str(work), "--split", "3"]) == 0
    config = load_resolved(work)
    assert (config.work, config.dataset.split, config.extract.shards, config.train.epochs) == (str(work), 3, 5, 7)
    assert config.dataset.root == str(tiny_synthetic)


def test_unknown_key_names_the_key_the_file_and_the_valid_keys(tmp_path):
    bad = write(tmp_path / "bad.toml", "[extract]\nshard = 3\n")
    with pytest.raises(ConfigError) as error:
        resolve_config(bad)
    message = str(error.value)
    assert f"job file {bad}" in message and "unknown key extract.shard" in message
    assert "valid keys of [extract]:" in message and "shards" in message and "backbone" in message


def test_unknown_section_and_unknown_flag_key(tmp_path, profile):
    bad = write(tmp_path / "bad.toml", "[extrakt]\nshards = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'extrakt'; valid top-level keys: work, dataset, synth"):
        resolve_config(bad)
    bad_profile = write(tmp_path / "p.toml", "[launch]\ngpus = 4\n")
    with pytest.raises(ConfigError, match=rf"cluster profile {bad_profile}: unknown key launch.gpus"):
        resolve_config(None, bad_profile)
    with pytest.raises(ConfigError, match=r"the command line: unknown setting 'extract\.nope\.x'"):
        resolve_config(overrides={"extract.nope.x": 1})


def test_bad_choice_lists_the_choices(tmp_path):
    bad = write(tmp_path / "bad.toml", '[extract]\nflow = "pwcnet"\n')
    with pytest.raises(ConfigError) as error:
        resolve_config(bad)
    assert str(error.value) == (f"job file {bad}: extract.flow = 'pwcnet' is not valid; "
                                "choose one of: farneback, dis, tvl1, tvl1_torch, raft, none")
    with pytest.raises(ConfigError, match=r"the command line: dataset.format = 'kinetics' is not valid; "
                                          r"choose one of: ucf101, hmdb51, folders"):
        resolve_config(overrides={"dataset.format": "kinetics"})


@pytest.mark.parametrize("toml, fragment", [
    ("[extract]\nshards = 0\n", "extract.shards = 0 is not valid; it must be > 0"),
    ('[extract]\nshards = "three"\n', "extract.shards = 'three' is not valid; it must be of type int"),
    ('[launch]\nwalltime = "2h"\n', "launch.walltime = '2h' is not valid; it must be a walltime like HH:MM:SS"),
    ('[synth]\nsize = "112"\n', "synth.size = '112' is not valid; it must be WIDTHxHEIGHT"),
    ("[dataset]\ntest_fraction = 1.5\n", "dataset.test_fraction = 1.5 is not valid; it must be between 0 and 1"),
    ("[synth]\nclasses = 5\n", "synth.classes = 5 must be even"),
    ("[synth]\nper_class = 4\ntest_per_class = 4\n", "synth.test_per_class must be smaller than synth.per_class"),
    ("[train]\nseq_len = 8\nchunk = 16\n", "train.chunk (16) must not exceed train.seq_len (8)"),
    ("[extract]\n shards = [\n", "is not valid TOML"),
    ("[launch.trian]\ncpus_per_task = 2\n", "unknown key launch.trian; valid keys of [launch]:"),
    ("[launch.train]\nexecutor = \"local\"\n", "unknown key launch.train.executor; valid keys of [launch.train]:"),
    ("[launch.train]\ncpus_per_task = 0\n", "launch.train.cpus_per_task = 0 is not valid; it must be > 0"),
    ("[launch.eval]\nwalltime = \"1h\"\n", "launch.eval.walltime = '1h' is not valid; it must be a walltime"),
    ("[launch]\nsbatch = {mail_type = []}\n", "launch.sbatch.mail_type = [] is not valid; give text"),
    ("[launch]\nsbatch = \"--exclusive\"\n", "launch.sbatch must be a table of settings"),
    ("[launch]\nsetup = \"module load x\"\n", "launch.setup must be a list of str"),
    ("[launch]\ncontainer_runtime = \"docker\"\n", "choose one of: apptainer, singularity"),
    ("[pipeline]\nmodels = [\"frame\", \"i3d\"]\n", "pipeline.models = ['frame', 'i3d'] is not valid; it must be a list"),
])
def test_bad_values_fail_before_any_work_naming_the_file(tmp_path, toml, fragment):
    bad = write(tmp_path / "bad.toml", toml)
    with pytest.raises(ConfigError) as error:
        resolve_config(bad)
    assert fragment in str(error.value) and str(bad) in str(error.value)


def test_missing_job_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match=r"job file .*nope.toml does not exist"):
        resolve_config(tmp_path / "nope.toml")


def test_flag_strings_are_coerced_like_file_values():
    config = resolve_config(overrides={"extract.shards": "4", "train.lr": "0.01", "train.freeze_trunk": "yes",
                                       "train.fusion_weights": [1, 2]})
    assert (config.extract.shards, config.train.lr, config.train.freeze_trunk) == (4, 0.01, True)
    assert config.train.fusion_weights == (1.0, 2.0)


def test_replace_validates_and_keeps_the_rest():
    config = resolve_config(overrides={"extract.shards": 2})
    changed = replace(config, **{"train.epochs": 3})
    assert (changed.train.epochs, changed.extract.shards) == (3, 2) and config.train.epochs != 3
    with pytest.raises(ConfigError, match="choose one of"):
        replace(config, **{"train.model": "transformer"})


def test_resolved_config_round_trips_through_the_work_folder(tmp_path, job):
    config = resolve_config(job, overrides={"work": str(tmp_path / "w")})
    write_resolved(config, argv=["hpcvid", "index"])
    assert load_resolved(tmp_path / "w") == config
    with pytest.raises(ConfigError, match="run `hpcvid index"):
        load_resolved(tmp_path / "empty")


def test_walltime_minutes():
    assert walltime_minutes("02:30:00") == 150 and walltime_minutes("1-00:00:30") == 1441
    assert walltime_minutes("00:00:10") == 1
    with pytest.raises(ConfigError, match="HH:MM:SS"):
        walltime_minutes("90")


@pytest.mark.parametrize("name", sorted(p.name for p in (PROJECT / "jobs").glob("*.toml")))
def test_shipped_job_files_are_valid(name):
    config = resolve_config(PROJECT / "jobs" / name)
    assert config.work.startswith("work/") and config.dataset.root


@pytest.mark.parametrize("name", sorted(p.name for p in (PROJECT / "slurm").glob("*.toml")))
def test_shipped_cluster_profiles_are_valid(name):
    config = resolve_config(PROJECT / "jobs" / "synthetic.toml", PROJECT / "slurm" / name)
    assert config.launch.executor in ("slurm", "local", "debug")


def test_configuration_errors_reach_the_user_as_one_line(tmp_path, capsys):
    """Bad bytes or TOML in a job file, a bad count, a stage on a missing work folder: one line, exit 2."""
    not_utf8 = tmp_path / "latin1.toml"
    not_utf8.write_bytes('[train]\nepochs = 3 # r\xe9sum\xe9\n'.encode("latin-1"))
    broken = write(tmp_path / "broken.toml", "[extract]\nshards = [\n")
    missing = tmp_path / "no-such-work"
    cases = [
        (["run", "extract", "--config", str(not_utf8)], f"job file {not_utf8} is not UTF-8 text (byte 22, line 2)"),
        (["run", "extract", "--config", str(broken)], f"job file {broken} is not valid TOML"),
        (["run", "extract", "--work", str(tmp_path / "w"), "--jobs", "0"], "argument --jobs: must be at least 1"),
        (["run", "eval", "--work", str(missing), "--model", "frame"], f"work folder {missing} does not exist"),
        (["run", "train", "--work", str(missing)], f"work folder {missing} does not exist"),
        (["run", "merge", "--work", str(missing)], f"work folder {missing} does not exist"),
        (["collect", str(missing)], f"work folder {missing} does not exist"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not missing.exists(), "a stage that reads a work folder must not create it"


# ------------------------------------------------------------------------------------------ per-stage launch
def test_a_stage_table_overrides_launch_for_that_stage_only(tmp_path):
    job = write(tmp_path / "job.toml", '[launch]\ncpus_per_task = 3\nwalltime = "01:00:00"\n'
                                       '[launch.train]\ncpus_per_task = 6\ngpus_per_node = 2\n')
    site = write(tmp_path / "site.toml", '[launch]\ncpus_per_task = 1\nwalltime = "04:00:00"\n'
                                         '[launch.extract]\nwalltime = "02:00:00"\n')
    config = resolve_config(job, site)
    train, extract, merge = (config.launch.for_stage(s) for s in ("train", "extract", "merge"))
    # the profile's [launch] cpus do not undo the job file's [launch.train] cpus: a stage's table wins
    assert (train.cpus_per_task, train.gpus_per_node, train.walltime) == (6, 2, "04:00:00")
    assert (extract.cpus_per_task, extract.gpus_per_node, extract.walltime) == (1, 0, "02:00:00")
    assert (merge.cpus_per_task, merge.walltime) == (1, "04:00:00")
    assert config.launch.cpus_per_task == 1 and config.for_stage("train").launch == train
    # a flag wins over every table
    flagged = resolve_config(job, site, {"launch.cpus_per_task": 4, "launch.walltime": "00:30:00"})
    assert {flagged.launch.for_stage(s).cpus_per_task for s in ("train", "extract", "merge")} == {4}
    assert flagged.launch.for_stage("extract").walltime == "00:30:00"
    assert flagged.launch.for_stage("train").gpus_per_node == 2, "only the flagged keys are replaced"


def test_sbatch_options_merge_option_by_option_across_tables_and_layers(tmp_path):
    site = write(tmp_path / "site.toml", '[launch]\nsbatch = {mail_type = "END", exclusive = true}\n'
                                         '[launch.train]\nsbatch = {constraint = "a100"}\n'
                                         '[launch.reduce]\nsbatch = {exclusive = false}\n')
    config = resolve_config(None, site, {"launch.sbatch.reservation": "r1", "launch.sbatch.mail_type": "ALL"})
    assert config.launch.for_stage("train").sbatch == {"constraint": "a100", "exclusive": True, "mail_type": "ALL",
                                                       "reservation": "r1"}
    assert config.launch.for_stage("reduce").sbatch["exclusive"] is False
    assert resolve_config(None, site, {"launch.sbatch.time_min": 30}).launch.sbatch["time_min"] == "30"


def test_stage_tables_setup_and_container_round_trip_through_the_work_folder(tmp_path):
    job = write(tmp_path / "job.toml", f'work = "{tmp_path / "w"}"\n[launch]\nsetup = ["module load x"]\n'
                                       '[launch.train]\ncontainer = "/img.sif"\nsbatch = {hint = "nomultithread"}\n')
    config = resolve_config(job)
    write_resolved(config)
    again = load_resolved(tmp_path / "w")
    assert again == config and again.launch.for_stage("train").container == "/img.sif"
    assert again.launch.setup == ("module load x",) and again.launch.stages["train"]["sbatch"] == {"hint": "nomultithread"}
    assert replace(again, **{"train.epochs": 2}).launch == config.launch


def test_unknown_launch_key_lists_the_stage_tables(tmp_path):
    bad = write(tmp_path / "bad.toml", "[launch]\ncpu = 2\n")
    with pytest.raises(ConfigError, match=r"stage tables: \[launch\.extract\], \[launch\.merge\], \[launch\.train\]"):
        resolve_config(None, bad)
