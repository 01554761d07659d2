"""Writing files so that a crash or Ctrl-C never leaves a half-written one behind."""
import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


class FileError(Exception):
    """A file that cannot be written or read as asked; the message names it and the cause, which the user, not
    the program, can fix. The scripts print it as one line, as they do gpt2.UserError and lora.LoRAError."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success flush it to disk and rename it over `path`.

    A rename within one directory is atomic: readers see the old file or the new one, never a partial one.
    On any error (KeyboardInterrupt included) the temporary file is removed and `path` is untouched. The file
    gets the permissions a plain open() would give it (the user's umask).

    The disk filling up, a read-only mount, a missing permission, a path below a file: the OS's error becomes a
    FileError naming `path` and the cause, since the user, not the program, can fix it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise FileError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes the file private (0600); open() would not
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            raise FileError(f"cannot write {path}: {e.strerror or e}; the file there before (if any) is "
                            f"unchanged") from None
        raise


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def check_writable_dir(directory: str | os.PathLike, what: str) -> None:
    """Refuse before any work if files cannot be written into `directory` (created later if missing): its
    nearest existing ancestor must be a writable directory. `what` names the flag, for the message."""
    directory = Path(directory)
    existing = next(p for p in (directory, *directory.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise FileError(f"{what} {directory}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise FileError(f"{what} {directory}: cannot write in {existing} ({e.strerror}); choose a writable "
                        f"location") from None
