"""File writes that never leave a half-written file under the final name."""
from __future__ import annotations

import os

from etils import epath


def atomic_write(path: str | os.PathLike, data: str | bytes) -> epath.Path:
    """Writes ``data`` under a temporary name beside ``path``, then renames it over.

    Works for local paths and, through etils/gfile, for ``gs://`` paths (where the
    rename is a copy and delete, still never exposing a partial file).
    """
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException:  # a stop signal or a full disk: leave no temporary behind
        if tmp.exists():
            tmp.unlink()
        raise
    return path
