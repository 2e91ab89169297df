"""The trainer: it learns, it writes what it promises, and it refuses bad checkpoints clearly."""
import json

import numpy as np
import pytest
import torch

import trainkit
from hpcvid.config import resolve_config
from hpcvid.errors import CheckpointError
from hpcvid.learn.checkpoints import (BEST_NAME, check_compatible, list_checkpoints, load_checkpoint, load_run,
                                      newest_valid_checkpoint, read_metrics)
from hpcvid.learn.trainer import train

torch.set_num_threads(1)


def lstm_config(work, **extra):
    overrides = {"work": str(work), "train.model": "lstm", "train.seq_len": 16, "train.chunk": 4, "train.hidden": 32,
                 "train.layers": 1, "train.epochs": 8, "train.batch_size": 8, "train.dropout": 0.0, "train.lr": 0.01,
                 "train.device": "cpu"}
    overrides.update(extra)
    return resolve_config(overrides=overrides)


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    config = lstm_config(work)
    result = train(config, data_factory=trainkit.lstm_data)
    return config, result


def test_lstm_learns_the_temporal_task(lstm_run):
    config, result = lstm_run
    history = result["history"]
    assert len(history) == 8
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["val_acc"] >= 0.75                 # chance is 1/3


def test_run_folder_contents(lstm_run):
    config, _ = lstm_run
    run = config.work_dir / "runs" / "lstm"
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-e0007-s0000000.pt", "ckpt-e0008-s0000000.pt"]
    assert (run / BEST_NAME).is_file()
    lines = read_metrics(run)
    assert [line["epoch"] for line in lines] == list(range(1, 9))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "samples_per_s", "data_wait_share"):
        assert key in lines[0]
    resolved = json.loads((run / "config.resolved.json").read_text())
    assert resolved["config"]["train"]["chunk"] == 4
    payload = load_checkpoint(run / "ckpt-e0008-s0000000.pt")
    for key in ("model", "optimizer", "scheduler", "rng", "config", "code_version", "epoch", "step", "meta"):
        assert key in payload
    assert payload["config"]["train"]["hidden"] == 32 and payload["epoch"] == 8


def test_load_run_gives_the_trained_model_and_its_preparation(lstm_run):
    config, _ = lstm_run
    model, loaded_config, meta = load_run(config.work_dir / "runs" / "lstm", which="last")
    assert loaded_config.train.seq_len == 16 and meta["kind"] == "lstm" and meta["centring"] is True
    assert isinstance(meta["feature_mean"], np.ndarray) and meta["feature_mean"].shape == (4,)
    bundle = trainkit.lstm_data(config)
    xs = torch.stack([bundle.val[i][0] for i in range(len(bundle.val))])
    ys = torch.tensor([bundle.val[i][1] for i in range(len(bundle.val))])
    with torch.no_grad():
        logits = model(xs)
    assert logits.shape == (len(ys), 16, 3)
    accuracy = (logits[:, -1].argmax(-1) == ys).float().mean().item()
    assert accuracy == pytest.approx(read_metrics(config.work_dir / "runs" / "lstm")[-1]["val_acc"])


def test_rerun_of_a_finished_run_trains_nothing_more(lstm_run):
    config, _ = lstm_run
    before = (config.work_dir / "runs" / "lstm" / "ckpt-e0008-s0000000.pt").read_bytes()
    result = train(config, data_factory=trainkit.lstm_data)
    assert result["epochs"] == 8 and len(result["history"]) == 8
    assert (config.work_dir / "runs" / "lstm" / "ckpt-e0008-s0000000.pt").read_bytes() == before


def test_corrupt_checkpoint_is_refused_clearly(tmp_path, lstm_run):
    config, _ = lstm_run
    run = config.work_dir / "runs" / "lstm"
    good = run / "ckpt-e0008-s0000000.pt"
    broken = tmp_path / "ckpt-e0009-s0000000.pt"
    broken.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])     # a truncated copy
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(broken)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=str(garbage)):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not an hpcvid checkpoint"):
        load_checkpoint(foreign)
    # resume skips a corrupt newest checkpoint and takes the newest valid one
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / good.name).write_bytes(good.read_bytes())
    (copy / broken.name).write_bytes(broken.read_bytes())
    path, payload = newest_valid_checkpoint(copy)
    assert path.name == good.name and payload["epoch"] == 8
    only_broken = tmp_path / "broken_run"
    only_broken.mkdir()
    (only_broken / broken.name).write_bytes(broken.read_bytes())
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        load_run(only_broken, which="last")
    # the trainer refuses to start over on top of corrupt checkpoints, and sets aside corrupt newer ones
    work = tmp_path / "work"
    (work / "runs" / "lstm").mkdir(parents=True)
    (work / "runs" / "lstm" / broken.name).write_bytes(broken.read_bytes())
    with pytest.raises(CheckpointError, match="every checkpoint in .* is corrupt"):
        train(lstm_config(work), data_factory=trainkit.lstm_data)
    (work / "runs" / "lstm" / good.name).write_bytes(good.read_bytes())
    (work / "runs" / "lstm" / "ckpt-e0008-s0000000.pt").rename(work / "runs" / "lstm" / "ckpt-e0007-s0000000.pt")
    result = train(lstm_config(work), data_factory=trainkit.lstm_data)
    assert result["epochs"] == 8 and (work / "runs" / "lstm" / (broken.name + ".corrupt")).is_file()


