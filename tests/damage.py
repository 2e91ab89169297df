"""Damage an HDF5 file the way a bad disk or a stray write does (one byte flipped inside a dataset's data),
or make it look like a file of an older schema; and the checks the storage tests share: every dataset
carries a per-chunk checksum, a refused read is one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import h5py
import pytest

from hpcvid.errors import StoreError


def flip_byte(path: Path, dataset: str, chunk: int = 0) -> int:
    """Flip every bit of the byte in the middle of stored chunk ``chunk`` of ``dataset`` (of the data
    itself when the dataset is not chunked); return the byte's offset in the file."""
    with h5py.File(path, "r") as handle:
        data = handle[dataset]
        if data.chunks is None:
            offset = data.id.get_offset() + data.id.get_storage_size() // 2
        else:
            info = data.id.get_chunk_info(chunk)
            offset = info.byte_offset + (info.size - 4) // 2   # the last 4 bytes hold the checksum itself
    with open(path, "r+b") as raw:
        raw.seek(offset)
        value = raw.read(1)[0]
        raw.seek(offset)
        raw.write(bytes([value ^ 0xFF]))
    return offset


def unchecked_datasets(path: Path) -> list[str]:
    """Names of the datasets of ``path`` without a fletcher32 checksum per chunk (none, when all is well)."""
    missing: list[str] = []

    def visit(name: str, item: object) -> None:
        if isinstance(item, h5py.Dataset) and not (item.fletcher32 and item.chunks):
            missing.append(name)

    with h5py.File(path, "r") as handle:
        handle.visititems(visit)
    return missing


def set_schema_version(path: Path, version: int) -> None:
    with h5py.File(path, "r+") as handle:
        handle.attrs["schema_version"] = version


def store_error_line(read: Callable[[], Any]) -> str:
    """The message of the StoreError that ``read()`` raises, checked to be a single line."""
    with pytest.raises(StoreError) as caught:
        read()
    message = str(caught.value)
    assert "\n" not in message, message
    return message

