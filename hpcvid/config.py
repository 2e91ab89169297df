"""Configuration: frozen dataclasses, one precedence, validated before any work starts.

Precedence, implemented once in :func:`resolve_config`::

    defaults  <  job file (jobs/*.toml)  <  cluster profile (slurm/*.toml)  <  command-line flags

Every value remembers where it came from, so an error names the key, the file (or "the command line")
and the valid choices. Paths in a job file are taken relative to the current directory (run hpcvid from
the project folder, or give absolute paths).

Each section is a frozen dataclass. A field's metadata may hold ``choices`` (valid values) and
``check`` (a predicate with a description, e.g. ``positive``). Sections may add a ``validate`` method
for rules that span fields; it raises :class:`ConfigError`.
"""
from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

from hpcvid.errors import ConfigError
from hpcvid.fileio import atomic_write_json
from hpcvid.learn.backbones import BACKBONES
from hpcvid.learn.kinds import DEFAULT_KINDS, KINDS

# --------------------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Check:
    """A named predicate on a value; ``description`` completes 'must be ...'."""

    predicate: Callable[[Any], bool]
    description: str


POSITIVE = Check(lambda v: v > 0, "> 0")
NON_NEGATIVE = Check(lambda v: v >= 0, ">= 0")
FRACTION = Check(lambda v: 0.0 < v < 1.0, "between 0 and 1 (exclusive)")
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]\d):([0-5]\d)$")
WALLTIME = Check(lambda v: bool(_WALLTIME.match(v)), "a walltime like HH:MM:SS or D-HH:MM:SS")


def parse_fusion(items: Collection[str]) -> dict[str, float]:
    """["tsn_rgb:1", "tsn_flow:1.5"] -> {"tsn_rgb": 1.0, "tsn_flow": 1.5} (checked by FUSION)."""
    return {item.rpartition(":")[0]: float(item.rpartition(":")[2]) for item in items}


def _fusion_ok(items: Collection[str]) -> bool:
    if not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*:\d+(\.\d*)?", item) for item in items):
        return False
    weights = parse_fusion(items)
    return len(weights) == len(items) != 1 and all(w > 0 for w in weights.values())


FUSION = Check(_fusion_ok, "empty, or a list of two or more distinct RUN:WEIGHT with weights > 0, e.g. "
                           "[\"tsn_rgb:1\", \"tsn_flow:1.5\"]")
SIZE_WXH = Check(lambda v: bool(re.fullmatch(r"[1-9]\d*x[1-9]\d*", v)), "WIDTHxHEIGHT, e.g. 112x112")