def test_incompatible_checkpoint_is_refused(tmp_path, lstm_run):
    config, _ = lstm_run
    path = config.work_dir / "runs" / "lstm" / "ckpt-e0008-s0000000.pt"
    payload = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="hidden"):
        check_compatible(payload, path, "lstm", dict(payload["init_args"], hidden=64))
    with pytest.raises(CheckpointError, match="'lstm' model, not 'flow'"):
        check_compatible(payload, path, "flow", payload["init_args"])
    # the trainer itself refuses to continue the run with another architecture
    with pytest.raises(CheckpointError, match="hidden"):
        train(lstm_config(config.work_dir, **{"train.hidden": 16}), data_factory=trainkit.lstm_data)


@pytest.mark.parametrize("model", ["frame", "flow", "twostream"])
def test_cnn_models_train_end_to_end(tmp_path, model):
    config = resolve_config(overrides={
        "work": str(tmp_path), "train.model": model, "train.backbone": "small", "train.flow_stack": 3,
        "train.epochs": 2, "train.batch_size": 4, "train.lr": 0.003, "train.device": "cpu",
        "train.val_fraction": 0.34, "train.schedule": "cyclic"})
    result = train(config, data_factory=trainkit.video_data)
    assert len(result["history"]) == 2 and all(np.isfinite(h["train_loss"]) for h in result["history"])
    assert result["history"][0]["lr"] != result["history"][1]["lr"]           # the cyclic schedule moves
    net, _, meta = load_run(tmp_path / "runs" / model)
    assert meta["kind"] == model
    *inputs, _label = trainkit.video_data(config).val[0]
    with torch.no_grad():
        out = net(*(torch.stack([x, x]) for x in inputs))
    assert out.shape == (2, 3)


def test_twostream_starts_from_trained_streams(tmp_path):
    base = {"work": str(tmp_path), "train.backbone": "small", "train.flow_stack": 3, "train.epochs": 1,
            "train.batch_size": 4, "train.device": "cpu", "train.val_fraction": 0.34}
    train(resolve_config(overrides=dict(base, **{"train.model": "frame"})), data_factory=trainkit.video_data)
    frame_state = load_checkpoint(tmp_path / "runs" / "frame" / BEST_NAME)["model"]
    cfg = resolve_config(overrides=dict(base, **{"train.model": "twostream", "train.lr": 1e-12}))
    train(cfg, data_factory=trainkit.video_data)
    fused = load_checkpoint(tmp_path / "runs" / "twostream" / BEST_NAME)["model"]
    key = next(k for k in frame_state if k.startswith("trunk."))
    assert torch.allclose(fused["rgb." + key], frame_state[key], atol=1e-6)


@pytest.mark.slow
def test_cli_trains_every_model_from_real_shards(tmp_path, tiny_work):
    """Real files end to end: extract (ffmpeg, Farneback, HDF5) -> `hpcvid run train` for frame, flow,
    twostream (2 gloo processes) -> `hpcvid run features` -> lstm on the fine-tuned features."""
    import shutil

    from hpcvid.cli import main
    from hpcvid.config import load_resolved, replace
    from hpcvid.stages.extract import run_shard
    from hpcvid.launch.sharding import all_shards
    from hpcvid.storage.shards import ShardReader

    work = tmp_path / "work"
    shutil.copytree(tiny_work, work)
    config = replace(load_resolved(work), work=str(work), **{"extract.size": 32, "extract.backbone": "none",
                                                              "extract.flow": "farneback", "extract.shards": 2})
    for spec in all_shards(2):
        run_shard(config, spec)
    common = ["--work", str(work), "--backbone", "small", "--device", "cpu", "--batch-size", "4"]
    job = tmp_path / "job.toml"
    job.write_text('[train]\nflow_stack = 4\nseq_len = 12\nchunk = 4\nhidden = 16\nval_fraction = 0.34\n'
                   f'[dataset]\nroot = "{load_resolved(work).dataset.root}"\n')
    common += ["--config", str(job)]
    assert main(["run", "train", "--model", "frame", "--epochs", "1", *common]) == 0
    assert main(["run", "train", "--model", "flow", "--epochs", "1", *common]) == 0
    assert main(["run", "train", "--model", "twostream", "--epochs", "1", "--procs", "2", *common]) == 0
    assert read_metrics(work / "runs" / "twostream")[0]["world_size"] == 2

    assert main(["run", "features", "--work", str(work), "--config", str(job), "--device", "cpu"]) == 0
    shards = sorted((work / "features" / "frame").glob("shard-*.h5"))
    assert len(shards) == 2 and len(list((work / "features" / "frame").glob("shard-*.json"))) == 2
    frame_model, _, meta = load_run(work / "runs" / "frame")
    with ShardReader(shards[0]) as reader:
        vid = reader.video_ids()[0]
        stored = reader.features(vid, "finetuned")
        scores = reader.scores(vid, "finetuned")
    with ShardReader(work / "extract" / "shard-0000-of-0002.h5") as extract_reader:
        frames = extract_reader.frames(vid)
    from hpcvid.learn.datasets import prepare_frames
    with torch.no_grad():
        x = prepare_frames(frames)
        assert np.allclose(stored, frame_model.features(x).numpy(), atol=1e-4)
        assert np.allclose(scores, frame_model(x).numpy(), atol=1e-4)

    assert main(["run", "train", "--model", "lstm", "--epochs", "2", *common]) == 0
    _, _, lstm_meta = load_run(work / "runs" / "lstm")
    assert lstm_meta["feature_set"] == "finetuned" and lstm_meta["feature_mean"].shape == (frame_model.feature_dim,)
    # a second `run features` finds every shard done and changes nothing
    before = shards[0].read_bytes()
    assert main(["run", "features", "--work", str(work), "--config", str(job), "--device", "cpu"]) == 0
    assert shards[0].read_bytes() == before


