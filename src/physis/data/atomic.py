"""Directory-level commits: a dataset is built in a staging directory and swapped in whole.

A crash at any point leaves either the previous dataset or the new one at the target path, never a
half-written one. On Linux the swap is one `renameat2(RENAME_EXCHANGE)` call; elsewhere it falls
back to two renames, and `recover` restores the previous dataset if a crash fell between them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import uuid
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def staging_dir(root: Path, purpose: str = "writing") -> Path:
    return root.parent / f".{root.name}.{purpose}-{uuid.uuid4().hex[:8]}"


def hardlink_tree(src: Path, dst: Path) -> None:
    """Copy a tree by hard links (instant, no extra space); falls back to copies across devices.
    Files are never modified in place afterwards: rewritten files get a new inode."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def _exchange(a: Path, b: Path) -> bool:
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def commit(staging: Path, root: Path) -> None:
    """Make `staging` the content of `root`, atomically; the previous content is removed after."""
    _fsync_dir(staging)
    if not root.exists():
        os.rename(staging, root)
    elif _exchange(staging, root):
        shutil.rmtree(staging)  # now holds the previous dataset
    else:
        backup = root.parent / f".{root.name}.previous"
        os.rename(root, backup)
        os.rename(staging, root)
        shutil.rmtree(backup)
    _fsync_dir(root.parent)


def recover(root: Path) -> None:
    """Restore the previous dataset if a non-atomic swap was cut between its two renames."""
    backup = root.parent / f".{root.name}.previous"
    if backup.exists() and not root.exists():
        os.rename(backup, root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
