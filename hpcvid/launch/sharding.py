"""Deterministic sharding: which videos (or items) belong to shard I of N.

Items are sorted by id and dealt round-robin, so every shard gets a near-equal share, the assignment
does not depend on the order of the manifest, and one shard can be re-run alone. Shard indices are
0-based, like SLURM array task ids: ``shard-0000-of-0012`` ... ``shard-0011-of-0012``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from hpcvid.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` of ``count`` (0-based). ``force`` redoes a shard whose record exists."""

    index: int
    count: int
    force: bool = False

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"the number of shards must be at least 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ConfigError(f"shard index {self.index} is out of range: use 0 to {self.count - 1}")

    @property
    def name(self) -> str:
        return f"{self.index:04d}-of-{self.count:04d}"


def all_shards(count: int, force: bool = False) -> list[ShardSpec]:
    return [ShardSpec(i, count, force) for i in range(count)]


def select(items: Sequence[T], spec: ShardSpec, key: Callable[[T], str]) -> list[T]:
    """The items of shard ``spec``: sorted by ``key``, every ``count``-th starting at ``index``."""
    ordered = sorted(items, key=key)
    return ordered[spec.index :: spec.count]
