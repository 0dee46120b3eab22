"""Every file tlkit writes -> whole or not at all; a full disk -> one line that says where and how much.

A file is written under a temporary name in its own folder and renamed over the target only once it
is complete (`replacing`), so a crash, a kill or a full disk leaves the previous version intact, and a
reader sees the old file or the new one, never half of one. Light: no third-party imports.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tlkit.errors import TlkitError

FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it replaces `path`, on any failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".partial{path.suffix}")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's file is 0600; the finished file gets what open() would give it
    except (AttributeError, OSError):  # no fchmod (Windows), or a file system without modes
        pass
    os.close(fd)
    try:
        yield Path(name)
        os.replace(name, path)
    except OSError as err:
        if err.filename is None:  # a failed write() names no file: name the one being written
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    finally:
        Path(name).unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else set and restored at once."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with replacing(path) as partial:
        partial.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8; characters that are not (file names that were not UTF-8) are written back as their original bytes."""
    return write_bytes(path, text.encode("utf-8", "surrogateescape"))


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in FULL


def mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def disk_full_message(err: OSError, fallback: str | os.PathLike = ".") -> str:
    """'no space left on the disk of FOLDER (mounted at M): N MB free; ...' for an ENOSPC/EDQUOT/EFBIG error."""
    # a copy names its source first and the file it was writing second (shutil's sendfile): the disk is the second's
    written = getattr(err, "filename2", None) or getattr(err, "filename", None)
    where = Path(os.fsdecode(written)).parent if written else Path(fallback)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free / 2**20
        amount = f"{free:.0f} MB free"
    except OSError:
        amount = "free space unknown"
    what = "file size limit reached" if err.errno == errno.EFBIG else "no space left"
    return (
        f"{what} on the disk of {where} (mounted at {mount_point(where)}): {amount}; free some space and run the "
        "command again"
    )


def check_writable(folder: str | os.PathLike, purpose: str) -> None:
    """A one-line error when `folder` (or the nearest existing parent) cannot be written."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise TlkitError(
            f"cannot write {purpose} in {probe} (read-only or no permission); run tlkit in a folder you can write, "
            "or point that path elsewhere"
        )


def write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Rows with the same keys -> a CSV (UTF-8; a file name that is not UTF-8 keeps its original bytes)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def save_figure(figure, path: str | os.PathLike) -> Path:
    """A matplotlib figure -> PNG (or what the suffix names), written whole."""
    path = Path(path)
    with replacing(path) as partial:
        figure.savefig(partial, format=path.suffix.lstrip(".") or "png")
    return path


def check_sqlite_store(uri: str | None) -> None:
    """A damaged SQLite tracking store (a truncated or overwritten mlflow.db), found from its 100-byte header before
    MLflow loads: one line naming the file and the fix, in milliseconds rather than a traceback seconds later."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///") :])
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header = handle.read(100)
    except OSError:
        return  # not there yet (a new store), or not ours to read: MLflow says what it finds
    if size == 0:
        return
    damaged = len(header) < 100 or not header.startswith(b"SQLite format 3\x00")
    if not damaged:
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(header[28:32], "big")
        # SQLite trusts the header's page count only when the change counter matches "version valid for"
        if pages and header[24:28] == header[92:96] and size < pages * page_size:
            damaged = True
    if damaged:
        raise TlkitError(
            f"the tracking store {path} is damaged (its SQLite header "
            f"{'is not SQLite' if not header.startswith(b'SQLite') else 'promises more pages than the file holds'}); "
            "restore it from a backup, or move it away and start a new store (or pass --tracking-uri sqlite:///new.db)"
        )


def printable(text: str) -> str:
    """A file name for a terminal or a log: bytes that are not UTF-8 shown as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
