"""Run model-written Python in a sandboxed subprocess, and say whether it passed.

Each program gets its own temporary folder (removed afterwards) and runs under `sandbox_child.py`,
which applies what the OS offers: new user/network/PID namespaces, resource limits (CPU time,
memory, file size, open files, processes) and Landlock (reads only under the Python installation
and system libraries, writes only in its folder, no TCP). Here, the parent puts the child in its
own session; at the wall-clock timeout it asks the child to end the program's namespace (SIGTERM),
and after every run it kills the child's process group, so nothing the program started outlives
it. `SandboxResult.layers` records which layers the kernel allowed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
OUTPUT_LIMIT = 4096  # characters of stdout/stderr kept per run
KILL_GRACE_S = 5.0  # after the timeout's SIGTERM, how long the child may take to end the namespace
SYSTEM_LIBRARIES = ["/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/etc/ld.so.cache"]


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock; CPU time is capped at the same number of seconds
    memory_mb: int = 1024
    file_mb: int = 16
    open_files: int = 64
    processes: int = 16


@dataclass
class SandboxResult:
    passed: bool  # exited 0 within the limits
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float
    layers: dict = field(default_factory=dict)


def python_install_folders() -> list[str]:
    """What the child's interpreter must read to run: its prefixes and standard library."""
    folders = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    folders.update(sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib"))
    folders.add(str(Path(sys.executable).resolve().parent.parent))
    return sorted(folders)


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `program` (Python source) in the sandbox and collect its outcome."""
    with tempfile.TemporaryDirectory(prefix="tunelab-sandbox-") as workdir:
        path = Path(workdir) / "program.py"
        path.write_text(program, encoding="utf-8")
        settings = {
            "cpu_seconds": max(1, int(limits.timeout_s + 0.999)),
            "memory_mb": limits.memory_mb,
            "file_mb": limits.file_mb,
            "open_files": limits.open_files,
            "processes": limits.processes,
            "readable": python_install_folders() + SYSTEM_LIBRARIES,
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        layers_pipe, settings["layers_fd"] = os.pipe()
        os.set_blocking(layers_pipe, False)
        started = time.perf_counter()
        # Output goes to unnamed files, capped by the file-size limit: a program printing without
        # end fills no memory here.
        with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
            try:
                process = subprocess.Popen(
                    [sys.executable, "-I", str(CHILD), json.dumps(settings), str(path)],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,
                    pass_fds=(settings["layers_fd"],),
                )
            finally:
                os.close(settings["layers_fd"])
            layers: dict = {}
            timed_out = False
            try:
                process.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                layers = _read_layers(layers_pipe)
                if layers.get("namespaces"):
                    process.terminate()  # the child ends the program's namespace, then exits
                    try:
                        process.wait(timeout=KILL_GRACE_S)
                    except subprocess.TimeoutExpired:
                        pass
            finally:
                _kill_group(process.pid)  # anything left in its process group, and the child itself
                process.kill()
                process.wait()
                layers = layers or _read_layers(layers_pipe)
                os.close(layers_pipe)
            seconds = time.perf_counter() - started
            out, err = _tail(stdout), _tail(stderr)
    return SandboxResult(
        passed=not timed_out and process.returncode == 0,
        returncode=None if timed_out else process.returncode,
        timed_out=timed_out,
        stdout=out,
        stderr=err,
        seconds=seconds,
        layers=layers,
    )


def _read_layers(pipe: int) -> dict:
    """The layers the child reported (empty until it has, or if it never could)."""
    try:
        return json.loads(os.read(pipe, 4096) or b"{}")
    except (BlockingIOError, json.JSONDecodeError):
        return {}


def _tail(file) -> str:
    """The last OUTPUT_LIMIT characters of an output file (read as at most 4 bytes each)."""
    end = file.seek(0, os.SEEK_END)
    file.seek(max(0, end - 4 * OUTPUT_LIMIT))
    return file.read().decode("utf-8", "replace")[-OUTPUT_LIMIT:]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
