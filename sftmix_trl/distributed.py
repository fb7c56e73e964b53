"""Work split over processes and gathered back: each item handled by exactly one process, every process ends with
all the results in item order. One process: the identity."""

from __future__ import annotations

from typing import Any

from accelerate import PartialState
from accelerate.utils import gather_object


def shard(n: int) -> list[int]:
    """The item indices this process handles: every world_size-th one."""
    state = PartialState()
    return list(range(state.process_index, n, state.num_processes))


def gather_by_index(local: list[tuple[int, Any]], n: int, what: str = "items") -> list[Any]:
    """Every process's (index, result) pairs, as one list in item order, on every process. A collective.

    Raises if an item came back from no process or from two (a shard went missing or was dealt twice): a result
    silently absent would shift every later one."""
    state = PartialState()
    pairs = gather_object(local) if state.num_processes > 1 else local
    results: list[Any] = [None] * n
    seen = [0] * n
    for index, value in pairs:
        results[index] = value
        seen[index] += 1
    if any(count != 1 for count in seen):
        raise RuntimeError(f"gathered {sum(seen)} results for {n} {what}: a shard went missing or was dealt twice")
    return results
