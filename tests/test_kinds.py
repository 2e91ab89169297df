"""The table of model kinds: every kind is complete, and everything that lists or dispatches on models
reads the table, so a kind registered there (the throw-away ``toy`` of toykind.py) is a valid choice
everywhere without touching anything else."""
from __future__ import annotations

import importlib
import subprocess
import sys
import types

import pytest

import toykind
from hpcvid.errors import ConfigError
from hpcvid.learn.kinds import FEATURES, FLOW, FRAMES, KINDS, REQUIRED_PARTS, ModelKind, missing_parts


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(KINDS, "toy", toykind.KIND)
    return toykind.KIND


@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_is_complete(name):
    kind = KINDS[name]
    assert kind.name == name and kind.help and kind.reads
    assert set(kind.reads) <= {FRAMES, FLOW, FEATURES}
    assert missing_parts(kind, importlib.import_module(kind.module)) == []
    order = list(KINDS)      # the demo trains in table order: what a kind starts from is trained before it
    assert all(order.index(other) < order.index(name) for other in kind.starts_from)


def test_a_kind_missing_a_part_is_refused(monkeypatch):
    frame = importlib.import_module("hpcvid.learn.kinds.frame")
    half = types.ModuleType("halfkind")
    for part in REQUIRED_PARTS:
        if part != "validation_loss":
            setattr(half, part, getattr(frame, part))
    monkeypatch.setitem(sys.modules, "halfkind", half)
    with pytest.raises(ConfigError, match="halfkind lacks validation_loss"):
        ModelKind("half", "incomplete", (FRAMES,), "halfkind").implementation()
    with pytest.raises(ConfigError, match="lacks warm_start"):    # starting from runs needs a warm start
        ModelKind("warm", "no warm start", (FRAMES,), "hpcvid.learn.kinds.frame", starts_from=("flow",)).implementation()


def test_the_table_and_the_help_import_no_heavy_module():
    code = ("import sys; import hpcvid.learn.kinds, hpcvid.config; from hpcvid.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'cv2', 'h5py', 'submitit', 'hpcvid.learn.trainer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_evaluate_and_features_do_not_import_the_trainer():
    code = ("import sys; import hpcvid.stages.evaluate, hpcvid.stages.features, hpcvid.learn.checkpoints; "
            "print('hpcvid.learn.trainer' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_registered_kind_is_a_choice_of_the_config_and_every_model_flag(toy):
    from hpcvid.cli import build_parser
    from hpcvid.config import resolve_config

    assert resolve_config(overrides={"train.model": "toy"}).train.model == "toy"
    with pytest.raises(ConfigError, match="choose one of: frame, flow, twostream, lstm, .*, cnnlstm, toy"):
        resolve_config(overrides={"train.model": "nope"})
    parser = build_parser()
    for argv in (["run", "train"], ["run", "eval"], ["submit", "train"], ["submit", "eval"]):
        assert parser.parse_args([*argv, "--model", "toy"]).model == "toy"


def test_a_registered_kind_has_its_place_in_the_report_and_the_demo(toy, tmp_path):
    from hpcvid.cli.demo import build_steps
    from hpcvid.stages.report import ordered_runs

    runs = {"z": {"model": "unknown"}, "t": {"model": "toy"}, "l": {"model": "lstm"}, "f": {"model": "frame"}}
    assert ordered_runs(runs) == ["f", "l", "t", "z"]
    names = [step.name for step in build_steps(tmp_path / "job.toml", tmp_path, tmp_path, tmp_path, "ci",
                                               all_models=True)]
    assert names.index("train lstm") < names.index("train c3d") < names.index("train toy") < names.index("eval frame")
    assert names[-3:] == ["eval toy", "collect", "predict lstm"] and names.count("features") == 1
    # the default demo: the four classic kinds only, so it stays as fast as it was
    default = [step.name for step in build_steps(tmp_path / "job.toml", tmp_path, tmp_path, tmp_path, "ci")]
    assert [n for n in default if n.startswith("train")] == ["train frame", "train flow", "train twostream",
                                                             "train lstm"]
    assert "eval toy" not in default and "eval tsn_rgb" not in default


def test_a_registered_kind_trains_loads_and_gets_its_scorer(toy, tmp_path, monkeypatch):
    """The trainer, load_run and evaluation's dispatch know the toy kind from the table alone."""
    import torch

    import trainkit
    from hpcvid.config import resolve_config
    from hpcvid.learn.checkpoints import load_run
    from hpcvid.learn.kinds import EvalInputs
    from hpcvid.learn.trainer import train
    from hpcvid.stages import evaluate

    config = resolve_config(overrides={"work": str(tmp_path), "train.model": "toy", "train.epochs": 2,
                                       "train.batch_size": 4, "train.device": "cpu", "train.val_fraction": 0.34})
    result = train(config, data_factory=trainkit.video_data)
    assert len(result["history"]) == 2
    model, _, meta = load_run(tmp_path / "runs" / "toy")
    assert isinstance(model, toykind.MeanColour) and meta["kind"] == "toy"
    source, items = trainkit.video_clips()
    monkeypatch.setattr(evaluate, "video_source", lambda config, splits=("test",): EvalInputs(source, {}))
    scorer = evaluate.make_scorer(model, meta, config, config, torch.device("cpu"))
    assert isinstance(scorer, toykind.Scorer) and scorer.default == "middle"
