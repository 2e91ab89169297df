"""The HDF5 shard schema: one writer, one reader, so every stage agrees on the layout.

A shard file (``WORK/extract/shard-0003-of-0012.h5``, or a features-only shard written by ``run features``)
holds one group per video below ``/videos``. The group name is the video id made safe for HDF5
(percent-encoding: ``/`` becomes ``%2F``); the real id is kept in the ``video_id`` attribute.

Every dataset is chunked and carries a fletcher32 checksum per chunk (:mod:`hpcvid.storage.h5`): a
damaged chunk fails its read with a one-line StoreError instead of becoming numbers. Datasets, all
optional except where a stage needs them (T = kept frames):

* ``frame_indices`` - ``(T,)`` int64, the source frame number of each kept frame; chunks of 4096 rows.
* ``frames`` - the sampled RGB frames, attributes ``storage`` and ``shape`` (the decoded ``(T, H, W, 3)``):

  - ``storage = "jpeg"``: ``frames`` is 1-D uint8, every frame's JPEG bytes (quality 90 by default)
    one after another, in chunks of 32 KiB; ``frame_offsets`` ``(T+1,)`` int64 says where each begins
    (frame i is ``frames[offsets[i]:offsets[i+1]]``), chunks of 4096 rows. 7x smaller than raw at
    112 px and 11x at 224 px on a real clip, for ~0.2-0.5 ms of decoding per frame on one core;
    :meth:`ShardReader.frames` reads only the byte ranges of the frames asked for.
  - ``storage = "uint8"``: ``frames`` is raw ``(T, H, W, 3)`` uint8, one frame per chunk.

* ``flow`` - optical flow between consecutive kept frames, ``(T-1, H, W, 2)`` (x, y displacement in
  pixels), one pair per chunk, compressed (lzf, gzip level 1, or none) under the checksum; either uint8
  quantised to ``+-bound`` (``storage = "uint8"``, attribute ``bound``) or float16.
  :meth:`ShardReader.flow` always returns float32 pixels.
* ``features/<backbone>`` - ``(T, D)`` float32 CNN features, one row per kept frame, chunks of 16 rows.
* ``scores/<name>`` - ``(T, C)`` float32 per-frame class scores, chunks of 16 rows (optional).

Group attributes: ``video_id, label, class_name, split, fps, frames`` (kept), ``total_frames, source,
width, height`` (of the source) and ``checksum`` (sha256 over every dataset's name, dtype, shape and
bytes: equal checksums mean equal contents). The root carries ``schema_version`` (2 since per-chunk
checksums; files of schema 1 are refused: re-extract them) and ``kind`` (``hpcvid.extract`` or
``hpcvid.features``).

Shard files are written under a temporary name and renamed (:mod:`hpcvid.fileio`); a reader opens its
file lazily in the process that reads and drops the handle when pickled, so it can be handed to
DataLoader workers.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence
from urllib.parse import quote, unquote

import numpy as np

from hpcvid.errors import StoreError
from hpcvid.fileio import atomic_path, write_record
from hpcvid.storage.h5 import FEATURE_CHUNK_ROWS, H5File, H5Reader, RowLayout, create_array, plain, write_array

SCHEMA_VERSION = 2
KIND_EXTRACT = "hpcvid.extract"
KIND_FEATURES = "hpcvid.features"
FIXES = {KIND_EXTRACT: "re-extract it with --force",
         KIND_FEATURES: "recompute it with `hpcvid run features --force`"}
VIDEOS = "videos"
VIDEO_ATTRIBUTES = ("label", "class_name", "split", "fps", "total_frames", "source", "width", "height")
INDEX_CHUNK_ROWS = 4096
JPEG_CHUNK_BYTES = 32 * 1024


def group_name(video_id: str) -> str:
    """The HDF5-safe, reversible name of a video's group (ids hold '/', spaces, any letters)."""
    return quote(video_id, safe="")


def video_id_of(name: str) -> str:
    return unquote(name)


