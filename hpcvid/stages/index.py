"""Indexing a dataset and its split into ``WORK/manifest.json`` (the contract of hpcvid.storage.manifest).

Three layouts (``dataset.format``):

* ``ucf101``: ``classInd.txt`` ("1 ApplyEyeMakeup"), ``trainlist0N.txt`` ("ApplyEyeMakeup/v_..._c01.avi 1"),
  ``testlist0N.txt`` ("ApplyEyeMakeup/v_..._c01.avi"); videos at ROOT/<Class>/<file>.
* ``hmdb51``: one ``<class>_test_split<N>.txt`` per class ("April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1"
  with 1 = train, 2 = test, 0 = unused); videos at ROOT/<class>/<file>.
* ``folders``: ROOT/<class>/**/<video>; the split is generated from a stable hash of each id, so it never
  changes when videos are added or removed (``dataset.test_fraction`` of the ids are test).

Split files are looked for in ``dataset.splits_dir`` if set, else in the root and in the folders the
official archives unpack to (``ucfTrainTestlist``, ``testTrainMulti_7030_splits``).

The parsers are pure functions of the split files' text, so they are tested on literal text. Problems
that make the split meaningless (unknown class, duplicate id, no video at all, missing split file) raise
DatasetError naming file:line; a listed video whose file is missing, or one that cannot be probed, is a
warning (the unreadable one stays in the manifest with ``probe_error`` so later stages count it).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

from hpcvid.config import Config, write_resolved
from hpcvid.errors import DatasetError, VideoError
from hpcvid.storage.manifest import Manifest, VideoEntry, write_manifest

log = logging.getLogger(__name__)

UCF_SPLIT_DIRS = ("", "ucfTrainTestlist")
HMDB_SPLIT_DIRS = ("", "testTrainMulti_7030_splits", "splits")
HMDB_SPLIT_NAME = re.compile(r"^(?P<cls>.+)_test_split(?P<split>\d+)\.txt$")
HMDB_CODES = {"0": "unused", "1": "train", "2": "test"}


@dataclass(frozen=True)
class SplitEntry:
    """One listed video: its path below its root ('/'-separated), class, split and where it was listed.

    ``root`` 0 is the dataset root; 1, 2, ... the folders of ``dataset.extra_roots``, whose ids carry the
    folder's name as a prefix so that they can never collide with the dataset's own.
    """

    relative: str
    class_name: str
    split: str
    source: str  # "file:line" (or the folder, for generated splits)
    root: int = 0
    prefix: str = ""

    @property
    def id(self) -> str:
        """The stable id: the path below the root without its extension (behind the extra root's name)."""
        stem = posixpath.splitext(self.relative)[0]
        return f"{self.prefix}/{stem}" if self.prefix else stem


@dataclass(frozen=True)
class ParsedSplit:
    classes: tuple[str, ...]
    entries: tuple[SplitEntry, ...]
    files: tuple[str, ...]  # the split files read


# ---------------------------------------------------------------------------------------- UCF-101
def _lines(text: str) -> Iterable[tuple[int, str]]:
    """Non-empty lines with 1-based numbers (tolerates CRLF and trailing blanks, as the real files have)."""
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line:
            yield number, line


def parse_class_index(text: str, source: str) -> tuple[str, ...]:
    """classInd.txt: '1 ApplyEyeMakeup' per line, numbered 1..N in order."""
    classes: list[str] = []
    for number, line in _lines(text):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise DatasetError(f"{source}:{number}: expected 'INDEX ClassName', got {line!r}")
        if int(parts[0]) != len(classes) + 1:
            raise DatasetError(f"{source}:{number}: class index {parts[0]} out of order (expected {len(classes) + 1})")
        if parts[1] in classes:
            raise DatasetError(f"{source}:{number}: class {parts[1]!r} is listed twice")
        classes.append(parts[1])
    if not classes:
        raise DatasetError(f"{source}: lists no classes")
    return tuple(classes)


def parse_ucf101_list(text: str, source: str, classes: Sequence[str], split: str) -> list[SplitEntry]:
    """trainlist ('Class/v_Class_g08_c01.avi 1') or testlist ('Class/v_Class_g08_c01.avi') lines."""
    entries = []
    for number, line in _lines(text):
        parts = line.split()
        where = f"{source}:{number}"
        if len(parts) not in (1, 2) or "/" not in parts[0]:
            raise DatasetError(f"{where}: expected 'Class/video.avi' (and a class number), got {line!r}")
        relative = parts[0].replace("\\", "/")
        class_name = relative.split("/", 1)[0]
        if relative.startswith("/") or ".." in relative.split("/"):
            entries.append(SplitEntry(relative, class_name, split, where))   # refused by confine(), never read
            continue
        if class_name not in classes:
            raise DatasetError(f"{where}: class {class_name!r} is not in classInd.txt")
        if len(parts) == 2:
            if not parts[1].isdigit() or int(parts[1]) != classes.index(class_name) + 1:
                raise DatasetError(f"{where}: class number {parts[1]} disagrees with classInd.txt "
                                   f"({class_name} is {classes.index(class_name) + 1})")
        entries.append(SplitEntry(relative, class_name, split, where))
    return entries


def read_ucf101(splits_dir: Path, split: int) -> ParsedSplit:
    names = ("classInd.txt", f"trainlist{split:02d}.txt", f"testlist{split:02d}.txt")
    for name in names:
        if not (splits_dir / name).is_file():
            raise DatasetError(f"missing split file: expected {name} in {splits_dir} (set dataset.splits_dir or "
                               "--splits-dir to the folder holding classInd.txt, trainlistNN.txt, testlistNN.txt)")
    class_file, train_file, test_file = (splits_dir / name for name in names)
    classes = parse_class_index(class_file.read_text(), str(class_file))
    entries = parse_ucf101_list(train_file.read_text(), str(train_file), classes, "train")
    entries += parse_ucf101_list(test_file.read_text(), str(test_file), classes, "test")
    return ParsedSplit(classes, tuple(entries), tuple(map(str, (class_file, train_file, test_file))))


# ----------------------------------------------------------------------------------------- HMDB51
def parse_hmdb51_file(text: str, source: str, class_name: str) -> list[SplitEntry]:
    """'<class>_test_splitN.txt': 'April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1' (0 unused, 1 train, 2 test)."""
    entries = []
    for number, line in _lines(text):
        parts = line.split()
        where = f"{source}:{number}"
        if len(parts) != 2 or parts[1] not in HMDB_CODES:
            raise DatasetError(f"{where}: expected 'video.avi CODE' with CODE 0 (unused), 1 (train) or 2 (test), "
                               f"got {line!r}")
        entries.append(SplitEntry(f"{class_name}/{parts[0]}", class_name, HMDB_CODES[parts[1]], where))
    return entries


def read_hmdb51(splits_dir: Path, split: int) -> ParsedSplit:
    by_class = {HMDB_SPLIT_NAME.match(p.name)["cls"]: p for p in splits_dir.glob(f"*_test_split{split}.txt")
                if HMDB_SPLIT_NAME.match(p.name)}
    if not by_class:
        raise DatasetError(f"missing split files: expected <class>_test_split{split}.txt files in {splits_dir} "
                           "(set dataset.splits_dir or --splits-dir to the unpacked testTrainMulti_7030_splits)")
    # Labels follow sorted class names ('climb' before 'climb_stairs'), not sorted file names.
    classes = tuple(sorted(by_class))
    files = [by_class[name] for name in classes]
    entries: list[SplitEntry] = []
    for path, class_name in zip(files, classes):
        entries += parse_hmdb51_file(path.read_text(), str(path), class_name)
    return ParsedSplit(classes, tuple(entries), tuple(map(str, files)))


# ------------------------------------------------------------------------------------- confinement
def confine(root: Path, relative: str, follow_symlinks: str = "inside") -> tuple[Path | None, str]:
    """The file a split entry names, when it lies inside the dataset root; else (None, why it is refused).

    An entry is a path below the root. One that is absolute, climbs out with '..', or passes through a
    symbolic link that points outside the root (``follow_symlinks = "inside"``, the default; ``"none"``
    refuses every link, ``"all"`` follows every link, for sites that link datasets in) is refused and never
    opened: a split file must not make hpcvid read, probe or extract files elsewhere on the machine.
    """
    text = relative.replace("\\", "/")
    pure = PurePosixPath(text)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", text):
        return None, "is an absolute path"
    if ".." in pure.parts:
        return None, "climbs out of the dataset root with '..'"
    path = root.joinpath(*pure.parts)
    if follow_symlinks == "all":
        return path, ""
    inside = root.resolve()
    current = root
    for part in pure.parts:
        current = current / part
        if not current.is_symlink():
            continue
        target = current.resolve()
        if follow_symlinks == "none":
            return None, f"goes through the symbolic link {current} (dataset.follow_symlinks = 'none')"
        if not target.is_relative_to(inside):
            return None, f"goes through the symbolic link {current}, which points outside the dataset root ({target})"
    return path, ""


def _refusal(source: str, relative: str, why: str) -> str:
    return (f"{source}: {relative} refused: it {why}; it is not opened (entries must lie below the dataset root; "
            "dataset.follow_symlinks = 'all' follows links that leave it)")


# ---------------------------------------------------------------------------------------- folders
def stable_fraction(video_id: str) -> float:
    """A number in [0, 1) fixed by the id alone (not by Python's salted hash): the generated split's key."""
    return int.from_bytes(hashlib.sha256(video_id.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def read_folders(root: Path, extensions: Sequence[str], test_fraction: float,
                 follow_symlinks: str = "inside") -> tuple[ParsedSplit, list[str]]:
    """Classes = sub-folders of ROOT holding videos; a video is test when stable_fraction(id) < test_fraction.

    Videos are confined to ROOT like split entries (:func:`confine`): a linked folder or file that leads
    outside it is refused with a warning, so it can neither become a class nor be read.
    """
    suffixes = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    warnings, entries, classes = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        candidates = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                            and not any(part.startswith(".") for part in p.relative_to(root).parts))
        videos = []
        for video in candidates:
            relative = video.relative_to(root).as_posix()
            path, why = confine(root, relative, follow_symlinks)
            if path is None:
                warnings.append(_refusal(str(folder), relative, why))
            else:
                videos.append(relative)
        if not videos:
            continue
        classes.append(folder.name)
        for relative in videos:
            split = "test" if stable_fraction(posixpath.splitext(relative)[0]) < test_fraction else "train"
            entries.append(SplitEntry(relative, folder.name, split, str(folder)))
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in suffixes]
    if loose:
        warnings.append(f"{root}: {len(loose)} video(s) directly in the root ignored (e.g. {loose[0]}); "
                        "put each class in its own folder")
    return ParsedSplit(tuple(classes), tuple(entries), ()), warnings


# ------------------------------------------------------------------------------------------ index
def find_splits_dir(root: Path, splits_dir: str, dataset_format: str, split: int) -> Path:
    """The configured folder, or the first of the usual places that holds the format's split files."""
    if splits_dir:
        return Path(splits_dir)
    marker = "classInd.txt" if dataset_format == "ucf101" else f"*_test_split{split}.txt"
    for sub in UCF_SPLIT_DIRS if dataset_format == "ucf101" else HMDB_SPLIT_DIRS:
        candidate = root / sub if sub else root
        if any(candidate.glob(marker)):
            return candidate
    return root


def parse_split(config: Config) -> tuple[ParsedSplit, list[str]]:
    """Read the configured dataset's split (no probing)."""
    dataset = config.dataset
    root = Path(dataset.root)
    if not dataset.root:
        raise DatasetError("no dataset: set dataset.root in the job file or pass --dataset DIR")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder: fix dataset.root or --dataset")
    if dataset.format == "folders":
        return read_folders(root, dataset.extensions, dataset.test_fraction, dataset.follow_symlinks)
    splits_dir = find_splits_dir(root, dataset.splits_dir, dataset.format, dataset.split)
    reader = read_ucf101 if dataset.format == "ucf101" else read_hmdb51
    return reader(splits_dir, dataset.split), []


def read_extra_roots(config: Config) -> tuple[list[SplitEntry], list[str], list[Path]]:
    """The videos of ``dataset.extra_roots`` (a folder per class each), with their roots' index and prefix."""
    dataset = config.dataset
    entries: list[SplitEntry] = []
    warnings: list[str] = []
    roots = []
    for number, folder in enumerate(dataset.extra_roots, start=1):
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise DatasetError(f"dataset.extra_roots: {root} is not a folder: fix the path in the job file")
        roots.append(root.resolve())
        parsed, found = read_folders(root.resolve(), dataset.extensions, dataset.test_fraction, dataset.follow_symlinks)
        warnings += found
        entries += [SplitEntry(e.relative, e.class_name, e.split, e.source, number, root.name) for e in parsed.entries]
    return entries, warnings, roots


def select_classes(classes: Sequence[str], dataset: Any) -> tuple[tuple[str, ...], dict[str, str]]:
    """(the task's classes, source class -> task class) for ``dataset.classes`` or ``dataset.class_map``.

    Videos of a source class that maps to nothing are left out. Without either setting the task is the
    dataset's own classes.
    """
    known = list(classes)

    def check(name: str, key: str) -> None:
        if name not in known:
            shown = ", ".join(known[:12]) + (f", ... ({len(known)} in all)" if len(known) > 12 else "")
            raise DatasetError(f"{key}: {name!r} is not a class of the dataset; its classes: {shown}")

    if dataset.classes and dataset.class_map:
        raise DatasetError("set dataset.classes (a subset) or dataset.class_map (a relabelling), not both")
    if dataset.classes:
        for name in dataset.classes:
            check(name, "dataset.classes")
        if len(set(dataset.classes)) != len(dataset.classes):
            raise DatasetError("dataset.classes names a class twice")
        return tuple(dataset.classes), {name: name for name in dataset.classes}
    if not dataset.class_map:
        return tuple(known), {name: name for name in known}
    mapping: dict[str, str] = {}
    rest = None
    for new, sources in dataset.class_map:
        for source in sources:
            if source == "*":
                if rest is not None:
                    raise DatasetError(f"dataset.class_map: both {rest!r} and {new!r} take \"*\" (all the other "
                                       "classes): give it to one")
                rest = new
                continue
            check(source, f"dataset.class_map.{new}")
            if source in mapping:
                raise DatasetError(f"dataset.class_map: {source!r} is in both {mapping[source]!r} and {new!r}")
            mapping[source] = new
    if rest is not None:
        mapping.update({name: rest for name in known if name not in mapping})
    return tuple(new for new, _ in dataset.class_map), mapping


def check_unique_ids(entries: Sequence[SplitEntry]) -> None:
    seen: dict[str, SplitEntry] = {}
    for entry in entries:
        if entry.id in seen:
            raise DatasetError(f"{entry.source}: duplicate video id {entry.id!r} (also at {seen[entry.id].source}); "
                               "each video may be listed once per split")
        seen[entry.id] = entry


def build_manifest(config: Config, *, progress: bool = False) -> Manifest:
    """Parse the split, check it, probe every listed video that exists, and return the manifest."""
    from hpcvid.media.probe import probe_video

    parsed, warnings = parse_split(config)
    extra, extra_warnings, extra_roots = read_extra_roots(config)
    warnings += extra_warnings
    entries = list(parsed.entries) + extra
    source_classes = list(parsed.classes) + sorted({e.class_name for e in extra} - set(parsed.classes))
    classes, task_class = select_classes(source_classes, config.dataset)
    relabelled = bool(config.dataset.classes or config.dataset.class_map)
    roots = [Path(config.dataset.root).resolve(), *extra_roots]
    inside: list[tuple[SplitEntry, Path]] = []
    for entry in entries:
        path, why = confine(roots[entry.root], entry.relative, config.dataset.follow_symlinks)
        if path is None:
            warnings.append(_refusal(entry.source, entry.relative, why))
        else:
            inside.append((entry, path))
    left_out = sum(1 for entry, _ in inside if entry.class_name not in task_class)
    if left_out:
        warnings.append(f"{left_out} video(s) of classes outside the task (dataset.classes / class_map) left out")
    inside = [(entry, path) for entry, path in inside if entry.class_name in task_class]
    check_unique_ids([entry for entry, _ in inside])
    present: list[tuple[SplitEntry, Path]] = []
    for entry, path in inside:
        if path.is_file():
            present.append((entry, path))
        else:
            warnings.append(f"{entry.source}: {entry.relative} is listed but {path} does not exist (skipped)")
    if not present:
        raise DatasetError(f"empty dataset: no video listed in the split of {roots[0]} exists "
                           f"(format {config.dataset.format}, split {config.dataset.split}); check dataset.root")
    iterator: Iterable = present
    if progress and len(present) > 50:
        from tqdm import tqdm

        iterator = tqdm(present, desc="index", unit="video")
    videos = []
    label_of = {name: i for i, name in enumerate(classes)}
    for entry, path in iterator:
        stat = path.stat()
        name = task_class[entry.class_name]
        fields = dict(id=entry.id, path=entry.relative, label=label_of[name], class_name=name,
                      split=entry.split, size=stat.st_size, mtime=stat.st_mtime, root=entry.root,
                      source_class=entry.class_name if relabelled else None)
        try:
            info = probe_video(path)
            fields.update(fps=info.fps, frames=info.frames, width=info.width, height=info.height)
        except VideoError as error:
            warnings.append(f"unreadable video (kept, frames=None): {error}")
            fields.update(probe_error=str(error))
        videos.append(VideoEntry(**fields))
    dataset = {"root": str(roots[0]), "format": config.dataset.format, "split": config.dataset.split,
               "split_files": list(parsed.files)}
    if extra_roots:
        dataset["extra_roots"] = [str(root) for root in extra_roots]
    if relabelled:
        dataset["task"] = {name: sorted(s for s, t in task_class.items() if t == name) for name in classes}
    return Manifest(classes=classes, videos=tuple(videos), dataset=dataset, warnings=tuple(warnings))


def index_dataset(config: Config, *, argv: list[str] | None = None, progress: bool = False) -> Manifest:
    """Write WORK/manifest.json and WORK/config.resolved.json; return the manifest."""
    manifest = build_manifest(config, progress=progress)
    write_manifest(manifest, config.work_dir)
    write_resolved(config, config.work_dir, argv)
    return manifest


def summary(manifest: Manifest, work: Path | str) -> str:
    counts = {split: len(manifest.by_split(split)) for split in ("train", "test", "unused")}
    unreadable = sum(1 for v in manifest.videos if v.probe_error)
    lines = [f"index: {len(manifest.classes)} classes, {counts['train']} train / {counts['test']} test / "
             f"{counts['unused']} unused videos ({unreadable} unreadable) -> {Path(work) / 'manifest.json'}"]
    if manifest.warnings:
        lines.append(f"{len(manifest.warnings)} warning(s):")
        lines += [f"  {w}" for w in manifest.warnings[:20]]
        if len(manifest.warnings) > 20:
            lines.append(f"  ... {len(manifest.warnings) - 20} more in manifest.json")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI
def add_cli(parser: argparse.ArgumentParser) -> None:
    from hpcvid.cli import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--dataset", metavar="DIR", help="dataset root (overrides dataset.root)")
    parser.add_argument("--format", choices=("ucf101", "hmdb51", "folders"), help="split layout (dataset.format)")
    parser.add_argument("--split", type=int, choices=(1, 2, 3), help="split number (dataset.split)")
    parser.add_argument("--splits-dir", metavar="DIR", help="folder of the split files (default: found under the root)")
    parser.add_argument("--test-fraction", type=float, help="test share of the generated split (format 'folders')")


def main(args: argparse.Namespace) -> int:
    import sys

    from hpcvid.cli import config_from_args

    config = config_from_args(args, {
        "dataset.root": args.dataset, "dataset.format": args.format, "dataset.split": args.split,
        "dataset.splits_dir": args.splits_dir, "dataset.test_fraction": args.test_fraction})
    manifest = index_dataset(config, argv=sys.argv, progress=True)
    print(summary(manifest, config.work_dir))
    return 0
