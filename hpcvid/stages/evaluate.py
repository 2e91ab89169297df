"""The ``eval`` stage: class scores of every test video under several inference strategies, sharded.

Run manual::

    hpcvid run eval --work WORK --model lstm [--shards 4] [--shard I] [--force]
    hpcvid submit eval --config jobs/ucf101.toml --model lstm --shards 4      # one SLURM array task per shard
    hpcvid collect WORK                                                       # the reducer

Shard ``I`` of ``N`` takes every N-th test video of the manifest (sorted by id) and writes
``WORK/eval/<model>/pred-IIII-of-NNNN.h5`` and, last, its record (:mod:`hpcvid.storage.predictions`). A shard whose
record exists is skipped (``--force`` redoes it); a shard killed mid-way leaves no record and is redone.

The model comes from :func:`hpcvid.stages.train.load_run` (``best.pt`` by default, ``eval.checkpoint = "last"``
for the newest) and its inputs from the preparation functions of :mod:`hpcvid.learn.datasets`, the ones training
used (ImageNet normalisation, camera-compensated flow stacks, standardised and temporally centred
features). Strategies, reported side by side (``*`` = the default, which is also what validation used):

* ``frame``: ``middle``* (frame T//2), ``mean_frames`` (eval.frame_samples evenly spaced frames, mean of
  softmax), and the frame-position study ``pos_first``, ``pos_quarter``, ``pos_middle``,
  ``pos_three_quarter``, ``pos_last`` (a first frame can leak motion: a growing object starts small).
* ``flow``: ``centre_stack``* (the centre L-field stack), ``mean_stacks`` (eval.flow_windows stacks).
* ``twostream``: ``midfusion``* (the model's 1x1-conv fusion), ``late_1:1`` and ``late_1:<w>`` (weighted
  softmax average of the two streams' own heads, weights from train.fusion_weights), ``rgb_stream``,
  ``flow_stream``.
* ``lstm``: ``windows``* (windows of seq_len frames every eval.window_stride frames, last-step softmax
  averaged), ``last_step``, ``mean`` (mean softmax over time) and ``end_weighted`` (linearly end-weighted
  mean) on the centre window, and ``full_length`` (the whole video in one pass, last step).

Scores are softmax probabilities (float32). A test video that cannot be scored (missing from the extraction
shards, no flow, ...) is listed in the record's ``failed`` with the reason; ``hpcvid collect`` then names
it. torch is imported inside functions so ``hpcvid --help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hpcvid.config import Config
from hpcvid.errors import PartialFailure, StoreError, VideoError
from hpcvid.fileio import read_json, sha256_file
from hpcvid.storage.manifest import VideoEntry, load_manifest
from hpcvid.storage.predictions import EVAL_DIR, PredictionShard, shard_paths, write_prediction_shard
from hpcvid.version import code_version
from hpcvid.launch.sharding import ShardSpec, all_shards, pending_shards, select

log = logging.getLogger(__name__)

HELP = "score the test videos with a trained model under several inference strategies -> WORK/eval/<model>/"
MODELS = ("frame", "flow", "twostream", "lstm")
FRAME_POSITIONS = ("first", "quarter", "middle", "three_quarter", "last")


# ------------------------------------------------------------------------------ stage protocol
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, help="which trained run of WORK/runs/ to evaluate")
    parser.add_argument("--shards", type=int, metavar="N", help="number of prediction shards (default: eval.shards)")
    parser.add_argument("--shard", type=int, metavar="I", help="run only shard I (0-based); default: all")
    parser.add_argument("--force", action="store_true", help="redo shards whose record exists")
    parser.add_argument("--checkpoint", choices=("best", "last"), help="best.pt (default) or the newest checkpoint")
    parser.add_argument("--window-stride", type=int, metavar="FRAMES", help="lstm: stride between windows")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"train.model": args.model, "eval.shards": args.shards, "eval.checkpoint": args.checkpoint,
            "eval.window_stride": args.window_stride}


def run_name(config: Config) -> str:
    return config.train.model


def record_path(config: Config, spec: ShardSpec) -> Path:
    return shard_paths(config.work_dir, run_name(config), spec)[1]


def shard_done(config: Config, spec: ShardSpec) -> bool:
    """A shard is done exactly when its record exists (it is written last)."""
    return record_path(config, spec).is_file()


def plan(config: Config, args: argparse.Namespace) -> list[ShardSpec]:
    """All shards (or --shard I), minus those whose record exists unless --force."""
    return pending_shards(config.eval.shards, getattr(args, "shard", None), bool(getattr(args, "force", False)),
                          lambda spec: record_path(config, spec), "eval")


def report(config: Config, records: Sequence[dict[str, Any]]) -> int:
    """Print what was scored; exit 0, or raise PartialFailure (exit 3) when videos failed."""
    run = run_name(config)
    for record in records:
        print(f"eval {run} shard {record['shard']}: {record['n_videos']} videos scored, "
              f"{len(record['failed'])} failed, {record.get('seconds', 0):.1f} s")
    count = config.eval.shards
    done = [read_json(p) for spec in all_shards(count) if (p := record_path(config, spec)).is_file()]
    print(f"eval {run}: {len(done)} of {count} shards done in {config.work_dir / EVAL_DIR / run}; "
          f"next: hpcvid collect {config.work}")
    failed = [f for record in done for f in record.get("failed", [])]
    if failed:
        raise PartialFailure(f"eval {run}: {len(failed)} test video(s) could not be scored, e.g. "
                             f"{failed[0]['video']}: {failed[0]['reason']} (see the records in "
                             f"{config.work_dir / EVAL_DIR / run})")
    return 0


# ------------------------------------------------------------------------------ the shard
def run_shard(config: Config, spec: ShardSpec) -> dict[str, Any]:
    """Score the test videos of shard ``spec`` and write the prediction shard and its record (last)."""
    import torch

    from hpcvid.learn.backbones import pick_device
    from hpcvid.launch.progress import write_progress
    from hpcvid.stages.train import load_run

    if shard_done(config, spec) and not spec.force:
        return read_json(record_path(config, spec))
    started = time.time()
    run = run_name(config)
    run_dir = config.work_dir / "runs" / run
    device = pick_device(config.eval.device)
    model, run_config, meta = load_run(run_dir, which=config.eval.checkpoint, device=str(device))
    manifest = load_manifest(config.work_dir)
    if list(meta.get("classes", manifest.classes)) != list(manifest.classes):
        raise StoreError(f"{meta['checkpoint']} was trained on other classes than {config.work_dir}/manifest.json: "
                         "retrain, or evaluate in the work folder it was trained in")
    videos = select(manifest.by_split("test"), spec, key=lambda v: v.id)
    scorer = make_scorer(model, meta, run_config, config, device)
    ids: list[str] = []
    labels: list[int] = []
    scores: dict[str, list[np.ndarray]] = {name: [] for name in scorer.strategies}
    failed: list[dict[str, str]] = []
    write_progress(config.work, "eval", spec, done=0, total=len(videos), started=started)
    with torch.inference_mode():
        for done, video in enumerate(_progress(videos, f"eval {run} {spec.name}"), start=1):
            try:
                result = scorer.score(video)
            except (StoreError, VideoError, KeyError, ValueError) as exc:
                failed.append({"video": video.id, "reason": str(exc) or type(exc).__name__})
                log.warning("eval %s: %s failed: %s", run, video.id, exc)
            else:
                ids.append(video.id)
                labels.append(video.label)
                for name in scorer.strategies:
                    scores[name].append(result[name])
            write_progress(config.work, "eval", spec, done=done, total=len(videos), failed=len(failed))
    n_classes = len(manifest.classes)
    shard = PredictionShard(
        model=meta["kind"], run=run, shard=spec, classes=tuple(manifest.classes), video_ids=ids,
        labels=np.array(labels, dtype=np.int64),
        scores={name: np.array(values, dtype=np.float32).reshape(len(ids), n_classes) for name, values in scores.items()},
        default_strategy=scorer.default, checkpoint=str(meta["checkpoint"]),
        checkpoint_sha256=sha256_file(meta["checkpoint"]),
        config={"run": run_config.to_dict(), "eval": config.to_dict()["eval"]}, code_version=code_version(),
    )
    return write_prediction_shard(config.work_dir, shard, failed=failed,
                                  extra_record={"seconds": round(time.time() - started, 3),
                                                "trained_code_version": meta.get("code_version", ""),
                                                "epoch": meta.get("epoch")})


def _progress(items: Sequence[Any], label: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=label, unit="video", leave=False, mininterval=1.0)


# ------------------------------------------------------------------------------ scorers
def make_scorer(model: Any, meta: dict[str, Any], run_config: Config, config: Config, device: Any) -> Any:
    kind = meta["kind"]
    if kind == "lstm":
        return LSTMScorer(model, meta, config, device)
    source, info = video_source(config)
    if kind == "frame":
        return FrameScorer(model, source, info, config, device)
    if kind == "flow":
        return FlowScorer(model, source, info, meta, config, device)
    if kind == "twostream":
        return TwoStreamScorer(model, source, info, meta, run_config, device)
    raise StoreError(f"{meta['checkpoint']} holds an unknown model kind {kind!r}; choose one of {', '.join(MODELS)}")


def video_source(config: Config) -> tuple[Any, dict[str, dict[str, Any]]]:
    """The extraction shards as a :class:`hpcvid.learn.datasets.ShardVideoSource`, and each video's info."""
    from hpcvid.learn.datasets import ShardVideoSource
    from hpcvid.storage.shards import ShardReader

    folder = config.work_dir / "extract"
    shards = sorted(p for p in folder.glob("shard-*-of-*.h5") if not p.name.startswith("."))
    if not shards:
        raise StoreError(f"no shards in {folder}: run `hpcvid run extract --work {config.work}` first")
    shard_of, info = {}, {}
    for path in shards:
        with ShardReader(path) as reader:
            for vid in reader.video_ids():
                if reader.info(vid).get("split") == "test":
                    shard_of[vid] = str(path)
                    info[vid] = reader.info(vid)
    return ShardVideoSource(shard_of), info


