"""Atomic file writes: a file that exists is complete, whatever killed the run that wrote it.

Stage 1 resumes from whatever files it finds, so a half-written table or score file must never be found."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def atomic_write(path: str | os.PathLike, content: str | pa.Table) -> Path:
    """Write text (UTF-8) or an Arrow table (Parquet) to `<path>.tmp`, then rename it to `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(content, pa.Table):
        pq.write_table(content, tmp)
    else:
        tmp.write_text(content, encoding="utf-8")
    tmp.replace(path)
    return path
