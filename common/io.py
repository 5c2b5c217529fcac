"""Atomic file writes and output folders (DESIGN.md, Conventions: writes are temp file + rename, never
half-written; a filesystem failure is one sentence naming the path and the fix)."""
import contextlib
import errno
import os
import tempfile
from pathlib import Path

from common.errors import UserError

TEMP_SUFFIX = ".tmp"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_error(path, err):
    """The :class:`UserError` of a failed write of ``path`` (disk full, permissions, a file where a folder goes)."""
    code = getattr(err, "errno", None)
    if code == errno.ENOSPC or (isinstance(err, RuntimeError) and "unexpected pos" in str(err)):
        return UserError(f"no space left on device while writing {path}; free space or choose another output folder")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {path} (permission denied); choose a writable output folder")
    if code in (errno.ENOTDIR, errno.EEXIST):
        return UserError(f"cannot write {path}: a file stands where a folder of its path should be; "
                         "remove that file or choose another output folder")
    reason = getattr(err, "strerror", None) or type(err).__name__
    return UserError(f"cannot write {path} ({reason}); choose another output folder")


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Yield a file beside ``path``; on success it is flushed, fsynced and renamed over ``path``.

    On any error the temporary file is removed and an existing ``path`` is left untouched; a filesystem
    error (disk full, permissions, a file as folder) becomes a :class:`UserError` naming ``path``.
    The file gets the usual permissions (0666 minus the umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) or (isinstance(err, RuntimeError) and "unexpected pos" in str(err)):
            raise _write_error(path, err) from err
        raise


def output_dir(path, flag):
    """Create the output folder ``path`` (given with ``flag``) and check it is writable, before any work.

    A file in its place, an uncreatable or an unwritable folder is a :class:`UserError` naming ``flag``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; pass a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".segkd-write-check.", suffix=TEMP_SUFFIX, dir=path)
    except OSError as err:
        if err.errno in (errno.ENOTDIR, errno.EEXIST):
            raise UserError(f"{flag} {path} cannot be created: a file stands where one of its folders should be; "
                            "pass another folder") from err
        reason = err.strerror or type(err).__name__
        raise UserError(f"{flag} {path} is not writable ({reason}); pass a writable folder") from err
    os.close(fd)
    os.unlink(probe)
    return path


def output_file(path, flag):
    """Check that the file ``path`` (given with ``flag``) can be written: its folder via :func:`output_dir`,
    and ``path`` itself not a folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a file path")
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"{flag} {path} cannot be written: {path.parent} is a file, not a folder; pass another path")
    output_dir(path.parent, f"{flag} folder")
    return path


def remove_stale_temps(folder, names):
    """Delete the temporary files ``.<name>.*.tmp`` that an interrupted :func:`atomic_open` left in ``folder``
    (``names``: the files the run owns, glob patterns allowed); returns the removed paths."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for name in names:
        for tmp in folder.glob(f".{name}.*{TEMP_SUFFIX}"):
            if tmp.is_file():
                tmp.unlink()
                removed.append(tmp)
    return removed
