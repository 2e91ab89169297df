"""The HDF5 shard schema: one writer, one reader, so every stage agrees on the layout.

A shard file (``WORK/extract/shard-0003-of-0012.h5``, or a features-only shard written by the trainer's
``run features``) holds one group per video below ``/videos``. The group name is the video id made safe
for HDF5 (percent-encoding: ``/`` becomes ``%2F``); the real id is kept in the ``video_id`` attribute.
Datasets, all optional except where a stage needs them:

* ``frames`` - the sampled RGB frames, either JPEG bytes (``storage = "jpeg"``: one variable-length
  uint8 row per frame, quality 90: 7x smaller than raw at 112 px and 11x at 224 px on a real clip, for
  ~0.2-0.5 ms of decoding per frame on one core) or raw uint8
  ``(T, H, W, 3)`` (``storage = "uint8"``: no decoding, chunked one frame per chunk);
* ``flow`` - optical flow between consecutive kept frames, ``(T-1, H, W, 2)`` (x, y displacement in
  pixels), either uint8 quantised to ``+-bound`` (``storage = "uint8"``, attribute ``bound``) or float16;
  :meth:`ShardReader.flow` always returns float32 pixels;
* ``features/<backbone>`` - ``(T, D)`` float32 CNN features, one row per kept frame;
* ``scores/<name>`` - ``(T, C)`` float32 per-frame class scores (optional);
* ``frame_indices`` - ``(T,)`` int64, the source frame number of each kept frame.

Group attributes: ``video_id, label, class_name, split, fps, frames`` (kept), ``total_frames, source,
width, height`` (of the source) and ``checksum`` (sha256 over every dataset's name, dtype, shape and
bytes: equal checksums mean equal contents). The root carries ``schema_version`` and ``kind``.

Shard files are written under a temporary name and renamed (:mod:`hpcvid.fileio`); readers open lazily
and drop the handle when pickled, so a reader can be handed to DataLoader workers (HDF5 must not be
opened before a fork, DESIGN section 8).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence
from urllib.parse import quote, unquote

import numpy as np

from hpcvid.errors import StoreError
from hpcvid.fileio import atomic_path

SCHEMA_VERSION = 1
KIND_EXTRACT = "hpcvid.extract"
KIND_FEATURES = "hpcvid.features"
VIDEOS = "videos"
VIDEO_ATTRIBUTES = ("label", "class_name", "split", "fps", "total_frames", "source", "width", "height")


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
    import cv2

    image = cv2.imdecode(np.asarray(row, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise StoreError("a stored JPEG frame cannot be decoded: the shard is corrupt; re-extract it with --force")
    return image[..., ::-1]


def _hash_array(digest: "hashlib._Hash", name: str, array: np.ndarray) -> None:
    digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
    digest.update(np.ascontiguousarray(array).tobytes())


def write_video(parent: Any, video: VideoData, options: StorageOptions = StorageOptions()) -> dict[str, Any]:
    """Write ``video`` as a group below ``parent`` (an h5py Group); return its summary for the record."""
    import h5py

    group = parent.create_group(group_name(video.video_id))
    digest = hashlib.sha256()
    shapes: dict[str, list[int]] = {}

    def put(name: str, data: np.ndarray, **kwargs: Any) -> Any:
        dataset = group.create_dataset(name, data=data, track_times=False, **kwargs)
        _hash_array(digest, name, np.asarray(data))
        shapes[name] = list(np.asarray(data).shape)
        return dataset

    indices = np.asarray(video.frame_indices, dtype=np.int64)
    put("frame_indices", indices)
    kept = len(indices)
    if video.frames is not None:
        frames = np.asarray(video.frames, dtype=np.uint8)
        _check_rows("frames", frames, kept)
        if options.frame_storage == "jpeg":
            rows = [encode_jpeg(frame, options.jpeg_quality) for frame in frames]
            dataset = group.create_dataset("frames", shape=(len(rows),), dtype=h5py.vlen_dtype(np.uint8),
                                           track_times=False)
            for i, row in enumerate(rows):
                dataset[i] = row
                _hash_array(digest, f"frames[{i}]", row)
            shapes["frames"] = list(frames.shape)
        else:
            chunks = (1,) + frames.shape[1:] if len(frames) else None
            dataset = put("frames", frames, chunks=chunks)
        dataset.attrs["storage"] = options.frame_storage
        dataset.attrs["shape"] = np.asarray(frames.shape, dtype=np.int64)
    if video.flow is not None:
        _write_flow(group, np.asarray(video.flow, dtype=np.float32), options, put, kept)
    for kind, arrays in (("features", video.features), ("scores", video.scores)):
        for name, values in sorted(arrays.items()):
            values = np.asarray(values, dtype=np.float32)
            _check_rows(f"{kind}/{name}", values, kept)
            put(f"{kind}/{name}", values)
    attrs = dict(video.attrs)
    attrs.update(video_id=video.video_id, frames=kept)
    for key, value in attrs.items():
        group.attrs[key] = "" if value is None else value
    checksum = digest.hexdigest()
    group.attrs["checksum"] = checksum
    return {"id": video.video_id, "group": group.name.rsplit("/", 1)[-1], "frames": kept, "shapes": shapes,
            "checksum": checksum}


def _check_rows(name: str, array: np.ndarray, kept: int) -> None:
    if len(array) != kept:
        raise StoreError(f"{name} has {len(array)} rows but the video keeps {kept} frames")


def _write_flow(group: Any, flow: np.ndarray, options: StorageOptions, put: Any, kept: int) -> None:
    if len(flow) != max(kept - 1, 0):
        raise StoreError(f"flow has {len(flow)} fields but the video keeps {kept} frames (expected {kept - 1})")
    chunks = (1,) + flow.shape[1:] if len(flow) else None
    filters: dict[str, Any] = {}
    if chunks and options.flow_compression != "none":  # one pair per chunk: a window reads only its pairs
        filters = {"compression": options.flow_compression,
                   "compression_opts": 1 if options.flow_compression == "gzip" else None}
    if options.flow_storage == "uint8":
        from hpcvid.media.flow import quantise

        dataset = put("flow", quantise(flow, options.flow_bound), chunks=chunks, **filters)
        dataset.attrs["bound"] = float(options.flow_bound)
    else:
        dataset = put("flow", flow.astype(np.float16), chunks=chunks, **filters)
    dataset.attrs["storage"] = options.flow_storage


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
        return json.loads(reader.file.attrs["summary"])


def assemble_shard(path: Path | str, video_files: Iterable[Path | str], *, kind: str = KIND_EXTRACT,
                   meta: Mapping[str, Any] | None = None) -> None:
    """Copy the groups of per-video files, in the given order, into one shard file (atomically)."""
    import h5py

    with atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as out:
            _write_root_attrs(out, kind, meta or {})
            videos = out.create_group(VIDEOS)
            for video_file in video_files:
                with h5py.File(video_file, "r") as part:
                    for name in part[VIDEOS]:
                        if name in videos:
                            raise StoreError(f"video group {name} appears twice while assembling {path}")
                        part.copy(part[VIDEOS][name], videos, name=name)


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
    left out (the merged file points at the extract shards for those).
    """
    from hpcvid.fileio import atomic_write_json, read_json, sha256_file

    folder = Path(folder)
    shard = folder / f"shard-{spec.name}.h5"
    summaries = write_shard(shard, videos, kind=KIND_FEATURES, meta=dict(meta or {}), options=options)
    record = {
        "schema_version": SCHEMA_VERSION, "kind": "hpcvid.features.record", "shard": spec.name,
        "index": spec.index, "count": spec.count, "file": shard.name, "sha256": sha256_file(shard),
        "n_videos": len(summaries), "n_frames": sum(s["frames"] for s in summaries), "videos": summaries,
        "n_failed": len(failed), "failed": [dict(f) for f in failed], "meta": dict(meta or {}),
        **dict(record_extra or {}),
    }
    record_file = folder / f"shard-{spec.name}.json"
    atomic_write_json(record_file, record)
    return read_json(record_file)


