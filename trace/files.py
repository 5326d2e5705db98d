"""Writing the user's output files: never over an existing file unless asked, never half a file."""
import os
import tempfile
from pathlib import Path

from stages import UserError


def write_output(path: Path, data: bytes, force: bool) -> Path:
    """Write `data` to `path` atomically; refuse to replace an existing file without `force`."""
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a file name")
    if path.exists() and not force:
        raise UserError(f"{path} exists already (add --force to overwrite it)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: folder {parent} does not exist")
    try:
        fd, partial = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".partial")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(partial, 0o644)  # mkstemp makes it private; an output file is for reading
        os.replace(partial, path)  # a crash never leaves half a file under the final name
    except OSError as e:
        if "partial" in locals() and os.path.exists(partial):
            os.unlink(partial)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return path
