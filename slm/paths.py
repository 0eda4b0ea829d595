"""The one rule for paths: every file the app reads or writes lies inside its allowed folders.

`inside` resolves a path (symlinks followed) and checks it against the allowed roots at the moment
of use; every reader and writer that takes a path from a user or from a file goes through it.
Writers that must never follow a link (uploads, a run's own `job.json`, `worker.log`,
`metrics.jsonl`, `run.json`) use `write_text_nofollow` / `open_append_nofollow` /
`create_new_file`, which open the final component with O_NOFOLLOW, so a symlink planted under a
trusted name cannot redirect the write elsewhere.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO


class PathNotAllowed(ValueError):
    """A path outside the folders the app may read or write."""


def inside(path: str | Path, roots: Iterable[str | Path], base: str | Path | None = None) -> Path:
    """`path` resolved (symlinks followed) when it lies inside one of `roots`; else PathNotAllowed.

    A relative path is taken relative to `base` (default: the first root).
    """
    resolved_roots = [Path(r).resolve() for r in roots]
    if not resolved_roots:
        raise PathNotAllowed(f"{path}: no folder is allowed")
    candidate = Path(str(path).strip()).expanduser()
    if not candidate.is_absolute():
        candidate = Path(base or resolved_roots[0]) / candidate
    resolved = candidate.resolve()
    for root in resolved_roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    names = " or ".join(str(r) for r in resolved_roots)
    raise PathNotAllowed(f"{path} is outside the folders this app may read or write ({names}); it was not opened.")


def is_inside(path: str | Path, roots: Iterable[str | Path]) -> bool:
    try:
        inside(path, roots)
    except PathNotAllowed:
        return False
    return True


def links_leaving(folder: str | Path) -> list[tuple[Path, Path]]:
    """(entry, target) for every entry of `folder` (not recursive) that resolves outside it."""
    folder = Path(folder)
    home = folder.resolve()
    leaving = []
    for entry in folder.iterdir():
        target = entry.resolve()
        if not (target == home or target.is_relative_to(home)):
            leaving.append((entry, target))
    return leaving


def _open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open with O_NOFOLLOW; a symlink at `path` is reported, not followed."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PathNotAllowed(f"{path} is a symbolic link; it is not followed (the app writes only real files)") \
                from None
        raise


def write_text_nofollow(path: str | Path, text: str) -> None:
    """Replace `path` with `text`: a fresh temporary file renamed over it (a symlink there is replaced, never
    followed), so readers see the old or the new content, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_append_nofollow(path: str | Path, binary: bool = False) -> IO:
    """Open `path` for appending (created when missing). A symlink planted there is removed and a real file
    started in its place: the app's own logs never write through a link."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    try:
        fd = _open_nofollow(path, flags)
    except PathNotAllowed:
        path.unlink()
        fd = _open_nofollow(path, flags | os.O_EXCL)
    return os.fdopen(fd, "ab" if binary else "a")


def create_new_file(folder: str | Path, name: str) -> tuple[IO[bytes], Path]:
    """A new file in `folder` named `name`, or `stem-2.ext`, `stem-3.ext`, ... when that name is taken.

    Opened with O_CREAT | O_EXCL | O_NOFOLLOW: an existing file is never replaced and a symlink
    with the name is never followed (it counts as taken). Returns the open binary file and its path.
    """
    folder = Path(folder)
    stem, suffix = Path(name).stem, Path(name).suffix
    for n in range(1, 10_000):
        candidate = folder / (name if n == 1 else f"{stem}-{n}{suffix}")
        try:
            fd = _open_nofollow(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            continue
        except PathNotAllowed:
            continue
        return os.fdopen(fd, "wb"), candidate
    raise FileExistsError(f"{folder} already holds 10,000 files named like {name}; remove some first")