def test_plateau_schedule_and_early_stopping(tmp_path):
    """SGD with a vanishing step: the validation loss stops improving, the plateau schedule cuts the learning
    rate, and early stopping ends the run before its epochs are used up."""
    config = lstm_config(tmp_path, **{"train.optimizer": "sgd", "train.lr": 1e-30, "train.epochs": 6,
                                      "train.schedule": "plateau", "train.plateau_patience": 0,
                                      "train.early_stopping": 2})
    result = train(config, data_factory=trainkit.lstm_data)
    history = result["history"]
    assert result["stopped_early"] and len(history) == 3
    assert history[-1]["lr"] < history[0]["lr"]
    again = train(config, data_factory=trainkit.lstm_data)          # a rerun does not train past the stop
    assert again["stopped_early"] and len(again["history"]) == 3


def test_dataloader_workers_do_not_change_the_result(tmp_path):
    """Each sample's random frame, crop and flip come from (seed, epoch, index), not from the loading process."""
    finals = []
    for workers in (0, 2):
        config = resolve_config(overrides={
            "work": str(tmp_path / f"w{workers}"), "train.model": "frame", "train.backbone": "small",
            "train.epochs": 1, "train.batch_size": 4, "train.device": "cpu", "train.workers": workers,
            "train.val_fraction": 0.34, "train.dropout": 0.3})
        train(config, data_factory=trainkit.video_data)
        finals.append(load_checkpoint(tmp_path / f"w{workers}" / "runs" / "frame" / "ckpt-e0001-s0000000.pt"))
    for key, value in finals[0]["model"].items():
        assert torch.allclose(value, finals[1]["model"][key], atol=1e-6), key


@pytest.mark.slow  # torch takes 5 s to stop a worker whose item failed
def test_a_damaged_shard_read_by_a_loader_worker_stops_training_with_one_line(tmp_path):
    from damage import flip_byte, store_error_line
    from hpcvid.learn.datasets import FeatureDataset, ShardFeatureSource, feature_input_dim
    from hpcvid.stages.train import DataBundle
    from hpcvid.storage.shards import VideoData, write_shard

    arrays, labels = trainkit.feature_clips(n_per_class=4)
    path = tmp_path / "shard.h5"
    write_shard(path, [VideoData(f"clip{i:03d}", {"label": label, "class_name": trainkit.CLASSES[label], "split": "train"},
                                 np.arange(len(array)), features={"f": array})
                       for i, (array, label) in enumerate(zip(arrays, labels))])
    flip_byte(path, "videos/clip005/features/f")

    def damaged_data(config):
        source = ShardFeatureSource([path], "f")
        source.mean, source.std = np.zeros(4), np.ones(4)
        dataset = FeatureDataset(source, source.items, seq_len=config.train.seq_len, train=True)
        return DataBundle(dataset, None, trainkit.CLASSES, {"input_dim": feature_input_dim(4, True)},
                          {"classes": trainkit.CLASSES, "centring": True, "feature_mean": source.mean,
                           "feature_std": source.std, "seq_len": config.train.seq_len})

    config = lstm_config(tmp_path / "work", **{"train.workers": 1, "train.epochs": 1})
    message = store_error_line(lambda: train(config, data_factory=damaged_data))
    assert message.startswith(f"{path}, video 'clip005': ") and "--force" in message
