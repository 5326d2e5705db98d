"""Writing the user's output files: checked before any work is done, never over an existing
file unless asked (and never over anything but a file), never half a file, nothing left behind.

A file is written under a temporary name in its folder, then published in one step: without
--force by a hard link, which fails if the name exists (so two runs saving to the same new
name cannot both succeed); with --force by a rename over the old file.
"""
import errno
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from stages import UserError

PARTIAL_PREFIX, PARTIAL_SUFFIX = ".llama-trace-", ".partial"


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_writable(path: Path, force: bool) -> None:
    """Everything about writing `path` that can be known before the work that makes its content."""
    try:
        _check_writable(path, force)
    except OSError as e:  # a name too long to look up, a folder we may not enter
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _check_writable(path: Path, force: bool) -> None:
    folder = _folder(path)
    try:
        name_max = os.pathconf(folder if folder.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    if len(os.fsencode(path.name)) > name_max:
        raise UserError(f"cannot write {path}: the file name is longer than the {name_max} bytes this folder allows")
    if not path.name or path.is_dir():
        raise UserError(f"{path} is a directory, not a file name")
    if os.path.lexists(path):
        mode = os.lstat(path).st_mode
        if not force:
            raise UserError(f"{path} exists already (add --force to overwrite it)")
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise UserError(f"{path} is not a regular file (a device, a pipe or a socket): it is never replaced")
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: folder {folder} does not exist")
    try:  # a real probe: permissions, a read-only file system, a full inode table
        fd, probe = tempfile.mkstemp(dir=folder, prefix=PARTIAL_PREFIX, suffix=PARTIAL_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _publish(partial: str, path: Path, force: bool) -> None:
    """Give the finished file its name, in one step."""
    if force:
        check_writable(path, force)  # it may have become a device meanwhile
        os.replace(partial, path)
        return
    try:
        os.link(partial, path)  # fails if the name exists, even as a dangling link
    except FileExistsError:
        raise UserError(f"{path} exists already (add --force to overwrite it): another program made it "
                        f"while this one worked") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # A file system without hard links: claim the name exclusively, then move the file onto it.
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise UserError(f"{path} exists already (add --force to overwrite it)") from None
        os.replace(partial, path)
    else:
        os.unlink(partial)


@contextmanager
def output_file(path: Path, force: bool) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s content into; published only if the block completes.
    An error, Ctrl-C or SIGTERM (see trace.cli) leaves nothing behind."""
    check_writable(path, force)
    partial = None
    try:
        fd, partial = tempfile.mkstemp(dir=_folder(path), prefix=PARTIAL_PREFIX, suffix=PARTIAL_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(partial, 0o644 & ~_umask())  # mkstemp makes it private; an output file is for reading
        _publish(partial, path, force)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if partial is not None and os.path.lexists(partial):
            os.unlink(partial)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_output(path: Path, data: bytes, force: bool) -> Path:
    """Write `data` to `path` (see output_file)."""
    with output_file(path, force) as f:
        f.write(data)
    return path
