"""Files and directories written atomically (a reader, or a crash, never sees half of one; a failed
write, such as a full disk, leaves what was there), tensors read back from safetensors files with
one clear error for a missing or damaged file, and the lock a process holds on the directory it
writes a run into."""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tunelab.errors import TunelabError

# Temp names beside what is being written: a process killed mid-write leaves them, the next writer
# into that directory removes them (remove_leftovers).
STAGING_PREFIX = ".tmp-"


def write_text_atomic(path: Path, text: str) -> None:
    with staged_write(path, directory=False) as staging:
        staging.write_text(text)


@contextlib.contextmanager
def staged_write(target: Path, directory: bool = True):
    """Yield a temp path to write `target` at: an empty directory, or (`directory=False`) a file
    path. When the block ends, what was written replaces `target` whole, fsynced first, so a crash
    or power cut leaves the old one or the new one. If writing fails (disk full, I/O error), the
    temp path goes and `target` stays as it was, and a TunelabError names it. The temp path lives in
    the nearest folder that exists: folders missing above `target` are made only when it is done."""
    home = next(folder for folder in target.parents if folder.exists())
    staging = home / f"{STAGING_PREFIX}{target.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # what an earlier process of this pid left
    try:
        staging.mkdir()
        written = staging if directory else staging / target.name
        yield written
        for file in [*staging.rglob("*"), staging]:
            _fsync(file)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():  # move the old one aside first: a crash between the renames leaves it, not nothing
            os.replace(target, staging.with_name(staging.name + "-old"))
        os.replace(written, target)
    except (OSError, SafetensorError) as err:
        raise TunelabError(f"cannot write {target}: {failure_reason(err)}") from None
    finally:
        for leftover in (staging, staging.with_name(staging.name + "-old")):
            shutil.rmtree(leftover, ignore_errors=True)
    _fsync(target.parent)


def remove_leftovers(directory: Path) -> None:
    """Remove what interrupted atomic writes left in `directory`."""
    if directory.is_dir():
        for leftover in directory.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def failure_reason(err: Exception) -> str:
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


def describe_path(path: str | os.PathLike) -> str:
    """A path for a message about a missing file: a relative one also as the absolute path it
    resolved to and the working directory it was resolved from (paths in a config are relative to
    the working directory, not to the config file)."""
    path = Path(path)
    if path.is_absolute():
        return str(path)
    return f"{path.absolute()} ({path} resolved from the working directory {Path.cwd()})"


def check_output_folder(out: Path, flag: str = "--out") -> None:
    """Refuse an output directory that is a file, holds something already, or lies below a file: a
    command writes its output folder whole (staged_write), so it must be free."""
    if out.exists() and not out.is_dir():
        raise TunelabError(f"{flag} {out} is a file; the output is a directory")
    if out.exists() and any(out.iterdir()):
        raise TunelabError(f"{flag} {out} exists and is not empty")
    check_parent_folders(out, flag)


def check_parent_folders(out: Path, flag: str = "--out") -> None:
    """Refuse an output path below a file (its folders are made when it is written)."""
    existing = next(folder for folder in out.absolute().parents if folder.exists())
    if not existing.is_dir():
        raise TunelabError(f"{flag} {out}: {existing} is a file, not a directory")


def check_regular_file(path: Path, what: str = "data file") -> None:
    """Refuse anything but an existing regular file, before it is opened (opening a FIFO would wait
    for a writer)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise TunelabError(f"{what} not found: {describe_path(path)}") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL in the path
        raise TunelabError(f"{path!r}: cannot read the {what}: {getattr(err, 'strerror', None) or err}") from None
    if stat.S_ISDIR(mode):
        raise TunelabError(f"{path}: a directory, not a {what}")
    if not stat.S_ISREG(mode):
        raise TunelabError(f"{path}: not a regular file (a FIFO, socket or device), so not a {what}")


def read_bytes(path: Path, what: str = "data file") -> bytes:
    """The bytes of a file, decompressed when its name ends in .gz; a file that cannot be read (not
    a regular file, gone since it was checked, unreadable, a damaged .gz) is one error naming it."""
    check_regular_file(path, what)
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.suffix.lower() == ".gz" else data
    except (OSError, EOFError, zlib.error) as err:  # EOFError, zlib.error: a cut or damaged .gz
        raise TunelabError(f"{path}: cannot read the {what}: {getattr(err, 'strerror', None) or err}") from None


def read_text(path: Path, what: str = "data file") -> str:
    """A file's text: UTF-8, with or without a byte-order mark. A byte that is not UTF-8 is refused
    naming its line, like every other defect of a file."""
    data = read_bytes(path, what).removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            found = "it starts with a UTF-16 byte-order mark"
        else:
            found = f"byte 0x{data[err.start]:02x} at column {column}"
        raise TunelabError(f"{path}:{line}: not UTF-8 text ({found}); save the file as UTF-8") from None


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks (a large file is never held in memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
