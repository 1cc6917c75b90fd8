"""Run model-written Python in a sandboxed subprocess, and say whether it passed.

Each program gets its own temporary folder (removed afterwards) and runs under `sandbox_child.py`,
which applies what the OS offers: new user/network/PID namespaces, resource limits (CPU time,
memory, file size, open files, processes) and Landlock (reads only under the Python installation
and system libraries, writes only in its folder, no TCP). Here, the parent puts the child in its
own session and kills the whole process group at the wall-clock timeout and after every run, so
nothing it started outlives it. `SandboxResult.layers` records which layers the kernel allowed.
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
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-I", str(CHILD), json.dumps(settings), str(path)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        timed_out = False
        try:
            stdout, stderr = process.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(process.pid)
            stdout, stderr = process.communicate()
        finally:
            _kill_group(process.pid)  # anything it left behind
        seconds = time.perf_counter() - started
    err = stderr.decode("utf-8", "replace")
    layers = {}
    if err.startswith("SANDBOX-LAYERS "):
        first, _, err = err.partition("\n")
        layers = json.loads(first.removeprefix("SANDBOX-LAYERS "))
    return SandboxResult(
        passed=not timed_out and process.returncode == 0,
        returncode=None if timed_out else process.returncode,
        timed_out=timed_out,
        stdout=stdout.decode("utf-8", "replace")[-OUTPUT_LIMIT:],
        stderr=err[-OUTPUT_LIMIT:],
        seconds=seconds,
        layers=layers,
    )


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
