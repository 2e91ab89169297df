"""The ``hpcvid`` command line: argparse, dashed flags, help on each.

Each verb lives in its own module, which provides ``add_cli(parser)`` and ``main(args) -> int``. Verb
modules must not import torch, cv2, h5py, av, matplotlib or submitit at module level, so that
``hpcvid --help`` and ``hpcvid status`` start in well under a second on a login node.

Errors of the project's own types, and mistakes on the command line, become one line on stderr and a
non-zero exit code (2: bad input or configuration, 3: finished but some items failed).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any, Mapping, NoReturn, Sequence

from hpcvid import __version__
from hpcvid.config import Config, resolve_config
from hpcvid.errors import ConfigError, HpcvidError, ResourceError, machine_fault

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "synth": ("hpcvid.stages.synth", "generate the synthetic action dataset (UCF-101 layout)"),
    "index": ("hpcvid.stages.index", "index a dataset and its split into WORK/manifest.json"),
    "plan": ("hpcvid.cli.plan", "predict each extraction shard's time, the walltime to ask and the shard count"),
    "run": ("hpcvid.cli.run", "run a stage on this machine and wait"),
    "submit": ("hpcvid.cli.submit", "queue a stage (or the whole pipeline) on SLURM and return at once"),
    "status": ("hpcvid.cli.status", "per-shard SLURM state, progress, failures and ETA of a work folder"),
    "cancel": ("hpcvid.cli.cancel", "cancel every queued or running job of a work folder"),
    "mpi": ("hpcvid.cli.mpi", "run a shard stage across the ranks of one MPI allocation"),
    "collect": ("hpcvid.cli.collect", "reduce prediction shards into results/NAME (tables, confusion matrices, plots)"),
    "predict": ("hpcvid.cli.predict", "classify videos of one's own with a trained run: top classes, a timeline"),
    "explain": ("hpcvid.cli.explain", "Grad-CAM overlays: where in a video's frames a trained model saw its class"),
    "demo": ("hpcvid.cli.demo", "the whole pipeline on a small synthetic dataset, on this machine -> results/demo"),
    "bench": ("hpcvid.cli.bench", "speed ratios of decode, flow, features and storage -> results/bench"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def positive_int(text: str) -> int:
    """An argparse type for counts that must be at least 1 (``--jobs``, ``--shards``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_config_arguments(parser: argparse.ArgumentParser, *, work_required: bool = False) -> None:
    """The flags every stage shares: job file, cluster profile and work folder."""
    parser.add_argument("--config", metavar="JOB.toml", help="job file (see jobs/)")
    parser.add_argument("--profile", metavar="PROFILE.toml", help="cluster profile (see slurm/)")
    parser.add_argument("--work", metavar="WORK", required=work_required,
                        help="work folder (manifest, shards, runs); overrides the job file's `work`")


def config_from_args(args: argparse.Namespace, overrides: Mapping[str, Any] | None = None) -> Config:
    """Resolve defaults < --config < --profile < flags (``overrides``: dotted key -> value or None)."""
    flags = {"work": getattr(args, "work", None)}
    flags.update(overrides or {})
    return resolve_config(getattr(args, "config", None), getattr(args, "profile", None), flags)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="hpcvid",
        description="Video action recognition on HPC clusters: from raw clips to published tables.",
    )
    parser.add_argument("--version", action="version", version=f"hpcvid {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)  # sub-parsers: OneLineParser too
    for verb, (module_name, help_text) in VERBS.items():
        module = importlib.import_module(module_name)
        sub = verbs.add_parser(verb, help=help_text, description=help_text)
        module.add_cli(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except HpcvidError as error:
        print(f"hpcvid: error: {error}", file=sys.stderr)
        return error.exit_code
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    global _MACHINE_FAULT
    try:
        return int(args._module.main(args) or 0)
    except HpcvidError as error:
        print(f"hpcvid: error: {error}", file=sys.stderr)
        _MACHINE_FAULT = isinstance(error, ResourceError)
        return error.exit_code
    except (OSError, MemoryError) as error:
        fault = machine_fault(error, getattr(error, "filename", None) or "the work folder")
        if fault is None:
            raise
        print(f"hpcvid: error: {fault}", file=sys.stderr)
        _MACHINE_FAULT = True
        return fault.exit_code
    except KeyboardInterrupt:
        print("hpcvid: interrupted", file=sys.stderr)
        return 130


_MACHINE_FAULT = False


def entry_point() -> None:
    from hpcvid.launch.executors import exit_without_collecting

    exit_without_collecting()
    code = main()
    if _MACHINE_FAULT:
        # After a full disk refused HDF5 a write, the library's own shutdown can touch the half-closed file and
        # crash (seen here: SIGSEGV in H5D_close at exit, after the error was reported). The message is out and
        # every file was written atomically: leave without the library's exit handlers.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)
