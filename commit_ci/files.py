"""Files that others read, written so that they never see half of one; and files a job
wrote, read so that it cannot make the reader open another."""

from __future__ import annotations

import errno
import os
import stat
import tempfile


def _read_umask() -> int:
    # Read once, at import (before any thread): os.umask can only be read by setting it.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: What a file made with open() gets; mkstemp's files are private (0600) instead.
NEW_FILE_MODE = 0o666 & ~_read_umask()


def atomic_write(path: str, data: bytes, durable: bool = True, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never part.

    The data goes to a temporary file in the same folder, is flushed (and, with
    ``durable``, fsync'ed), then renamed over ``path``. The file gets ``mode``, or
    else the mode open() would give it (0644 under the usual umask): results are for
    others to read, a web server for one. (The temporary file is private until then.)
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), NEW_FILE_MODE if mode is None else mode)
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def open_untrusted(path: str):
    """A file a job wrote (its JUnit XML, its output), opened to read so that the job
    cannot make the runner read something else through it: not through a link (at
    the last step: the folders on the way are the runner's), not a second name of
    another file, not a FIFO that would block. OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise OSError(errno.EPERM, "not a plain file of its own", path)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