@dataclass(frozen=True)
class StorageOptions:
    """How frames and flow are stored (from ExtractConfig: frame_storage, jpeg_quality, flow_*)."""

    frame_storage: str = "jpeg"
    jpeg_quality: int = 90
    flow_storage: str = "uint8"
    flow_bound: float = 20.0
    flow_compression: str = "lzf"

    @classmethod
    def from_config(cls, extract: Any) -> "StorageOptions":
        return cls(extract.frame_storage, extract.jpeg_quality, extract.flow_storage, extract.flow_bound,
                   getattr(extract, "flow_compression", "lzf"))


@dataclass
class VideoData:
    """Everything a shard stores about one video, in memory, before encoding.

    ``attrs`` holds the keys of VIDEO_ATTRIBUTES; ``frames`` uint8 (T, H, W, 3) RGB; ``flow`` float32
    (T-1, H, W, 2); ``features`` / ``scores`` map a name to a (T, D) array. Any of them may be absent.
    """

    video_id: str
    attrs: dict[str, Any]
    frame_indices: np.ndarray
    frames: np.ndarray | None = None
    flow: np.ndarray | None = None
    features: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- writing
def encode_jpeg(frame: np.ndarray, quality: int) -> np.ndarray:
    """One RGB frame -> JPEG bytes as a uint8 row (OpenCV's encoder is deterministic)."""
    import cv2

    ok, buffer = cv2.imencode(".jpg", np.ascontiguousarray(frame[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise StoreError(f"could not JPEG-encode a frame of shape {frame.shape}")
    return buffer.reshape(-1)


def decode_jpeg(row: np.ndarray) -> np.ndarray:
    """JPEG bytes -> RGB uint8 (H, W, 3); ValueError when they are not a JPEG image."""
    import cv2

    image = cv2.imdecode(np.asarray(row, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("the stored bytes are not a decodable JPEG frame")
    return image[..., ::-1]


def encode_frames(frames: np.ndarray, options: StorageOptions) -> list[np.ndarray] | np.ndarray:
    """Frames as they are stored: a JPEG byte row per frame, or the raw uint8 frames."""
    frames = np.asarray(frames, dtype=np.uint8)
    if options.frame_storage == "jpeg":
        return [encode_jpeg(frame, options.jpeg_quality) for frame in frames]
    return frames


def encode_flow(flow: np.ndarray, options: StorageOptions) -> np.ndarray:
    """float32 flow as it is stored: quantised uint8 (``+-flow_bound``) or float16."""
    if options.flow_storage == "uint8":
        from hpcvid.media.flow import quantise

        return quantise(np.asarray(flow, dtype=np.float32), options.flow_bound)
    return np.asarray(flow, dtype=np.float32).astype(np.float16)


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """An array's bytes in C order, as a uint8 view (no copy when it is contiguous already)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


WRITE_BLOCK_BYTES = 8 << 20
"""A dataset is written (and hashed) in blocks of whole chunks of about this size, whether its rows are in
memory or in a spool file, so that the bytes of the file depend on the contents alone."""


class _Rows:
    """The rows of one dataset, in order, read in blocks: an array in memory, or a spool file."""

    def __init__(self, dtype: Any, shape: Sequence[int], array: np.ndarray | None = None,
                 spool: Path | None = None) -> None:
        self.dtype, self.shape = np.dtype(dtype), tuple(int(n) for n in shape)
        self.array, self.spool = array, spool

    @classmethod
    def of(cls, array: Any, dtype: Any = None) -> "_Rows":
        array = np.asarray(array, dtype=dtype)
        return cls(array.dtype, array.shape, array=array)

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, block) of at most ``rows`` rows each."""
        if self.array is not None:
            for start in range(0, self.shape[0], rows):
                yield start, self.array[start:start + rows]
            return
        row_shape = self.shape[1:]
        per_row = int(np.prod(row_shape, dtype=np.int64))
        with open(self.spool, "rb") as handle:
            for start in range(0, self.shape[0], rows):
                count = min(rows, self.shape[0] - start)
                block = np.fromfile(handle, dtype=self.dtype, count=count * per_row)
                if block.size != count * per_row:
                    raise StoreError(f"{self.spool} ended early: the spool of a video in flight was cut short")
                yield start, block.reshape((count,) + row_shape)


class _GroupWriter:
    """Writes one video's datasets below its group in the shard layout, hashing them into the group checksum."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.digest = hashlib.sha256()
        self.shapes: dict[str, list[int]] = {}

    def put(self, name: str, rows: _Rows, chunk_rows: int, compression: str | None = None) -> Any:
        dataset = create_array(self.group, name, rows.shape, rows.dtype, chunk_rows=chunk_rows,
                               compression=compression)
        self.digest.update(f"{name}|{rows.dtype.str}|{rows.shape}|".encode())
        per_row = max(1, rows.dtype.itemsize * int(np.prod(rows.shape[1:], dtype=np.int64)))
        chunk = dataset.chunks[0]
        step = max(1, WRITE_BLOCK_BYTES // (per_row * chunk)) * chunk
        for start, block in rows.blocks(step):
            block = np.ascontiguousarray(block, dtype=rows.dtype)
            if block.size:
                dataset[start:start + len(block)] = block
            self.digest.update(_bytes_of(block))
        self.shapes[name] = list(rows.shape)
        return dataset


def write_video(parent: Any, video: VideoData, options: StorageOptions = StorageOptions()) -> dict[str, Any]:
    """Write ``video`` as a group below ``parent`` (an h5py Group); return its summary for the record."""
    indices = np.asarray(video.frame_indices, dtype=np.int64)
    kept = len(indices)
    frames = offsets = flow = None
    frame_shape: tuple[int, ...] = ()
    if video.frames is not None:
        raw = np.asarray(video.frames, dtype=np.uint8)
        _check_rows("frames", raw, kept)
        frame_shape = raw.shape
        encoded = encode_frames(raw, options)
        if options.frame_storage == "jpeg":
            offsets = _Rows.of(np.cumsum([0] + [len(row) for row in encoded], dtype=np.int64))
            frames = _Rows.of(np.concatenate(encoded) if encoded else np.zeros(0, np.uint8))
        else:
            frames = _Rows.of(encoded)
    if video.flow is not None:
        flow = _Rows.of(encode_flow(video.flow, options))
    arrays = {}
    for kind, named in (("features", video.features), ("scores", video.scores)):
        for name, values in sorted(named.items()):
            values = np.asarray(values, dtype=np.float32)
            _check_rows(f"{kind}/{name}", values, kept)
            arrays[f"{kind}/{name}"] = _Rows.of(values)
    return _write_group(parent, video.video_id, dict(video.attrs), _Rows.of(indices), frames, offsets, frame_shape,
                        flow, arrays, options)


def _write_group(parent: Any, video_id: str, attrs: dict[str, Any], indices: _Rows, frames: _Rows | None,
                 offsets: _Rows | None, frame_shape: tuple[int, ...], flow: _Rows | None,
                 arrays: Mapping[str, _Rows], options: StorageOptions) -> dict[str, Any]:
    """The one layout of a video's group, from rows in memory (:func:`write_video`) or spooled (:class:`PartWriter`)."""
    writer = _GroupWriter(parent.create_group(group_name(video_id)))
    kept = indices.shape[0]
    writer.put("frame_indices", indices, INDEX_CHUNK_ROWS)
    if frames is not None:
        if options.frame_storage == "jpeg":
            dataset = writer.put("frames", frames, JPEG_CHUNK_BYTES)
            writer.put("frame_offsets", offsets, INDEX_CHUNK_ROWS)
        else:
            dataset = writer.put("frames", frames, 1)
        writer.shapes["frames"] = list(frame_shape)
        dataset.attrs["storage"] = options.frame_storage
        dataset.attrs["shape"] = np.asarray(frame_shape, dtype=np.int64)
    if flow is not None:
        if flow.shape[0] != max(kept - 1, 0):
            raise StoreError(f"flow has {flow.shape[0]} fields but the video keeps {kept} frames "
                             f"(expected {kept - 1})")
        # one pair per chunk: a window reads (and decompresses) only its own pairs
        compression = None if options.flow_compression == "none" else options.flow_compression
        flow_dataset = writer.put("flow", flow, 1, compression)
        if options.flow_storage == "uint8":
            flow_dataset.attrs["bound"] = float(options.flow_bound)
        flow_dataset.attrs["storage"] = options.flow_storage
        del flow_dataset  # closed before the next dataset is made, as it always was: the file's bytes depend on it
    for name, rows in arrays.items():
        if rows.shape[0] != kept:
            raise StoreError(f"{name} has {rows.shape[0]} rows but the video keeps {kept} frames")
        writer.put(name, rows, FEATURE_CHUNK_ROWS)
    group = writer.group
    attrs.update(video_id=video_id, frames=kept)
    for key, value in attrs.items():
        group.attrs[key] = "" if value is None else value
    checksum = writer.digest.hexdigest()
    group.attrs["checksum"] = checksum
    return {"id": video_id, "group": group.name.rsplit("/", 1)[-1], "frames": kept, "shapes": writer.shapes,
            "checksum": checksum}


def _check_rows(name: str, array: np.ndarray, kept: int) -> None:
    if len(array) != kept:
        raise StoreError(f"{name} has {len(array)} rows but the video keeps {kept} frames")


class PartWriter:
    """One video's part file, written as its frames arrive in chunks, with bounded memory.

    HDF5 fixes a dataset's chunk shape when the dataset is created, and the shard layout chooses it from the
    dataset's final length (``min(rows per chunk, T)``), while the group checksum hashes each dataset's shape
    before its bytes; neither is known before the video ends. So each :meth:`add` appends the stored form of
    its rows (JPEG bytes or raw frames, quantised or float16 flow, float32 features) to flat spool files in
    ``spool`` (one per dataset; frame numbers and JPEG offsets, 16 bytes a frame, stay in memory), and
    :meth:`finish` writes the part file from them in blocks, through the same writer as
    :func:`write_video`: the part is byte for byte the one :func:`write_video_file` makes of the whole video
    in memory, whatever the chunks were. Each byte is written twice (spool, then part); the spool is deleted
    when the part is written, or by :meth:`discard`.
    """

    def __init__(self, spool: Path | str, options: StorageOptions = StorageOptions()) -> None:
        self.spool = Path(spool)
        self.options = options
        shutil.rmtree(self.spool, ignore_errors=True)
        self.spool.mkdir(parents=True)
        self.indices: list[np.ndarray] = []
        self.offsets: list[int] = [0]
        self.frame_shape: tuple[int, ...] | None = None
        self.flow_shape: tuple[int, ...] | None = None
        self.rows: dict[str, int] = {}
        self.row_shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
        self._files: dict[str, Any] = {}

    def add(self, *, frame_indices: np.ndarray | None = None, frames: Any = None, frame_shape: Sequence[int] = (),
            flow: np.ndarray | None = None, features: Mapping[str, np.ndarray] | None = None) -> None:
        """Append the next rows: ``frames`` as :func:`encode_frames` gives them (``frame_shape``: their decoded
        (n, H, W, 3)), ``flow`` as :func:`encode_flow` gives it, ``features`` as float32 (n, D) per name."""
        if frame_indices is not None and len(frame_indices):
            self.indices.append(np.asarray(frame_indices, dtype=np.int64))
        if frames is not None and len(frames):
            shape = tuple(int(n) for n in frame_shape)
            if self.frame_shape is None:
                self.frame_shape = (0,) + shape[1:]
            elif shape[1:] != self.frame_shape[1:]:
                raise StoreError(f"frames of {shape[1:]} after frames of {self.frame_shape[1:]} in one video")
            self.frame_shape = (self.frame_shape[0] + shape[0],) + shape[1:]
            if self.options.frame_storage == "jpeg":
                for row in frames:
                    self.offsets.append(self.offsets[-1] + len(row))
                self._append("frames", np.concatenate(frames), ())
            else:
                self._append("frames", np.asarray(frames, dtype=np.uint8), shape[1:])
        if flow is not None:
            if self.flow_shape is None:
                self.flow_shape = tuple(flow.shape[1:])
            self._append("flow", flow, tuple(flow.shape[1:]))
        for name, values in sorted((features or {}).items()):
            values = np.asarray(values, dtype=np.float32)
            self._append(f"features/{name}", values, tuple(values.shape[1:]))

    def _append(self, name: str, rows: np.ndarray, row_shape: tuple[int, ...]) -> None:
        known = self.row_shapes.setdefault(name, (row_shape, rows.dtype))
        if known != (row_shape, rows.dtype):
            raise StoreError(f"{name}: rows of {row_shape} {rows.dtype} after rows of {known[0]} {known[1]}")
        if name not in self._files:
            self._files[name] = open(self.spool / (name.replace("/", "-") + ".bin"), "wb")
        self._files[name].write(_bytes_of(rows))
        self.rows[name] = self.rows.get(name, 0) + rows.shape[0]

    def _source(self, name: str) -> _Rows:
        row_shape, dtype = self.row_shapes[name]
        return _Rows(dtype, (self.rows[name],) + row_shape, spool=self.spool / (name.replace("/", "-") + ".bin"))

    def finish(self, path: Path | str, video_id: str, attrs: Mapping[str, Any], *, has_flow: bool,
               kind: str = KIND_EXTRACT) -> dict[str, Any]:
        """Write the part file (atomically) from the spool, delete the spool; return the video's summary.
        ``has_flow``: store a flow dataset even when it has no pair (a one-frame video)."""
        import h5py

        for handle in self._files.values():
            handle.close()
        self._files = {}
        indices = np.concatenate(self.indices) if self.indices else np.zeros(0, np.int64)
        frames = offsets = flow = None
        if self.frame_shape is not None:
            frames = self._source("frames")
            if self.options.frame_storage == "jpeg":
                offsets = _Rows.of(np.asarray(self.offsets, dtype=np.int64))
        if has_flow:
            if "flow" in self.row_shapes:
                flow = self._source("flow")
            else:  # fewer than two frames: no pair, an empty dataset of the frames' size
                dtype = np.uint8 if self.options.flow_storage == "uint8" else np.float16
                height, width = (self.frame_shape or (0, 0, 0))[1:3]
                flow = _Rows.of(np.zeros((0, height, width, 2), dtype=dtype))
        arrays = {name: self._source(name) for name in sorted(self.row_shapes) if name.startswith("features/")}
        with atomic_path(path) as temporary:
            with h5py.File(temporary, "w") as handle:
                summary = _write_group(handle.create_group(VIDEOS), video_id, dict(attrs), _Rows.of(indices), frames,
                                       offsets, tuple(self.frame_shape or ()), flow, arrays, self.options)
                _write_root_attrs(handle, kind, {"summary": summary})
        self.discard()
        return summary

    def discard(self) -> None:
        """Drop the spool (a failed or abandoned video)."""
        for handle in self._files.values():
            handle.close()
        self._files = {}
        shutil.rmtree(self.spool, ignore_errors=True)


def _write_root_attrs(handle: Any, kind: str, meta: Mapping[str, Any]) -> None:
    handle.attrs["schema_version"] = SCHEMA_VERSION
    handle.attrs["kind"] = kind
    for key, value in meta.items():
        handle.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value, sort_keys=True)


def write_video_file(path: Path | str, video: VideoData, options: StorageOptions = StorageOptions(),
                     kind: str = KIND_EXTRACT) -> dict[str, Any]:
    """One video in its own small shard-layout file, written atomically (the unit of kill-safe resume)."""
    import h5py

    with atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as handle:
            summary = write_video(handle.create_group(VIDEOS), video, options)
            _write_root_attrs(handle, kind, {"summary": summary})
    return summary


def read_video_file_summary(path: Path | str) -> dict[str, Any]:
    """The summary :func:`write_video_file` returned, read back from the part file (for resumed videos)."""
    with ShardReader(path) as reader:
        return json.loads(reader.attrs["summary"])


def assemble_shard(path: Path | str, video_files: Iterable[Path | str], *, kind: str = KIND_EXTRACT,
                   meta: Mapping[str, Any] | None = None) -> None:
    """Copy the groups of per-video files, in the given order, into one shard file (atomically).

    Chunks are copied as stored, checksums included, so damage in a part file is still caught when the
    shard is read.
    """
    import h5py

    with atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as out:
            _write_root_attrs(out, kind, meta or {})
            videos = out.create_group(VIDEOS)
            for video_file in video_files:
                with ShardReader(video_file) as part, part.reading():
                    for name in part.file[VIDEOS]:
                        if name in videos:
                            raise StoreError(f"video group {name} appears twice while assembling {path}")
                        part.file.copy(part.file[VIDEOS][name], videos, name=name)


def write_shard(path: Path | str, videos: Iterable[VideoData], *, kind: str = KIND_FEATURES,
                meta: Mapping[str, Any] | None = None,
                options: StorageOptions = StorageOptions()) -> list[dict[str, Any]]:
    """Write a whole shard at once (e.g. features recomputed by a fine-tuned CNN); returns the summaries.

    The file appears only when complete (temporary name + rename). Keep the record-written-last rule:
    write your record after this returns.
    """
    import h5py

    summaries = []
    with atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as out:
            _write_root_attrs(out, kind, meta or {})
            group = out.create_group(VIDEOS)
            for video in videos:
                summaries.append(write_video(group, video, options))
    return summaries


def write_features_shard(folder: Path | str, spec: Any, videos: Iterable[VideoData], *,
                         failed: Sequence[Mapping[str, Any]] = (), meta: Mapping[str, Any] | None = None,
                         options: StorageOptions = StorageOptions(),
                         record_extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A features-only shard ``folder/shard-<spec.name>.h5`` plus its record (written last), in the layout
    ``hpcvid run merge --features-dir folder`` reads. ``spec`` is a :class:`hpcvid.launch.sharding.ShardSpec`.

    For the trainer's recomputed features: give each VideoData its attrs (copy them from the extract
    shard's ``ShardReader.info``), ``frame_indices`` and ``features={name: (T, D)}``; frames and flow may be
    left out (they are read from the extract shards).
    """
    folder = Path(folder)
    shard = folder / f"shard-{spec.name}.h5"
    summaries = write_shard(shard, videos, kind=KIND_FEATURES, meta=dict(meta or {}), options=options)
    fields = {
        "shard": spec.name, "index": spec.index, "count": spec.count,
        "n_videos": len(summaries), "n_frames": sum(s["frames"] for s in summaries), "videos": summaries,
        "n_failed": len(failed), "failed": [dict(f) for f in failed], "meta": dict(meta or {}),
        **dict(record_extra or {}),
    }
    return write_record(folder / f"shard-{spec.name}.json", fields, kind="hpcvid.features.record",
                        schema_version=SCHEMA_VERSION, describes=shard)


# ------------------------------------------------------------------------------------------- reading
class ShardReader(H5Reader):
    """Read one shard file. Opens lazily (first access, in the current process); picklable.

    Use as a context manager, or call :meth:`close`. All readers return numpy arrays; a read that fails
    (a checksum mismatch, a truncated file) raises a one-line StoreError naming the file and the video.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"shard {self.path} does not exist: run `hpcvid run extract` (or check --work)")
        self._h5 = H5File(self.path, kinds=FIXES, schema_version=SCHEMA_VERSION)

    @property
    def file(self) -> Any:
        return self._h5.handle

    def reading(self, video_id: str | None = None) -> Any:
        """A context in which an HDF5 read failure becomes a StoreError naming this file (and video)."""
        return self._h5.reading(video_id)

    # contents
    @property
    def attrs(self) -> dict[str, Any]:
        with self.reading():
            return {k: plain(v) for k, v in self.file.attrs.items()}

    def video_ids(self) -> list[str]:
        """Every video id in the shard, in stored order (sorted by group name)."""
        with self.reading():
            return [video_id_of(name) for name in self.file[VIDEOS]]

    def __contains__(self, video_id: str) -> bool:
        with self.reading(video_id):
            return group_name(video_id) in self.file[VIDEOS]

    def group(self, video_id: str) -> Any:
        with self.reading(video_id):
            videos = self.file[VIDEOS]
            if group_name(video_id) not in videos:
                raise StoreError(f"video {video_id!r} is not in shard {self.path}")
            return videos[group_name(video_id)]

    def info(self, video_id: str) -> dict[str, Any]:
        """The video's attributes plus ``frame_indices`` and the names of its feature and score sets."""
        group = self.group(video_id)
        with self.reading(video_id):
            info = {k: plain(v) for k, v in group.attrs.items()}
            info["frame_indices"] = group["frame_indices"][()]
            info["features"] = sorted(group["features"]) if "features" in group else []
            info["scores"] = sorted(group["scores"]) if "scores" in group else []
            info["has_frames"] = "frames" in group
            info["has_flow"] = "flow" in group
        return info

    def frames(self, video_id: str, indices: Iterable[int] | None = None) -> np.ndarray:
        """uint8 (n, H, W, 3) RGB; ``indices`` are positions among the kept frames (default: all), in any
        order, repeats allowed. Only the chunks holding the requested frames are read."""
        stored = self._stored(video_id, "frames")
        positions, wanted = self._positions(video_id, stored, indices)
        if wanted.size == 0:
            return np.zeros((0,) + stored.shape[1:], dtype=np.uint8)
        if stored.storage == "jpeg":
            images = np.stack([self._decode(video_id, row) for row in self._jpeg_rows(video_id, stored, wanted)])
        else:
            with self.reading(video_id):
                images = np.concatenate([stored.dataset[start:stop] for start, stop in _runs(wanted)])
        if len(wanted) == len(positions) and np.array_equal(wanted, positions):
            return images  # already in the asked order: no copy
        return images[np.searchsorted(wanted, positions)]

    def jpeg(self, video_id: str, indices: Iterable[int]) -> list[np.ndarray] | None:
        """The stored JPEG bytes of the frames at ``indices`` (in that order), undecoded, for a decoder that
        works on many frames at once (a GPU's); None when the frames are stored raw."""
        stored = self._stored(video_id, "frames")
        if stored.storage != "jpeg":
            return None
        positions, wanted = self._positions(video_id, stored, indices)
        rows = list(self._jpeg_rows(video_id, stored, wanted))
        return [rows[int(k)] for k in np.searchsorted(wanted, positions)]

    def flow(self, video_id: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 (n, H, W, 2) pixel displacements of pairs ``start..stop-1``, however they are stored."""
        return self.stored_flow(video_id, start, stop).pixels()

    def stored_flow(self, video_id: str, start: int = 0, stop: int | None = None) -> StoredFlow:
        """Pairs ``start..stop-1`` as stored (quantised uint8 or float16) with the rule that turns them into
        pixels: moving uint8 instead of float32 to where the pixels are computed moves a quarter of the bytes."""
        stored = self._stored(video_id, "flow")
        with self.reading(video_id):
            values = stored.dataset[start:stop]
        return StoredFlow(values, stored.scale, stored.offset)

    def features(self, video_id: str, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        stored = self._stored(video_id, f"features/{name}")
        with self.reading(video_id):
            return stored.dataset[start:stop].astype(np.float32, copy=False)

    def layout(self, video_id: str, name: str) -> RowLayout:
        """What one row of ``name`` (frames, flow or features/<set>) holds once read: decoded frames are
        uint8 (H, W, 3) whatever their storage, flow pairs keep their stored type."""
        stored = self._stored(video_id, name)
        if name == "frames":
            return RowLayout(stored.shape[0], stored.shape[1:], "uint8")
        return RowLayout(stored.shape[0], stored.shape[1:], stored.dataset.dtype.str, stored.scale, stored.offset)

    def scores(self, video_id: str, name: str) -> np.ndarray:
        dataset = self._dataset(video_id, f"scores/{name}")
        with self.reading(video_id):
            return dataset[()].astype(np.float32, copy=False)

    def video(self, video_id: str) -> VideoData:
        """Everything stored about one video, decoded (frames as RGB uint8, flow as float32)."""
        info = self.info(video_id)
        return VideoData(
            video_id=video_id,
            attrs={k: info[k] for k in VIDEO_ATTRIBUTES if k in info},
            frame_indices=info["frame_indices"],
            frames=self.frames(video_id) if info["has_frames"] else None,
            flow=self.flow(video_id) if info["has_flow"] else None,
            features={n: self.features(video_id, n) for n in info["features"]},
            scores={n: self.scores(video_id, n) for n in info["scores"]},
        )

    def iter_videos(self) -> Iterator[VideoData]:
        for video_id in self.video_ids():
            yield self.video(video_id)

    def _dataset(self, video_id: str, name: str) -> Any:
        return self._stored(video_id, name).dataset

    def _stored(self, video_id: str, name: str) -> _Stored:
        """Dataset ``name`` of a video with what every read of it needs, looked up once per opening."""
        return self._h5.memo((video_id, name), lambda: self._look_up(video_id, name))

    def _look_up(self, video_id: str, name: str) -> _Stored:
        group = self.group(video_id)
        with self.reading(video_id):
            if name not in group:
                raise StoreError(f"video {video_id!r} in {self.path} has no {name!r} (it was extracted without it)")
            dataset = group[name]
            attrs = {k: plain(v) for k, v in dataset.attrs.items()}
            shape = tuple(int(v) for v in attrs.get("shape", dataset.shape))
            offsets = group["frame_offsets"][()] if name == "frames" and attrs.get("storage") == "jpeg" else None
        scale, offset = np.float32(1.0), np.float32(0.0)
        if name == "flow" and attrs.get("storage") == "uint8":
            # the constants of hpcvid.media.flow.dequantise, so both give the same pixels bit for bit
            bound = float(attrs["bound"])
            scale, offset = np.float32(2.0 * bound / 255.0), np.float32(bound)
        return _Stored(dataset, str(attrs.get("storage", "")), shape, offsets, scale, offset)

    def _positions(self, video_id: str, stored: _Stored, indices: Iterable[int] | None) -> tuple[np.ndarray, np.ndarray]:
        """(the asked positions, the distinct ones sorted), refused when outside the video."""
        count = stored.shape[0]
        positions = np.arange(count) if indices is None else np.asarray(list(indices), dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= count):
            raise IndexError(f"frame positions {positions.tolist()} are outside video {video_id!r} of {count} frames")
        return positions, np.unique(positions)

    def _jpeg_rows(self, video_id: str, stored: _Stored, positions: np.ndarray) -> Iterator[np.ndarray]:
        """The JPEG bytes of each of ``positions`` (sorted, distinct): one read per run of consecutive frames."""
        offsets = stored.offsets
        with self.reading(video_id):
            for start, stop in _runs(positions):
                first = int(offsets[start])
                data = stored.dataset[first:int(offsets[stop])]
                for i in range(start, stop):
                    yield data[int(offsets[i]) - first:int(offsets[i + 1]) - first]

    def _decode(self, video_id: str, row: np.ndarray) -> np.ndarray:
        try:
            return decode_jpeg(row)
        except ValueError as exc:
            raise StoreError(f"{self.path}, video {video_id!r}: {exc}; {self._h5.fix}") from None


class _Stored(NamedTuple):
    """One dataset of a video and what its reads need: storage kind, decoded shape, JPEG offsets, flow scale."""

    dataset: Any
    storage: str
    shape: tuple[int, ...]
    offsets: np.ndarray | None
    scale: np.float32
    offset: np.float32


@dataclass(frozen=True)
class StoredFlow:
    """Flow pairs as stored, and the rule that gives pixels: ``values * scale - offset`` in float32 (quantised
    uint8), or the values themselves (scale 1, offset 0: float16)."""

    values: np.ndarray
    scale: np.float32 = np.float32(1.0)
    offset: np.float32 = np.float32(0.0)

    def pixels(self) -> np.ndarray:
        if self.values.dtype == np.uint8:
            return self.values.astype(np.float32) * self.scale - self.offset
        return self.values.astype(np.float32)


def _runs(positions: np.ndarray) -> list[tuple[int, int]]:
    """Sorted distinct positions -> [start, stop) runs of consecutive ones: [1, 2, 3, 7] -> [(1, 4), (7, 8)]."""
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(positions, breaks)]
