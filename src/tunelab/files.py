"""Files and directories written atomically (a reader, or a crash, never sees half of one; a failed
write, such as a full disk, leaves what was there), tensors read back from safetensors files with
one clear error for a missing or damaged file, and the lock a process holds on the directory it
writes a run into."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tunelab.errors import TunelabError

# Temp names beside what is being written: a process killed mid-write leaves them, the next writer
# into that directory removes them (remove_leftovers).
STAGING_PREFIX = ".tmp-"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{STAGING_PREFIX}{path.name}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise TunelabError(f"cannot write {path}: {err.strerror or err}") from None


@contextlib.contextmanager
def staged_directory(target: Path):
    """Yield an empty temp directory beside `target` to write into; when the block ends it replaces
    `target` whole (fsynced first, so a power cut leaves the old or the new one). If writing fails
    (disk full, I/O error) the temp directory goes and `target` stays as it was: a TunelabError names it."""
    staging = target.parent / f"{STAGING_PREFIX}{target.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # what an earlier process of this pid left
    try:
        staging.mkdir()
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                _fsync(file)
        _fsync(staging)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise TunelabError(f"cannot write {target}: {_reason(err)}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():  # move the old one aside first: a crash between the renames leaves it, not nothing
        old = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}old-{target.name}-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(staging, target)
        shutil.rmtree(old)
    else:
        os.replace(staging, target)
    _fsync(target.parent)


def remove_leftovers(directory: Path) -> None:
    """Remove what interrupted atomic writes left in `directory`."""
    if directory.is_dir():
        for leftover in directory.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def _reason(err: Exception) -> str:
    """The system's words for a failed write: an OSError's, or those of the OS error safetensors wraps."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    code = re.search(r"\(os error (\d+)\)", str(err))
    return os.strerror(int(code.group(1))) if code else str(err)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, value: dict) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, truncated or corrupt file is a TunelabError naming it."""
    try:
        return load_file(path)
    except FileNotFoundError:
        raise TunelabError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise TunelabError(f"{path}: not a readable safetensors file ({err})") from None


@contextlib.contextmanager
def exclusive_directory(directory: Path, purpose: str):
    """Hold an exclusive lock on `directory` (created if missing) while the block runs; another
    process asking for it is refused at once. The kernel releases a flock when its holder exits,
    however it exits (SIGKILL included), so a lock is never left stale. Directories this call
    created are removed again if the block leaves them empty (a run refused before writing)."""
    if directory.exists() and not directory.is_dir():
        raise TunelabError(f"{directory} is a file, not a directory: {purpose} needs a directory there")
    created = [parent for parent in [directory, *directory.parents] if not parent.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TunelabError(f"{directory} is in use: another process is running {purpose} there") from None
        yield
    finally:
        os.close(handle)
        for parent in created:  # innermost first; stops at the first one that holds something
            try:
                parent.rmdir()
            except OSError:
                break
