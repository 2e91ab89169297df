"""The HDF5 plumbing every hpcvid file shares: checksummed datasets, one fork-safe lazy handle, one read-error rule.

Writing. :func:`create_array`, :func:`write_array` and :func:`write_text` make every dataset hpcvid stores
(shards, the merged features file, prediction shards). Each dataset is chunked and carries HDF5's
fletcher32 filter, a checksum per chunk: a flipped byte inside a chunk makes the read of that chunk fail
instead of returning wrong numbers. Compression, where asked for, runs before the checksum, so the checksum
covers the compressed bytes. HDF5 refuses filters on variable-length data, so text is stored as
fixed-length UTF-8 (as wide as the longest value) and JPEG frames as one byte array plus offsets
(:mod:`hpcvid.storage.shards`). Attributes and HDF5's own metadata carry no such checksum (a flipped byte
in an attribute reads back changed); the whole-file sha256 in each file's record covers them.

Reading. :class:`H5File` opens a file read-only on first use *in the current process* and forgets the
handle when pickled or after a fork, so a reader may be created before a DataLoader starts its workers
(an HDF5 handle must never cross a fork). On opening it checks the root attributes ``kind`` and
``schema_version``. Any HDF5 failure while reading (a chunk whose checksum does not match, a truncated
file) becomes a one-line :class:`~hpcvid.errors.StoreError` naming the file, the video where there is one,
and the command that rebuilds the file.

h5py is imported inside functions so that ``hpcvid --help`` stays fast.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Self, Sequence

import numpy as np

from hpcvid.errors import StoreError

FEATURE_CHUNK_ROWS = 16
"""Rows per chunk of (T, D) features and scores, in shards and the merged file. A random window of L rows
reads and checksums every chunk it touches, about L + 16 rows here. Measured on 200 videos x 150 frames x
1024 float32 (random L=120 windows, warm cache, alternated in one process, three runs): 16 or 32 rows read
fastest (within noise of each other), 8 rows 5-15 % slower, 64 rows 10-17 %, 128 rows 30-40 %, 256 rows
about half as fast. The fletcher32 pass over every row read dominates, so smaller chunks waste less, until
the per-chunk overhead takes over."""


# ------------------------------------------------------------------------------------------- writing
def create_array(group: Any, name: str, shape: Sequence[int], dtype: Any, *, chunk_rows: int,
                 compression: str | None = None) -> Any:
    """An empty dataset ``name`` below ``group``, chunked by ``chunk_rows`` rows (the other axes whole),
    with a fletcher32 checksum on every chunk and ``compression`` ("lzf", "gzip" at level 1, or None)."""
    shape = tuple(int(n) for n in shape)
    chunks = (max(1, min(int(chunk_rows), shape[0])),) + tuple(max(1, n) for n in shape[1:])
    # a chunk may not be larger than a fixed dimension: empty axes are declared growable instead
    maxshape = tuple(None if n == 0 else n for n in shape)
    options: dict[str, Any] = {}
    if compression:
        options = {"compression": compression, "compression_opts": 1 if compression == "gzip" else None}
    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, maxshape=maxshape,
                                fletcher32=True, track_times=False, **options)


def write_array(group: Any, name: str, data: Any, *, chunk_rows: int, compression: str | None = None) -> Any:
    """``data`` (at least 1-D) as a checksummed dataset, see :func:`create_array`."""
    array = np.asarray(data)
    dataset = create_array(group, name, array.shape, array.dtype, chunk_rows=chunk_rows, compression=compression)
    if array.size:
        dataset[...] = array
    return dataset


def write_text(group: Any, name: str, values: Sequence[str], *, chunk_rows: int = 4096) -> Any:
    """Strings as a checksummed fixed-length UTF-8 dataset (read them back with :func:`read_text`)."""
    import h5py

    encoded = [str(value).encode("utf-8") for value in values]
    dtype = h5py.string_dtype("utf-8", max([1, *map(len, encoded)]))
    return write_array(group, name, np.array(encoded, dtype=dtype), chunk_rows=chunk_rows)


def read_text(dataset: Any) -> list[str]:
    return [plain(value) for value in dataset[()]]


# ------------------------------------------------------------------------------------------- reading
class RowLayout(NamedTuple):
    """What one video's rows of a dataset hold once read (a decoded frame, a flow pair, a feature row): their
    count, the shape and numpy type of one row, and for quantised flow the rule ``pixels = value * scale -
    offset``. An in-memory cache of decoded inputs sizes itself from these."""

    rows: int
    shape: tuple[int, ...]
    dtype: str
    scale: float = 1.0
    offset: float = 0.0

    @property
    def nbytes(self) -> int:
        return int(self.rows * np.prod(self.shape, dtype=np.int64) * np.dtype(self.dtype).itemsize)


class H5File:
    """One HDF5 file, opened read-only on first use in the current process; picklable, fork-safe.

    ``kinds`` maps each ``kind`` attribute this reader accepts to the fix for a bad file of that kind
    (the first is used while the kind is not known yet). A file of another kind or schema is refused.
    """

    def __init__(self, path: Path | str, *, kinds: Mapping[str, str], schema_version: int) -> None:
        self.path = Path(path)
        self.kinds = dict(kinds)
        self.schema_version = schema_version
        self.kind: str | None = None
        self._handle: Any = None
        self._pid: int | None = None
        self._datasets: dict[str, Any] = {}
        self._memo: dict[Any, Any] = {}

    @property
    def fix(self) -> str:
        """How to replace this file, e.g. ``re-extract it with --force``."""
        return self.kinds.get(self.kind or "", next(iter(self.kinds.values())))

    @property
    def is_open(self) -> bool:
        return self._handle is not None and self._pid == os.getpid()

    @property
    def handle(self) -> Any:
        """The h5py File of this process (opened and checked now if needed)."""
        if not self.is_open:
            import h5py

            # a handle inherited through a fork belongs to the parent: forget it, never close it here
            self._handle, self._datasets, self._memo = None, {}, {}
            try:
                handle = h5py.File(self.path, "r")
            except OSError as exc:
                raise StoreError(f"{self.path} is not a readable HDF5 file ({one_line(exc)}): {self.fix}") from exc
            try:
                self._accept(handle)
            except BaseException:
                handle.close()
                raise
            self._handle, self._pid = handle, os.getpid()
        return self._handle

    def dataset(self, name: str) -> Any:
        """Dataset ``name``, looked up once per opening (a hot read path skips h5py's name resolution)."""
        handle = self.handle
        if name not in self._datasets:
            with self.reading():
                self._datasets[name] = handle[name]
        return self._datasets[name]

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per opening of the file in this process (dataset objects and the attributes a hot
        read path needs: h5py's group lookups and attribute reads cost more than a small chunk read)."""
        self.handle
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def _accept(self, handle: Any) -> None:
        with self.reading():
            kind, version = plain(handle.attrs.get("kind")), plain(handle.attrs.get("schema_version"))
        self.kind = kind if kind in self.kinds else None
        if kind not in self.kinds or version != self.schema_version:
            expected = " or ".join(repr(k) for k in self.kinds)
            raise StoreError(f"{self.path} has schema_version {version} and kind {kind!r}; this hpcvid reads "
                             f"schema_version {self.schema_version} of kind {expected}: {self.fix}")

    @contextlib.contextmanager
    def reading(self, video: str | None = None) -> Iterator[None]:
        """Turn an HDF5 failure inside the block (a checksum mismatch, a truncated file) into a StoreError."""
        try:
            yield
        except (OSError, RuntimeError) as exc:  # what h5py raises for failures inside the HDF5 library
            where = f"{self.path}" + ("" if video is None else f", video {video!r}")
            raise StoreError(f"{where}: the stored data cannot be read ({one_line(exc)}): the file is corrupt "
                             f"or truncated; {self.fix}") from exc

    def close(self) -> None:
        if self.is_open:
            self._handle.close()
        self._handle, self._pid, self._datasets, self._memo = None, None, {}, {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_handle=None, _pid=None, _datasets={}, _memo={})
        return state


class H5Reader:
    """What every hpcvid reader shares: its :class:`H5File` (``self._h5``), closing, and ``with`` support."""

    _h5: H5File

    @property
    def is_open(self) -> bool:
        """Whether this process holds the file open (nothing is opened before the first read)."""
        return self._h5.is_open

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (HDF5's messages may span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def plain(value: Any) -> Any:
    """h5py values -> plain Python (bytes -> str, numpy scalars -> numbers)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value