def _softmax(logits: Any) -> np.ndarray:
    return logits.float().softmax(-1).cpu().numpy().astype(np.float32)


def _item(info: dict[str, dict[str, Any]], video: VideoEntry, need_flow: bool = False) -> Any:
    from hpcvid.learn.datasets import VideoItem

    if video.id not in info:
        raise StoreError("not in the extraction shards (extraction failed or has not run for it)")
    entry = info[video.id]
    if not entry.get("has_frames", True):
        raise StoreError("its shard holds no frames: re-extract with frames stored")
    if need_flow and not entry.get("has_flow"):
        raise StoreError("its shard holds no optical flow: re-extract with extract.flow set")
    return VideoItem(video.id, video.label, int(entry["frames"]), "test")


class FrameScorer:
    """Single-frame CNN at the middle frame, averaged over frames, and at five fixed positions."""

    default = "middle"

    def __init__(self, model: Any, source: Any, info: dict, config: Config, device: Any) -> None:
        self.model, self.source, self.info, self.device = model, source, info, device
        self.samples, self.batch = config.eval.frame_samples, config.eval.batch_size
        self.strategies = ["middle", "mean_frames", *(f"pos_{p}" for p in FRAME_POSITIONS)]

    def score(self, video: VideoEntry) -> dict[str, np.ndarray]:
        from hpcvid.learn.datasets import prepare_frames
        from hpcvid.media.decode import count_indices, named_frame_indices

        item = _item(self.info, video)
        middle = item.frames // 2                      # what FrameDataset validates on
        sampled = [int(i) for i in count_indices(item.frames, self.samples)]
        positions = named_frame_indices(item.frames)
        wanted = sorted({middle, *sampled, *(positions[p] for p in FRAME_POSITIONS)})
        images = prepare_frames(self.source.frames(item.id, wanted))
        probs = np.concatenate([_softmax(self.model(images[i:i + self.batch].to(self.device)))
                                for i in range(0, len(wanted), self.batch)])
        row = {index: probs[k] for k, index in enumerate(wanted)}
        result = {"middle": row[middle], "mean_frames": np.mean([row[i] for i in sampled], axis=0)}
        result.update({f"pos_{p}": row[positions[p]] for p in FRAME_POSITIONS})
        return result


