"""The spool: where received and produced instances live on disk.

Layout ``<root>/<study>/<series>/<sop>.dcm``. Every path component is a UID validated against
the UID grammar (PS3.5 9.1: digits and dots, at most 64 characters), never a raw string from the
network. Writes are atomic and durable: temporary file, fsync, rename, fsync of the directory.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from pathlib import Path

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class InvalidUID(ValueError):
    """A value that is not a DICOM UID and must not become a path component."""


def is_valid_uid(value: str) -> bool:
    """True for a syntactically valid UID (PS3.5 9.1)."""
    return 0 < len(value) <= 64 and _UID.match(value) is not None


def check_uid(value: object, name: str) -> str:
    """Return ``value`` as a UID string, or raise :class:`InvalidUID` naming the attribute."""
    text = str(value or "").strip().rstrip("\x00")
    if not text:
        raise InvalidUID(f"{name} is missing or empty")
    if not is_valid_uid(text):
        raise InvalidUID(f"{name} is not a valid UID")
    return text


def instance_path(root: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where an instance lives; every component is validated."""
    parts = [
        check_uid(u, n)
        for u, n in (
            (study_uid, "StudyInstanceUID"),
            (series_uid, "SeriesInstanceUID"),
            (sop_uid, "SOPInstanceUID"),
        )
    ]
    return root.joinpath(parts[0], parts[1], f"{parts[2]}.dcm")


def write_durable(path: Path, data: bytes, replace: bool = True) -> bool:
    """Write ``data`` to ``path`` so that it is complete and on disk when this returns.

    Temporary file in the same directory, fsync, atomic rename, fsync of the directory: after a
    crash the file is either absent or whole, never half-written under its final name. With
    ``replace`` False an existing ``path`` is kept and False returned (the first copy stays).
    """
    directory = path.parent
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    # unique to this write: two threads, processes or nodes (one shared spool) may write the
    # same instance at once; each renames a whole file of its own
    tmp = directory / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_new_entry(directory, created)
    return True


def fsync_file(path: Path) -> int:
    """fsync of a complete file (its data and size on disk); returns its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def place_durable(source: Path, path: Path, synced: bool = False) -> bool:
    """Give the complete file ``source`` the name ``path`` durably, unless a file is there
    already: False then, and nothing changes (the first copy of an instance stays, whoever
    wrote it: another association, process or node on the shared spool).

    fsync of the file (unless ``synced`` says the caller did it), a hard link to the new name
    (atomic, and it never replaces; a copy when ``source`` lies on another filesystem), fsync
    of the directory. ``source`` keeps its name: the caller removes it.
    """
    directory = path.parent
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    if not synced:
        fsync_file(source)
    try:
        os.link(source, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP):
            raise
        return write_durable(path, Path(source).read_bytes(), replace=False)
    _fsync_new_entry(directory, created)
    return True


def _fsync_new_entry(directory: Path, created: bool) -> None:
    _fsync_dir(directory)
    if created:  # new directories must be durable in their parents too
        for parent in list(directory.parents)[:2]:
            _fsync_dir(parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