# ------------------------------------------------------------------------------------------- reading
class ShardReader:
    """Read one shard file. Opens lazily (first access, in the current process); picklable.

    Use as a context manager, or call :meth:`close`. All readers return numpy arrays.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._file: Any = None
        self._pid: int | None = None
        if not self.path.is_file():
            raise StoreError(f"shard {self.path} does not exist: run `hpcvid run extract` (or check --work)")

    # lifecycle
    @property
    def file(self) -> Any:
        if self._file is None or self._pid != os.getpid():
            import h5py

            try:
                handle = h5py.File(self.path, "r")
            except OSError as exc:
                raise StoreError(f"{self.path} is not a readable HDF5 file ({exc}); re-extract it with --force") from exc
            version = handle.attrs.get("schema_version")
            if version != SCHEMA_VERSION:
                handle.close()
                raise StoreError(f"{self.path} has schema_version {version}, this hpcvid reads {SCHEMA_VERSION}: "
                                 "re-extract it with --force")
            self._file, self._pid = handle, os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_file": None, "_pid": None}

    # contents
    @property
    def attrs(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self.file.attrs.items()}

    def video_ids(self) -> list[str]:
        """Every video id in the shard, in stored order (sorted by group name)."""
        return [video_id_of(name) for name in self.file[VIDEOS]]

    def __contains__(self, video_id: str) -> bool:
        return group_name(video_id) in self.file[VIDEOS]

    def group(self, video_id: str) -> Any:
        try:
            return self.file[VIDEOS][group_name(video_id)]
        except KeyError:
            raise StoreError(f"video {video_id!r} is not in shard {self.path}") from None

    def info(self, video_id: str) -> dict[str, Any]:
        """The video's attributes plus ``frame_indices`` and the names of its feature and score sets."""
        group = self.group(video_id)
        info = {k: _plain(v) for k, v in group.attrs.items()}
        info["frame_indices"] = group["frame_indices"][()]
        info["features"] = sorted(group["features"]) if "features" in group else []
        info["scores"] = sorted(group["scores"]) if "scores" in group else []
        info["has_frames"] = "frames" in group
        info["has_flow"] = "flow" in group
        return info

    def frames(self, video_id: str, indices: Iterable[int] | None = None) -> np.ndarray:
        """uint8 (n, H, W, 3) RGB; ``indices`` are positions among the kept frames (default: all)."""
        dataset = self._dataset(video_id, "frames")
        shape = tuple(int(v) for v in dataset.attrs["shape"])
        positions = list(range(shape[0])) if indices is None else [int(i) for i in indices]
        if not positions:
            return np.zeros((0,) + shape[1:], dtype=np.uint8)
        if dataset.attrs["storage"] == "jpeg":
            return np.stack([decode_jpeg(dataset[i]) for i in positions])
        return np.stack([dataset[i] for i in positions])

    def flow(self, video_id: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 (n, H, W, 2) pixel displacements of pairs ``start..stop-1``, however they are stored."""
        dataset = self._dataset(video_id, "flow")
        values = dataset[start:stop]
        if dataset.attrs["storage"] == "uint8":
            from hpcvid.media.flow import dequantise

            return np.asarray(dequantise(values, float(dataset.attrs["bound"])), dtype=np.float32)
        return values.astype(np.float32)

    def features(self, video_id: str, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._dataset(video_id, f"features/{name}")[start:stop].astype(np.float32, copy=False)

    def scores(self, video_id: str, name: str) -> np.ndarray:
        return self._dataset(video_id, f"scores/{name}")[()].astype(np.float32, copy=False)

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
        group = self.group(video_id)
        if name not in group:
            raise StoreError(f"video {video_id!r} in {self.path} has no {name!r} (it was extracted without it)")
        return group[name]


def _plain(value: Any) -> Any:
    """h5py attribute values -> plain Python (bytes -> str, numpy scalars -> numbers)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value
