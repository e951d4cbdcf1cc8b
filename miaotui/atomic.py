"""Write a whole output folder or nothing: build it beside the target, rename when complete.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> with atomic_dir(root / "out") as tmp:
...     _ = (tmp / "a.txt").write_text("done")
>>> sorted(p.name for p in root.iterdir())
['out']
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from miaotui.errors import MiaotuiError


def check_out_dir(target: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse early (before any long work) an output path that exists or cannot be created."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise MiaotuiError(f"output folder {target} already exists; choose another --out or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise MiaotuiError(f"output path {target} exists and is not a folder")
    parent = target.absolute().parent
    if not parent.is_dir():
        raise MiaotuiError(f"cannot create {target}: its parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise MiaotuiError(f"cannot create {target}: no write permission in {parent}")
    return target


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target`, on failure it is removed."""
    target = check_out_dir(target, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.absolute().parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.absolute().parent))
        os.replace(target, old / "x")
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file through a temporary sibling and rename, so readers never see half a file."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes through a temporary sibling and rename, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.absolute().parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