class FlowScorer:
    """Flow CNN on the centre stack (as validated) and averaged over several stacks."""

    default = "centre_stack"
    strategies = ["centre_stack", "mean_stacks"]

    def __init__(self, model: Any, source: Any, info: dict, meta: dict, config: Config, device: Any) -> None:
        self.model, self.source, self.info, self.device = model, source, info, device
        self.stack = int(meta.get("flow_stack") or model.stack)
        self.compensation = meta.get("compensation", "median")
        self.windows = config.eval.flow_windows

    def score(self, video: VideoEntry) -> dict[str, np.ndarray]:
        import torch

        from hpcvid.learn.datasets import FlowDataset, prepare_flow, window_starts

        item = _item(self.info, video, need_flow=True)
        centre, _ = FlowDataset(self.source, [item], stack=self.stack, train=False,
                                compensation=self.compensation)[0]
        pairs = max(1, item.frames - 1)
        stacks = [centre]
        if pairs > self.stack:
            stacks = [torch.from_numpy(prepare_flow(self.source.flow(item.id, s, s + self.stack), self.compensation))
                      for s in window_starts(pairs, self.stack, self.windows)]
        probs = _softmax(self.model(torch.stack([centre, *stacks]).to(self.device)))
        return {"centre_stack": probs[0], "mean_stacks": probs[1:].mean(axis=0)}