def walltime_minutes(text: str) -> int:
    """'HH:MM:SS' or 'D-HH:MM:SS' -> whole minutes, rounded up (what sbatch and submitit take)."""
    match = _WALLTIME.match(text)
    if not match:
        raise ConfigError(f"bad walltime {text!r}: use HH:MM:SS or D-HH:MM:SS, e.g. 02:30:00")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total_seconds = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return max(1, -(-total_seconds // 60))


def option(default: Any, *, choices: Collection | None = None, check: Check | None = None, help: str = "") -> Any:
    """A dataclass field with validation metadata (and a help text shown in errors)."""
    metadata = {"choices": choices, "check": check, "help": help}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples, not lists, for defaults of frozen config fields")
    return field(default=default, metadata=metadata)


# ------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DatasetConfig:
    """Where the videos and split files are, and how to read the split."""

    root: str = option("", help="folder holding the videos (folder per class)")
    format: str = option("ucf101", choices=("ucf101", "hmdb51", "folders"))
    split: int = option(1, choices=(1, 2, 3))
    splits_dir: str = option("", help="folder of split files; empty = the root or the folder the official archive "
                                      "unpacks to (ucfTrainTestlist, testTrainMulti_7030_splits, splits)")
    test_fraction: float = option(0.3, check=FRACTION, help="test share of the generated split ('folders')")
    extensions: tuple[str, ...] = option((".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg"))
    follow_symlinks: str = option("inside", choices=("inside", "all", "none"),
                                  help="symbolic links below the root: only those that stay inside it, all, or none")
    classes: tuple[str, ...] = option((), help="keep only these classes (labels renumbered in this order)")
    class_map: tuple[tuple[str, tuple[str, ...]], ...] = option(
        (), help="new class -> list of the dataset's classes it is made of, or \"*\" for all the others "
                 "(a TOML table [dataset.class_map])")
    extra_roots: tuple[str, ...] = option((), help="folders of one's own clips (a folder per class) added to the "
                                                  "dataset; their split is generated like the 'folders' format")


@dataclass(frozen=True)
class SynthConfig:
    """The generated dataset (hpcvid.stages.synth): classes that differ by appearance and by motion."""

    classes: int = option(6, check=POSITIVE, help="2 appearances x N motions; must be a multiple of 2")
    per_class: int = option(20, check=POSITIVE, help="videos per class (train + test)")
    test_per_class: int = option(6, check=NON_NEGATIVE)
    frames: int = option(32, check=POSITIVE)
    size: str = option("112x112", check=SIZE_WXH)
    fps: float = option(25.0, check=POSITIVE)
    seed: int = option(0, check=NON_NEGATIVE)


@dataclass(frozen=True)
class ExtractConfig:
    """Decoding, sampling, optical flow and CNN features, per shard."""

    shards: int = option(1, check=POSITIVE)
    decoder: str = option("pyav", choices=("pyav", "imageio"))
    decoder_threads: int = option(1, check=POSITIVE, help="threads inside one decoder (parallelise across clips)")
    sampling: str = option("all", choices=("all", "every", "fps", "count", "named"))
    every: int = option(1, check=POSITIVE, help="keep every k-th frame (sampling = 'every')")
    target_fps: float = option(10.0, check=POSITIVE, help="frames per second kept (sampling = 'fps')")
    count: int = option(16, check=POSITIVE, help="evenly spaced frames kept (sampling = 'count')")
    max_frames: int = option(0, check=NON_NEGATIVE, help="cap on frames kept per video; 0 = no cap")
    named_frames: tuple[str, ...] = option(("first", "quarter", "middle", "three_quarter", "last"),
                                           help="frames kept by sampling = 'named' (frame-position study)")
    resize: str = option("square", choices=("square", "short_side", "none"))
    size: int = option(112, check=POSITIVE, help="square side or short side in pixels")
    frame_storage: str = option("jpeg", choices=("jpeg", "uint8"))
    jpeg_quality: int = option(90, check=Check(lambda v: 1 <= v <= 100, "between 1 and 100"))
    flow: str = option("farneback", choices=("farneback", "dis", "tvl1", "tvl1_torch", "raft", "none"),
                       help="tvl1_torch: TV-L1 in torch on `device` (a GPU when present); raft needs flow_weights")
    flow_storage: str = option("uint8", choices=("uint8", "float16"))
    flow_bound: float = option(20.0, check=POSITIVE, help="pixels; flow is clipped to +-bound when quantised")
    flow_compression: str = option("lzf", choices=("none", "lzf", "gzip"),
                                   help="HDF5 filter on stored flow (6-13x smaller): lzf fastest, gzip (level 1) smallest")
    chunk_frames: int = option(32, check=POSITIVE,
                               help="kept frames decoded, flowed and featured at a time: bounds memory, not the "
                                    "output; small enough that a worker's next chunk is ready while the CNN "
                                    "takes the last")
    workers: int = option(-1, check=Check(lambda v: v >= -1, "-1 (the task's cores - 1), 0 or more"),
                          help="decode-and-flow processes feeding the CNN's; -1 = the task's cores - 1, 0 = none")
    max_attempts: int = option(3, check=POSITIVE,
                               help="starts of one video whose process dies on it (crash, OOM kill) before it is listed as failed")
    dis_preset: str = option("fast", choices=("ultrafast", "fast", "medium"), help="DIS optical flow preset")
    tvl1_scales: int = option(3, check=POSITIVE, help="TV-L1 pyramid levels (OpenCV default 5; reduced for CPU)")
    tvl1_warps: int = option(3, check=POSITIVE, help="TV-L1 warps per level (OpenCV default 5)")
    tvl1_scale_step: float = option(0.5, check=FRACTION, help="TV-L1 size ratio of pyramid levels (OpenCV default 0.8)")
    tvl1_tau: float = option(0.25, check=POSITIVE, help="TV-L1 time step of the primal-dual scheme (<= 0.25 converges)")
    tvl1_lambda: float = option(0.15, check=POSITIVE, help="TV-L1 weight of the data term (smaller: smoother flow)")
    tvl1_theta: float = option(0.3, check=POSITIVE, help="TV-L1 tightness of the relaxation")
    tvl1_epsilon: float = option(0.01, check=POSITIVE, help="TV-L1 stopping threshold (pixels, RMS change per step)")
    tvl1_inner_iterations: int = option(30, check=POSITIVE, help="TV-L1 primal-dual steps per median filtering")
    tvl1_outer_iterations: int = option(10, check=POSITIVE, help="TV-L1 median filterings per warp")
    tvl1_median_filtering: int = option(5, choices=(1, 3, 5), help="TV-L1 median window between steps; 1 = none")
    tvl1_compile: bool = option(False, help="tvl1_torch: fuse each step with torch.compile (GPUs; compiles ~1 min first)")
    flow_batch_size: int = option(32, check=POSITIVE, help="frame pairs per call of tvl1_torch / raft (GPU memory)")
    flow_weights: str = option("", help="raft: local .pt/.pth state dict of torchvision's raft_small/raft_large")
    raft_model: str = option("raft_small", choices=("raft_small", "raft_large"), help="raft: the architecture of flow_weights")
    raft_iterations: int = option(12, check=POSITIVE, help="raft: recurrent refinement steps")
    backbone: str = option("resnet18", choices=(*BACKBONES, "none"))
    weights: str = option("", help="local .pt/.pth state dict; empty = random initialisation")
    batch_size: int = option(32, check=POSITIVE)
    device: str = option("auto", choices=("auto", "cpu", "cuda"))


@dataclass(frozen=True)
class TrainConfig:
    """Models and the trainer."""

    model: str = option("lstm", choices=KINDS.keys())     # a live view: every kind of the table, when it is read
    backbone: str = option("resnet18", choices=(*BACKBONES, "small"))
    weights: str = option("", help="local weights file for the backbone; empty = random initialisation")
    freeze_trunk: bool = option(False)
    epochs: int = option(30, check=POSITIVE)
    batch_size: int = option(16, check=POSITIVE)
    optimizer: str = option("adamw", choices=("adamw", "sgd"))
    lr: float = option(1e-3, check=POSITIVE)
    momentum: float = option(0.9, check=NON_NEGATIVE)
    weight_decay: float = option(1e-4, check=NON_NEGATIVE)
    clip_grad: float = option(5.0, check=NON_NEGATIVE, help="max gradient norm; 0 = off")
    schedule: str = option("none", choices=("none", "cyclic", "plateau"))
    early_stopping: int = option(0, check=NON_NEGATIVE, help="epochs without val-loss improvement; 0 = off")
    seq_len: int = option(120, check=POSITIVE, help="L: frames per LSTM sequence")
    chunk: int = option(30, check=POSITIVE, help="K: steps per truncated-BPTT chunk")
    layers: int = option(2, choices=(1, 2, 3))
    hidden: int = option(256, check=POSITIVE)
    dropout: float = option(0.2, check=Check(lambda v: 0.0 <= v < 1.0, "in [0, 1)"))
    loss_weighting: str = option("linear", choices=("linear", "uniform", "last"))
    temporal_centering: bool = option(True, help="subtract each clip's mean feature, append the mean")
    mean_scale: float = option(0.05, check=NON_NEGATIVE,
                               help="lstm: weight of the appended clip mean (small: learn motion before memorising clips)")
    flow_stack: int = option(10, check=POSITIVE, help="L flow fields per flow-CNN input")
    flow_camera_compensation: str = option("median", choices=("median", "mean", "none"))
    fusion_weights: tuple[float, ...] = option((1.0, 1.5))
    tsn_segments: int = option(3, check=POSITIVE, help="tsn: K segments per video, one snippet each")
    tsn_stack: int = option(5, check=POSITIVE, help="tsn: flow fields (tsn_flow) or RGB differences (tsn_diff) per snippet")
    partial_bn: str = option("auto", choices=("auto", "on", "off"),
                             help="tsn: freeze the statistics of every BatchNorm layer but the first; auto = on "
                                  "when weights are given")
    clip_frames: int = option(16, check=POSITIVE, help="c3d: frames per clip; cnnlstm: frames per sequence")
    c3d_crop: float = option(0.875, check=Check(lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
                             help="c3d: square crop side as a fraction of the short side (C3D: 112 of 128)")
    c3d_width: int = option(64, check=POSITIVE, help="c3d: channels of the first conv layer (C3D: 64)")
    c3d_fc: int = option(4096, check=POSITIVE, help="c3d: size of the two hidden FC layers (C3D: 4096)")
    procs: int = option(1, check=POSITIVE, help="local processes (gloo)")
    workers: int = option(-1, check=Check(lambda v: v >= -1, ">= -1"),
                          help="DataLoader workers per process; -1 = from the task's cores: all but one on a GPU, "
                               "a quarter on the CPU (at least 1)")
    prefetch: int = option(2, check=POSITIVE, help="batches each DataLoader worker prepares ahead")
    cache_gb: float = option(4.0, check=NON_NEGATIVE,
                             help="keep the decoded inputs in memory (filled in the first epoch) when the whole "
                                  "set fits this many GB per training process; 0 = off")
    gpu_prepare: bool = option(True, help="on CUDA: decode JPEG frames and prepare inputs (flow dequantisation and "
                                          "camera compensation, normalisation, augmentation) on the GPU")
    shuffle: str = option("global", choices=("global", "blocks"),
                          help="epoch order: a global shuffle, or shuffled blocks of videos neighbouring in the "
                               "files (local reads; batches mix fewer classes when files are sorted by class)")
    shuffle_block: int = option(32, check=POSITIVE, help="shuffle = blocks: videos per block")
    seed: int = option(0, check=NON_NEGATIVE)
    device: str = option("auto", choices=("auto", "cpu", "cuda"))
    val_fraction: float = option(0.15, check=Check(lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
                                 help="share of each class of the TRAIN split held out for validation")
    augment: bool = option(True, help="random crop at a jittered scale (centre/corners) and flip")
    scale_jitter: tuple[float, ...] = option((1.0, 0.875, 0.75, 0.66), help="crop sides, fractions of the short side")
    flip: bool = option(True, help="random horizontal flip (flow: u negated)")
    amp: bool = option(True, help="mixed precision on CUDA (ignored on the CPU)")
    lr_min: float = option(1e-4, check=POSITIVE, help="cyclic schedule: lower bound (lr is the upper)")
    cycle_epochs: float = option(2.0, check=POSITIVE, help="cyclic schedule: epochs per half cycle")
    plateau_factor: float = option(0.5, check=FRACTION, help="reduce-on-plateau: lr multiplier")
    plateau_patience: int = option(2, check=NON_NEGATIVE, help="reduce-on-plateau: epochs without improvement")
    input_norm: bool = option(False, help="lstm: standardise each step's features inside the model")
    features: str = option("", help="lstm: name of the feature set to train on (finetuned, or a backbone's); "
                                    "empty = the fine-tuned set when `run features` made one, else extract.backbone's")
    init_from_runs: bool = option(True, help="twostream: start from WORK/runs/frame and WORK/runs/flow when present")
    keep_checkpoints: int = option(2, check=POSITIVE, help="epoch checkpoints kept (best.pt is kept apart)")
    checkpoint: str = option("", help="the frame CNN of `run features` (and so the fine-tuned features the lstm "
                                      "reads): a run folder or checkpoint; empty = WORK/runs/frame")
    tensorboard: bool = option(False, help="rank 0 also writes TensorBoard event files into WORK/runs/<model>/")


@dataclass(frozen=True)
class EvalConfig:
    """Sharded evaluation and inference strategies."""

    shards: int = option(1, check=POSITIVE)
    window_stride: int = option(30, check=POSITIVE, help="lstm 'windows': start of each seq_len window, in frames")
    checkpoint: str = option("best", choices=("best", "last"), help="which checkpoint of the run to evaluate")
    frame_samples: int = option(8, check=POSITIVE, help="frame 'mean_frames': evenly spaced frames averaged")
    flow_windows: int = option(3, check=POSITIVE, help="flow 'mean_stacks': evenly spaced flow stacks averaged")
    tsn_snippets: int = option(25, check=POSITIVE, help="tsn 'dense': evenly spaced snippets averaged")
    clip_stride: int = option(8, check=POSITIVE, help="c3d 'video': frames between the starts of its clips")
    batch_size: int = option(32, check=POSITIVE, help="inputs per forward pass")
    device: str = option("auto", choices=("auto", "cpu", "cuda"))


@dataclass(frozen=True)
class MergeConfig:
    """Which features the merge stage gathers into one file, and where the file goes."""

    features_dir: str = option("", help="folder of feature shards; empty = WORK/extract (e.g. WORK/features/frame)")
    output: str = option("", help="merged file; empty = features.h5 beside the shards (WORK/features.h5 for extract)")


@dataclass(frozen=True)
class ReportConfig:
    """The reducer (`hpcvid collect`, the pipeline's reduce stage)."""

    out: str = option("", help="report folder; empty = results/<name of WORK>")
    allow_partial: bool = option(False, help="write the report over the shards that are there, listing the rest")
    runs: tuple[str, ...] = option((), help="only these runs of WORK/eval; empty = all")
    fusion: tuple[str, ...] = option(("tsn_rgb:1", "tsn_flow:1.5"), check=FUSION,
                                     help="RUN:WEIGHT of each run whose scores are fused (weighted mean of softmax "
                                          "scores); empty = no fusion")
    explain: int = option(0, check=NON_NEGATIVE, help="Grad-CAM overlays of this many test videos per run in the "
                                                      "report (one right, one wrong per class)")


@dataclass(frozen=True)
class PredictConfig:
    """Using a trained run on new videos (``hpcvid predict``, ``hpcvid submit predict``)."""

    run: str = option("", help="the trained run: a run folder (WORK/runs/NAME) or one of its checkpoint files")
    inputs: tuple[str, ...] = option((), help="videos, and folders searched for videos (dataset.extensions)")
    checkpoint: str = option("best", choices=("best", "last"), help="which checkpoint of a run folder")
    top: int = option(5, check=POSITIVE, help="classes listed per video, best first")
    out: str = option("", help="the table of predictions, .csv or .json; empty = WORK/predictions.csv")
    timeline: bool = option(False, help="also label each window of each video: CSV + PNG strip per video")
    window: int = option(0, check=NON_NEGATIVE, help="timeline window in kept frames; 0 = the run's train.seq_len")
    stride: int = option(0, check=NON_NEGATIVE, help="timeline step between windows in kept frames; 0 = half a window")
    shards: int = option(1, check=POSITIVE)
    device: str = option("auto", choices=("auto", "cpu", "cuda"), help="where decoding's CNN and the model run")


MODELS = DEFAULT_KINDS   # the study's default: the four classic kinds (the others are chosen by name)
_MODEL_LIST = Check(lambda v: len(v) > 0 and all(m in KINDS for m in v) and len(set(v)) == len(v),
                    f"a list of distinct models from: {', '.join(KINDS)}")
_STAGE_LIST = Check(lambda v: len(v) > 0 and len(set(v)) == len(v), "a non-empty list of distinct stages")


@dataclass(frozen=True)
class PipelineConfig:
    """What `hpcvid submit pipeline` queues: the models of the study and the stages (hpcvid.launch.pipeline)."""

    models: tuple[str, ...] = option(MODELS, check=_MODEL_LIST, help="models trained, evaluated and compared")
    # the stage table (hpcvid.stages) is not imported here: it may come to import this module
    stages: tuple[str, ...] = option(("extract", "merge", "train", "features", "eval", "reduce"), check=_STAGE_LIST,
                                     help="stages queued; a unit whose stage is left out is taken as done")


def _mapping(help: str) -> Any:
    """A field holding a table (``launch.sbatch``, the per-stage tables): a dict, left out of hashing."""
    return field(default_factory=dict, hash=False, metadata={"choices": None, "check": None, "help": help})


@dataclass(frozen=True)
class LaunchConfig:
    """Where shards run: the cluster profile (slurm/*.toml) fills this section.

    ``[launch]`` holds the defaults of every stage; ``[launch.extract]``, ``[launch.train]``, ... (any stage of
    hpcvid.stages.STAGES) override them for that stage (kept in ``stages``; :meth:`for_stage` applies them).
    ``sbatch`` passes any other sbatch option through (checked against sbatch's own options at submit time).
    """

    executor: str = option("local", choices=("local", "slurm", "debug"))
    partition: str = option("")
    account: str = option("")
    qos: str = option("")
    gres: str = option("")
    cpus_per_task: int = option(2, check=POSITIVE)
    nodes: int = option(1, check=POSITIVE, help="nodes of a distributed job (train); array tasks use one")
    tasks_per_node: int = option(0, check=NON_NEGATIVE,
                                 help="ranks per node of a distributed job; 0 = one per GPU, or 1 without GPUs")
    gpus_per_node: int = option(0, check=NON_NEGATIVE, help="GPUs per node (per array task for shard stages)")
    mem: str = option("", help="per node, e.g. 16G; empty = the cluster default")
    walltime: str = option("01:00:00", check=WALLTIME,
                           help="per job; `submit extract` predicts it from measured rates when none is given")
    max_walltime: str = option("", check=Check(lambda v: not v or bool(_WALLTIME.match(v)),
                                               "empty or a walltime like HH:MM:SS or D-HH:MM:SS"),
                               help="the partition's limit: `hpcvid plan` warns above it and fits shards to it")
    array_parallelism: int = option(64, check=POSITIVE)
    signal_delay_s: int = option(90, check=POSITIVE, help="seconds before the walltime to checkpoint")
    max_requeues: int = option(3, check=NON_NEGATIVE)
    setup: tuple[str, ...] = option((), help="shell lines the job script runs first (module load ..., source .../activate)")
    container: str = option("", help="Apptainer/Singularity image the jobs run in; empty = none")
    container_runtime: str = option("apptainer", choices=("apptainer", "singularity"))
    container_binds: tuple[str, ...] = option((), help="paths bound into the container besides WORK and the dataset")
    python: str = option("", help="the interpreter jobs run; empty = this one (python3 inside a container)")
    sbatch: dict[str, Any] = _mapping("any other sbatch option: {constraint = \"a100\", exclusive = true}")
    stages: dict[str, dict[str, Any]] = _mapping("per-stage overrides: [launch.extract], [launch.train], ...")

    def for_stage(self, stage: str) -> "LaunchConfig":
        """The launch settings of one stage: [launch] with [launch.<stage>] over it (sbatch merged by option)."""
        overrides = dict(self.stages.get(stage, {}))
        sbatch = {**self.sbatch, **overrides.pop("sbatch", {})}
        return dataclasses.replace(self, **overrides, sbatch=sbatch)


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a work folder."""

    work: str = option("work/default", help="work folder: manifest, shards, runs, predictions")
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    @property
    def work_dir(self) -> Path:
        return Path(self.work)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_stage(self, stage: str) -> "Config":
        """This config with ``launch`` resolved for ``stage`` (its [launch.<stage>] table applied)."""
        return dataclasses.replace(self, launch=self.launch.for_stage(stage))


_SECTION_CLASSES = {
    "dataset": DatasetConfig, "synth": SynthConfig, "extract": ExtractConfig,
    "train": TrainConfig, "eval": EvalConfig, "merge": MergeConfig, "report": ReportConfig,
    "predict": PredictConfig, "pipeline": PipelineConfig, "launch": LaunchConfig,
}
# Keys a [launch.<stage>] table may set: every launch key but the executor (one per submission).
STAGE_LAUNCH_KEYS = tuple(f.name for f in dataclasses.fields(LaunchConfig) if f.name not in ("executor", "stages"))
_SBATCH_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


# ----------------------------------------------------------------------------------------- resolving
def load_toml(path: Path | str, what: str = "job file") -> dict[str, Any]:
    """Read a TOML file; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist: give an existing .toml file (see jobs/ and slurm/)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start}, line {line}): save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from None


def _flatten(table: Mapping[str, Any], source: str) -> dict[str, tuple[Any, str]]:
    """{'extract': {'shards': 3}} -> {'extract.shards': (3, source)}; unknown keys fail here.

    Tables inside [launch] become keys of their own, so that each layer overrides one option at a time:
    ``launch.sbatch.<option>``, ``launch.<stage>.<key>`` and ``launch.<stage>.sbatch.<option>``.
    """
    flat: dict[str, tuple[Any, str]] = {}
    for key, value in table.items():
        if key == "work":
            flat["work"] = (value, source)
        elif key == "launch":
            flat.update(_flatten_launch(_table(value, "[launch]", source), source))
        elif key in _SECTION_CLASSES:
            valid = {f.name for f in dataclasses.fields(_SECTION_CLASSES[key])}
            for name, item in _table(value, f"[{key}]", source).items():
                if name not in valid:
                    raise ConfigError(
                        f"{source}: unknown key {key}.{name}; valid keys of [{key}]: {', '.join(sorted(valid))}"
                    )
                flat[f"{key}.{name}"] = (item, source)
        else:
            raise ConfigError(
                f"{source}: unknown key {key!r}; valid top-level keys: work, {', '.join(_SECTION_CLASSES)}"
            )
    return flat


def _table(value: Any, what: str, source: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {what} must be a table of settings, not {value!r}")
    return value


def _stage_names() -> tuple[str, ...]:
    from hpcvid.stages import STAGES

    return tuple(STAGES)


def _flatten_launch(launch: Mapping[str, Any], source: str, stage: str = "") -> dict[str, tuple[Any, str]]:
    """[launch] (or one [launch.<stage>] table) as dotted keys; unknown keys and stages fail here."""
    prefix = f"launch.{stage}." if stage else "launch."
    valid = STAGE_LAUNCH_KEYS if stage else tuple(f.name for f in dataclasses.fields(LaunchConfig))
    flat: dict[str, tuple[Any, str]] = {}
    for name, item in launch.items():
        if name == "sbatch":
            for option_name, value in _table(item, f"{prefix}sbatch", source).items():
                if not _SBATCH_NAME.match(str(option_name)):
                    raise ConfigError(f"{source}: {prefix}sbatch.{option_name} is not an sbatch option name: use "
                                      "the long option without dashes, e.g. constraint or mail_type")
                flat[f"{prefix}sbatch.{option_name}"] = (item[option_name], source)
        elif not stage and name == "stages":    # the form Config.to_dict() writes
            for stage_name, table in _table(item, "launch.stages", source).items():
                flat.update(_flatten_launch_stage(stage_name, table, source))
        elif not stage and name in _stage_names():
            flat.update(_flatten_launch_stage(name, item, source))
        elif name in valid:
            flat[prefix + name] = (item, source)
        else:
            where = f"[launch.{stage}]" if stage else "[launch]"
            tables = "" if stage else f"; stage tables: {', '.join(f'[launch.{s}]' for s in _stage_names())}"
            raise ConfigError(f"{source}: unknown key {prefix}{name}; valid keys of {where}: "
                              f"{', '.join(sorted(valid))}{tables}")
    return flat


def _flatten_launch_stage(stage: str, table: Any, source: str) -> dict[str, tuple[Any, str]]:
    if stage not in _stage_names():
        raise ConfigError(f"{source}: [launch.{stage}] names no stage; stages: {', '.join(_stage_names())}")
    return _flatten_launch(_table(table, f"[launch.{stage}]", source), source, stage)


def _general_key(dotted: str) -> str:
    """'launch.train.walltime' -> 'launch.walltime', 'launch.eval.sbatch.x' -> 'launch.sbatch.x'; others as given."""
    parts = dotted.split(".")
    if len(parts) >= 3 and parts[0] == "launch" and parts[1] != "sbatch":
        return ".".join([parts[0], *parts[2:]])
    return dotted


def _field_of(dotted: str) -> dataclasses.Field:
    if dotted == "work":
        return next(f for f in dataclasses.fields(Config) if f.name == "work")
    section, name = dotted.split(".", 1)
    return next(f for f in dataclasses.fields(_SECTION_CLASSES[section]) if f.name == name)


def _coerce(dotted: str, value: Any, source: str) -> Any:
    """Check and convert ``value`` to the field's declared type (int -> float allowed, list -> tuple)."""
    general = _general_key(dotted)
    if general.startswith("launch.sbatch."):
        return _coerce_sbatch_value(dotted, value, source)
    fld = _field_of(general)
    annotation = fld.type if not isinstance(fld.type, str) else _resolve_annotation(general)
    origin = typing.get_origin(annotation)
    if dotted == "dataset.class_map":
        return _coerce_class_map(value, source)
    if origin is tuple:
        item_type = typing.get_args(annotation)[0]
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {dotted} must be a list of {item_type.__name__}, got {value!r}")
        coerced = tuple(_coerce_scalar(dotted, item, item_type, source) for item in value)
    else:
        coerced = _coerce_scalar(dotted, value, annotation, source)
    choices = fld.metadata.get("choices")
    if choices is not None and coerced not in choices:
        raise ConfigError(
            f"{source}: {dotted} = {value!r} is not valid; choose one of: {', '.join(map(str, choices))}"
        )
    check: Check | None = fld.metadata.get("check")
    if check is not None and not check.predicate(coerced):
        raise ConfigError(f"{source}: {dotted} = {value!r} is not valid; it must be {check.description}")
    return coerced


def _coerce_class_map(value: Any, source: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A TOML table {new: [source classes] or "*"} (or its saved form, a list of pairs) -> pairs, in order."""
    pairs = value.items() if isinstance(value, Mapping) else value
    try:
        result = []
        for name, sources in pairs:
            sources = (sources,) if isinstance(sources, str) else tuple(sources)
            if not isinstance(name, str) or not name or not all(isinstance(s, str) and s for s in sources):
                raise ValueError
            result.append((name, sources))
    except (TypeError, ValueError):
        raise ConfigError(f'{source}: dataset.class_map must be a table of new class = ["source class", ...] or '
                          f'"*", got {value!r}') from None
    return tuple(result)


def _coerce_sbatch_value(dotted: str, value: Any, source: str) -> bool | str:
    """An sbatch option's value: true (a flag), false (left out) or text (numbers become text)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip()):
        return str(value)
    raise ConfigError(f"{source}: {dotted} = {value!r} is not valid; give text, a number, or true for a flag "
                      "(false leaves it out)")


def _resolve_annotation(dotted: str) -> Any:
    owner = Config if dotted == "work" else _SECTION_CLASSES[dotted.split(".", 1)[0]]
    hints = typing.get_type_hints(owner)
    return hints[dotted.split(".")[-1]]


def _coerce_scalar(dotted: str, value: Any, kind: Any, source: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a programming error in a section definition
        raise TypeError(f"unsupported config type {kind!r} for {dotted}")
    raise ConfigError(f"{source}: {dotted} = {value!r} is not valid; it must be of type {kind.__name__}")


def resolve_config(
    job_file: Path | str | None = None,
    profile: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """The one precedence: defaults < job file < cluster profile < command-line ``overrides``.

    Per stage, the launch settings are, lowest first: [launch] of the job file, [launch] of the profile,
    [launch.<stage>] of the job file, [launch.<stage>] of the profile, then the flags. A stage's own table
    wins over the defaults of any file (a site profile's [launch] cpus do not undo a job file's
    [launch.train] cpus), and a flag (``--walltime``) wins over every table.

    ``overrides`` maps dotted keys (``"extract.shards"``, ``"launch.sbatch.constraint"``) to values; ``None``
    values mean "flag not given" and are skipped, so argparse defaults of ``None`` never mask the files.
    """
    layered: dict[str, tuple[Any, str]] = {}
    if job_file is not None:
        layered.update(_flatten(load_toml(job_file, "job file"), f"job file {job_file}"))
    if profile is not None:
        layered.update(_flatten(load_toml(profile, "cluster profile"), f"cluster profile {profile}"))
    flags: dict[str, tuple[Any, str]] = {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section = dotted.split(".")[0]
        if dotted != "work" and (section not in _SECTION_CLASSES or (dotted.count(".") != 1 and section != "launch")):
            raise ConfigError(f"the command line: unknown setting {dotted!r}")
        flags.update(_flatten(_nest({dotted: value}), "the command line"))
    _override(layered, flags)
    values = {dotted: _coerce(dotted, value, source) for dotted, (value, source) in layered.items()}
    config = _build(values)
    _validate_sections(config, layered)
    return config


def _override(layered: dict[str, tuple[Any, str]], layer: Mapping[str, tuple[Any, str]]) -> None:
    """Put flags (or a caller's changes) over everything: a general launch key replaces every stage's value."""
    general = {key for key in layer if _general_key(key) == key and key.startswith("launch.")}
    for key in [k for k in layered if k not in layer and _general_key(k) != k and _general_key(k) in general]:
        del layered[key]
    layered.update(layer)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'launch.train.walltime': v} -> {'launch': {'train': {'walltime': v}}}."""
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, name = dotted.split(".")
        table = nested
        for part in parents:
            table = table.setdefault(part, {})
        table[name] = value
    return nested


def _build(values: Mapping[str, Any]) -> Config:
    sections = {}
    for name, cls in _SECTION_CLASSES.items():
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if cls is LaunchConfig:
            own.update(_launch_tables(values))
        sections[name] = cls(**own)
    return Config(work=values.get("work", Config.work), **sections)


def _launch_tables(values: Mapping[str, Any]) -> dict[str, Any]:
    """The dotted sbatch and stage keys gathered back into LaunchConfig's ``sbatch`` and ``stages`` tables."""
    sbatch: dict[str, Any] = {}
    stages: dict[str, dict[str, Any]] = {}
    for dotted, value in values.items():
        parts = dotted.split(".")
        if parts[0] != "launch" or len(parts) < 3:
            continue
        if parts[1] == "sbatch":
            sbatch[parts[2]] = value
        elif parts[2] == "sbatch":
            stages.setdefault(parts[1], {}).setdefault("sbatch", {})[parts[3]] = value
        else:
            stages.setdefault(parts[1], {})[parts[2]] = value
    return {"sbatch": dict(sorted(sbatch.items())), "stages": dict(sorted(stages.items()))}


def _validate_sections(config: Config, layered: Mapping[str, tuple[Any, str]]) -> None:
    """Cross-field rules; the message names where the offending values came from."""
    where = lambda *keys: ", ".join(sorted({layered[k][1] for k in keys if k in layered})) or "the defaults"  # noqa: E731
    if config.synth.classes % 2:
        raise ConfigError(f"{where('synth.classes')}: synth.classes = {config.synth.classes} must be even "
                          "(2 appearances x N motions)")
    if config.synth.test_per_class >= config.synth.per_class:
        raise ConfigError(f"{where('synth.test_per_class', 'synth.per_class')}: synth.test_per_class must be "
                          "smaller than synth.per_class")
    if config.train.chunk > config.train.seq_len:
        raise ConfigError(f"{where('train.chunk', 'train.seq_len')}: train.chunk ({config.train.chunk}) must "
                          f"not exceed train.seq_len ({config.train.seq_len})")


def replace(config: Config, **changes: Any) -> Config:
    """A copy of ``config`` with dotted-key changes, validated like command-line overrides."""
    merged = _flatten({k: v for k, v in config.to_dict().items()}, "the defaults")
    _override(merged, _flatten(_nest(changes), "the caller"))
    values = {k: _coerce(k, v, s) for k, (v, s) in merged.items()}
    result = _build(values)
    _validate_sections(result, merged)
    return result


def write_resolved(config: Config, folder: Path | str | None = None, argv: list[str] | None = None) -> Path:
    """Write the resolved config (and the command line that made it) into the work folder (or ``folder``)."""
    from hpcvid.workfolder import RESOLVED_CONFIG_NAME

    path = (Path(folder) if folder is not None else config.work_dir) / RESOLVED_CONFIG_NAME
    atomic_write_json(path, {"config": config.to_dict(), "argv": argv})
    return path


def config_from_dict(payload: Mapping[str, Any]) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (e.g. from a checkpoint or record)."""
    flat = _flatten({"work": payload.get("work", Config.work), **payload}, "a saved config")
    return _build({k: _coerce(k, v, s) for k, (v, s) in flat.items()})


def load_resolved(work: Path | str) -> Config:
    """The config a work folder was last run with (written by :func:`write_resolved`)."""
    from hpcvid.workfolder import WorkFolder

    path = WorkFolder(work).resolved_config
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run `hpcvid index --config JOB --work {work}` first")
    return config_from_dict(json.loads(path.read_text())["config"])
