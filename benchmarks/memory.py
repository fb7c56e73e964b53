"""Peak-memory measurement that works the same on CPU (resident set size) and CUDA (the allocator's peak)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


@contextmanager
def peak_memory(device: str = "cpu"):
    """Yields a dict whose 'peak' is, after the block, the peak memory above the level at entry (bytes).

    CPU: the resident set size sampled every millisecond by a thread (large tensors are mmap-ed, so freed memory
    leaves the RSS and the level at entry is a fair baseline). CUDA: torch's own peak statistic.
    """
    result = {"peak": 0}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["peak"] = torch.cuda.max_memory_allocated() - start
        return
    start, peak, running = _rss_bytes(), [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        running[0] = False
        thread.join()
        result["peak"] = max(peak[0], _rss_bytes()) - start
