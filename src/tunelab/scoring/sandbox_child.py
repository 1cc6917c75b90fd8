"""The sandbox's child process (standard library only; run as a script by `tunelab.scoring.sandbox`).

    python -I sandbox_child.py LIMITS_JSON PROGRAM_FILE

In order, before the untrusted program runs:
1. a new user, network and PID namespace (where the kernel lets unprivileged users make them):
   no network interface but a down loopback, and the program runs as PID 1 of its own PID
   namespace, so when it ends (or is killed) the kernel kills every process it started. This
   script, outside, waits for it; on SIGTERM (the parent's timeout) it kills the namespace and
   exits once every process in it is gone, and if it is killed outright the program dies with it;
2. resource limits: CPU seconds, address space, file size, open files, processes;
3. Landlock (Linux ≥ 5.13): files readable only under the Python installation and the system
   library folders, writable only under the program's own folder; TCP bind/connect denied (ABI ≥ 4);
   no signals or abstract unix sockets to processes outside (ABI ≥ 6).
It writes the layers it could apply as JSON to the pipe `layers_fd` of LIMITS_JSON and closes it,
then executes the program as `__main__`; the exit status is the program's.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG = 38, 1
NOBODY = 65534
# Landlock system calls (the same numbers on every architecture of the generic syscall table).
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
READ_ACCESS = (1 << 0) | (1 << 2) | (1 << 3)  # execute, read file, read dir


def fs_access_of(abi: int) -> int:
    """Every filesystem right this Landlock ABI can restrict."""
    rights = (1 << 13) - 1  # v1: execute … make_sym
    if abi >= 2:
        rights |= 1 << 13  # refer
    if abi >= 3:
        rights |= 1 << 14  # truncate
    if abi >= 5:
        rights |= 1 << 15  # ioctl_dev
    return rights


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def enter_namespaces(libc) -> bool:
    """New user + network + PID namespaces; the rest of this script continues in a forked child
    that is PID 1 there. False (nothing changed) where the kernel refuses."""
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        # The kernel never applies RLIMIT_NPROC to processes whose real uid is root: make the real
        # uid another (files are still accessed as root, the effective uid; Landlock limits that).
        os.setresuid(NOBODY, 0, 0)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) != 0:
        if uid == 0:
            os.setresuid(0, 0, 0)
        return False
    # Keep our own ids inside (the program's folder stays ours); no other id exists there.
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # held until each side is ready for it
    child = os.fork()
    if child:  # outside: wait for the namespace's init and exit with its status
        signal.signal(signal.SIGTERM, lambda *_: end_namespace(child))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        _, status = os.waitpid(child, 0)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    # Killed with us even where our end skips end_namespace (a SIGKILL): the program may leave our
    # process group and session (setsid), so the parent's group kill alone would miss it.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    return True


def end_namespace(init: int) -> None:
    """Kill the namespace's init and wait for it: the kernel has then killed and reaped every
    process of the namespace, so nothing the program started is left when we exit."""
    try:
        os.kill(init, signal.SIGKILL)
        os.waitpid(init, 0)
    except (ProcessLookupError, ChildProcessError):  # already reaped
        pass
    os._exit(128 + signal.SIGKILL)


def own_process_count() -> int:
    uid = os.getuid()
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return count


def set_limits(limits: dict, namespaced: bool) -> None:
    memory = limits["memory_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"]))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_mb"] * 2**20,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    # A new user namespace counts its own processes from 1; elsewhere the count is the user's.
    processes = limits["processes"] + (1 if namespaced else own_process_count())
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


def restrict_files_and_network(libc, writable: str, readable: list[str]) -> int:
    """Apply Landlock; the ABI version applied, or 0 where the kernel has no Landlock."""
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if abi < 1:
        return 0
    fs = fs_access_of(abi)
    attr = RulesetAttr(handled_access_fs=fs, handled_access_net=0b11 if abi >= 4 else 0, scoped=0b11 if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0
    for path, access in [(p, READ_ACCESS) for p in readable] + [(writable, fs)]:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        # A file (not a folder) beneath-rule may carry file rights only.
        allowed = access if os.path.isdir(path) else access & ((1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15))
        rule = PathBeneathAttr(allowed_access=allowed, parent_fd=fd)
        syscall(SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(fd)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if syscall(SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        return 0
    os.close(ruleset)
    return abi


def main() -> None:
    limits, program = json.loads(sys.argv[1]), sys.argv[2]
    workdir = os.path.dirname(os.path.abspath(program))
    source = open(program, encoding="utf-8").read()
    libc = ctypes.CDLL(None, use_errno=True)
    namespaced = enter_namespaces(libc)
    set_limits(limits, namespaced)
    landlock = restrict_files_and_network(libc, workdir, limits["readable"])
    # On a pipe of its own, closed before the program runs: the program cannot rewrite it.
    os.write(limits["layers_fd"], json.dumps({"namespaces": namespaced, "landlock_abi": landlock, "rlimits": True}).encode())
    os.close(limits["layers_fd"])
    os.chdir(workdir)
    sys.argv = [program]
    sys.path.insert(0, workdir)
    exec(compile(source, program, "exec"), {"__name__": "__main__", "__file__": program})


if __name__ == "__main__":
    main()
