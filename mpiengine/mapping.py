"""``map`` with fixed options, and functions that map themselves over sequences."""
from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ["Mapper", "ParallelFunction"]


class Mapper:
    """``map`` bound to a fixed choice of targets and block mode."""

    def __init__(self, client: Any, dist: str, targets: Any,
                 block: Optional[bool]) -> None:
        if dist != "b":
            raise ValueError(f"only block distribution ('b') is supported; got {dist!r}")
        self.client, self.targets, self.block = client, targets, block

    def map(self, func: Callable, *seqs: Any) -> Any:
        return self.client.map(func, *seqs, targets=self.targets, block=self.block)


class ParallelFunction:
    """A function that, called on sequences, is mapped over them on the engines."""

    def __init__(self, func: Callable, mapper: Mapper) -> None:
        self.func, self.mapper = func, mapper
        self.__name__ = getattr(func, "__name__", "parallel_function")
        self.__doc__ = getattr(func, "__doc__", None)

    def __call__(self, *seqs: Any) -> Any:
        return self.mapper.map(self.func, *seqs)
