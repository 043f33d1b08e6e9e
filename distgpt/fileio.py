"""Writing files so that a crash or a full disk never leaves a half-written one behind.

Every file the project writes for later reading (token shards and their manifest, checkpoint shards,
manifests and `latest`, exported weights, plots) goes through `atomic_write`: the bytes go to a temp
file beside the target, are fsynced, and only then renamed over it, so readers see the old complete
file or the new complete one. A full disk (ENOSPC, or EDQUOT for a quota) becomes `DiskFullError`, whose
message is one line naming the file the user has to make room for, e.g.
`out/metrics.jsonl: no space left on device`, instead of a traceback from deep inside a write.
Code that appends instead of renaming (a metrics log) uses `append_line`, or `report_disk_full` /
`io_error` around its own writes.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

# mkstemp creates 0600 files; a target made by open() would get 0666 minus the umask. Read the umask
# once: setting it to read it back is process-wide and would race with threads that create files.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class DiskFullError(OSError):
    """The file system holding `path` is full (or the user's quota is). str() is one line,
    `<path>: no space left on device`, ready for a `<tool>: error: ...` report.

    An OSError, so existing `except OSError` handlers still see it; entry points list it among the
    user errors (exit code 2): the fix is to free space, not to debug the program."""

    def __init__(self, path: str | os.PathLike, err: int = errno.ENOSPC) -> None:
        reason = "disk quota exceeded" if err == errno.EDQUOT else "no space left on device"
        super().__init__(err, reason, str(path))
        self.path = Path(path)

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"

    def __reduce__(self):  # OSError pickles its args, not our constructor's: keep the message across MPI
        return (type(self), (self.filename, self.errno))


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FULL_DISK_ERRNOS


def io_error(path: str | os.PathLike, exc: OSError) -> OSError:
    """The error to report for a failed write of `path`: a DiskFullError naming `path` when the disk
    is full, `exc` itself otherwise (so `err is exc` tells whether to re-raise as is). Most callers
    want `report_disk_full`, which does exactly that around a block."""
    if isinstance(exc, DiskFullError) or not is_disk_full(exc):
        return exc
    return DiskFullError(path, exc.errno)


@contextmanager
def report_disk_full(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk inside the block into DiskFullError(path); other errors pass unchanged.

    For writers that append rather than rename: `with report_disk_full(p), open(p, "a") as f: ...`
    (in that order, so that the flush on close is covered too)."""
    try:
        yield
    except OSError as e:
        err = io_error(path, e)
        if err is e:
            raise
        raise err from e


def append_line(file: IO[str], line: str, path: str | os.PathLike) -> None:
    """Append `line` and a newline to `file` (open for appending, at `path`) and push it to the OS.

    The bytes go straight to the descriptor rather than through the file's buffer: a failed write
    then leaves nothing queued that a later flush or close would write half of. On a full disk the
    file is cut back to its previous length, so it keeps only whole lines, and DiskFullError(path)
    is raised. Not fsynced: a log line is not worth a disk flush per step."""
    data = (line + "\n").encode("utf-8")
    with report_disk_full(path):
        file.flush()  # anything written through the file object itself goes first, in order
        fd = file.fileno()
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]  # a nearly full disk takes part of it, then refuses
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass  # the error being raised says more than this one
            raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Make new, renamed or removed entries of directory `path` durable: fsyncing a file does not
    cover its name. Best effort: some file systems (and non-POSIX platforms) refuse it."""
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


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield a file open for writing (`mode` "wb" or "w"; text is UTF-8) that replaces `path` when
    the block ends without an exception: flushed, fsynced, renamed onto `path`, directory fsynced.

    On any exception (including a full disk, raised as DiskFullError naming `path`) the temp file is
    removed and `path` is left as it was. The temp file is a dot-file beside `path` (same file
    system, so the rename is atomic) ending in .tmp, which globs such as train_*.bin do not match."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode {mode!r}, expected 'wb' or 'w'")
    path = Path(path)
    tmp: str | None = None
    with report_disk_full(path):
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                os.fchmod(fd, 0o666 & ~_UMASK)
                f = os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8")
            except BaseException:
                os.close(fd)
                raise
            with f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """`obj` as JSON plus a newline. Serialised before the temp file exists, so an object that cannot
    be serialised leaves nothing behind and raises TypeError/ValueError as json.dumps does."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
