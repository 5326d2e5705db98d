"""Opening the files a user names: only regular files are read."""
import os
import stat
from pathlib import Path

from .errors import UserError


def file_mode(path: Path, what: str) -> int:
    """`path`'s st_mode, or one line saying why there is none."""
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot open {what} {path}: {e.strerror or e}") from None


def regular_file(path: Path, what: str) -> Path:
    """`path`, if it is an existing regular file: never a folder, a device or a pipe that reads forever."""
    mode = file_mode(path, what)
    if stat.S_ISDIR(mode):
        raise UserError(f"{path} is a directory, not a {what}")
    if not stat.S_ISREG(mode):
        raise UserError(f"{path} is not a regular file (a device, a pipe or a socket), so not a {what}")
    return path