class TwoStreamScorer:
    """Mid-level fusion beside late fusion of the two streams' own heads (1:1 and the configured weights)."""

    default = "midfusion"

    def __init__(self, model: Any, source: Any, info: dict, meta: dict, run_config: Config, device: Any) -> None:
        self.model, self.source, self.info, self.device = model, source, info, device
        self.stack = int(meta.get("flow_stack") or model.flow.stack)
        self.compensation = meta.get("compensation", "median")
        weights = tuple(run_config.train.fusion_weights)[:2]
        self.fusions = {"late_1:1": (1.0, 1.0)}
        if len(weights) == 2 and weights[0] > 0:
            ratio = weights[1] / weights[0]
            self.fusions[f"late_1:{ratio:g}"] = (1.0, ratio)
        self.strategies = ["midfusion", *self.fusions, "rgb_stream", "flow_stream"]

    def score(self, video: VideoEntry) -> dict[str, np.ndarray]:
        from hpcvid.learn.datasets import TwoStreamDataset
        from hpcvid.learn.models import late_fusion

        item = _item(self.info, video, need_flow=True)
        image, stack, _ = TwoStreamDataset(self.source, [item], stack=self.stack, train=False,
                                           compensation=self.compensation)[0]
        image, stack = image[None].to(self.device), stack[None].to(self.device)
        rgb_logits, flow_logits = self.model.rgb(image), self.model.flow(stack)
        result = {"midfusion": _softmax(self.model(image, stack))[0],
                  "rgb_stream": _softmax(rgb_logits)[0], "flow_stream": _softmax(flow_logits)[0]}
        for name, weights in self.fusions.items():
            result[name] = late_fusion(rgb_logits, flow_logits, weights).float().cpu().numpy()[0]
        return result


class LSTMScorer:
    """The LSTM over prepared feature windows: several windows, one centre window read four ways, full length."""

    default = "windows"
    strategies = ["windows", "last_step", "mean", "end_weighted", "full_length"]

    def __init__(self, model: Any, meta: dict, config: Config, device: Any) -> None:
        from hpcvid.learn.datasets import ShardFeatureSource

        folder = Path(meta.get("feature_folder") or config.work_dir / "extract")
        shards = sorted(p for p in folder.glob("shard-*-of-*.h5") if not p.name.startswith("."))
        if not shards:
            raise StoreError(f"no feature shards in {folder} (the folder the LSTM was trained on): re-run "
                             "extraction or `hpcvid run features`")
        self.source = ShardFeatureSource(shards, meta["feature_set"])
        self.source.mean, self.source.std = meta.get("feature_mean"), meta.get("feature_std")
        self.items = {item.id: item for item in self.source.items}
        self.model, self.device = model, device
        self.seq_len, self.centring = int(meta["seq_len"]), bool(meta.get("centring", True))
        self.stride = config.eval.window_stride

    def _prepared(self, window: np.ndarray) -> Any:
        import torch

        from hpcvid.learn.datasets import prepare_features

        return torch.from_numpy(prepare_features(window, self.source.mean, self.source.std, self.centring))

    def window_starts(self, frames: int) -> list[int]:
        """0, stride, 2*stride, ... and the last full window; one start when the video is short."""
        if frames <= self.seq_len:
            return [0]
        starts = list(range(0, frames - self.seq_len + 1, self.stride))
        if starts[-1] != frames - self.seq_len:
            starts.append(frames - self.seq_len)
        return starts

    def score(self, video: VideoEntry) -> dict[str, np.ndarray]:
        import torch

        from hpcvid.learn.datasets import ping_pong_indices, sequence_indices
        from hpcvid.learn.tbptt import loss_weights

        if video.id not in self.items:
            raise StoreError("has no features in the feature shards (extraction failed or has not run for it)")
        item = self.items[video.id]
        features = self.source.window(item.index, 0, item.frames)
        if item.frames <= self.seq_len:
            windows = [features[ping_pong_indices(item.frames, self.seq_len)]]
        else:
            windows = [features[s:s + self.seq_len] for s in self.window_starts(item.frames)]
        centre = features[sequence_indices(item.frames, self.seq_len, None)]    # what validation used
        batch = torch.stack([self._prepared(w) for w in [centre, *windows]]).to(self.device)
        probs = self.model(batch).float().softmax(-1).cpu().numpy()           # (1 + W, L, C)
        weights = loss_weights(self.seq_len, "linear").numpy()[:, None]
        full = self.model(self._prepared(features)[None].to(self.device)).float().softmax(-1).cpu().numpy()
        return {
            "windows": probs[1:, -1].mean(axis=0),
            "last_step": probs[0, -1],
            "mean": probs[0].mean(axis=0),
            "end_weighted": (probs[0] * weights).sum(axis=0),
            "full_length": full[0, -1],
        }
