"""The code sandbox (`tunelab.scoring.sandbox.run_python`): untrusted programs are scored as failures
and contained, and well-behaved programs pass.

Every containment test asserts the isolation layers it relies on (`SandboxResult.layers`), so a
machine whose kernel refuses them fails loudly here instead of passing a test that proved nothing.
No test waits on a timer: each checks what is left once `run_python` has returned.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from tunelab.scoring.sandbox import OUTPUT_LIMIT, SandboxLimits, SandboxResult, run_python

FAST = SandboxLimits(timeout_s=10.0)
SECRET = "tunelab-sandbox-secret-7f3a9c"


def require_layers(result: SandboxResult, namespaces: bool = False, landlock: int = 0) -> None:
    """The layers a containment claim rests on were applied (else the test would prove nothing)."""
    assert result.layers.get("rlimits") is True, f"resource limits not applied: {result.layers}"
    if namespaces:
        assert result.layers.get("namespaces") is True, f"user/net/pid namespaces unavailable: {result.layers}"
    if landlock:
        assert result.layers.get("landlock_abi", 0) >= landlock, f"Landlock ABI >= {landlock} needed: {result.layers}"


def live_processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of every live process whose command line or cwd contains `text`.

    A process that has exited (a zombie, or one already past releasing its memory on the way out)
    has an empty cmdline: it is skipped, so only processes still able to run are reported."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if not cmdline:
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            cwd = ""
        if text in cmdline or text in cwd:
            found.append((int(entry), cmdline))
    return found


def workdir_of(result: SandboxResult) -> str:
    """The sandbox folder, which the test programs print as their first stdout line."""
    first = result.stdout.splitlines()[0]
    assert "tunelab-sandbox-" in first, result.stdout
    return first


# ---- Well-behaved programs ---------------------------------------------------------------------


def test_a_correct_program_passes_and_may_write_in_its_folder():
    """A program that exits 0 passes; its folder is its cwd and writable, and stdout comes back."""
    program = (
        "import os, json\n"
        "with open('notes.txt', 'w') as f:\n"
        "    f.write('hello')\n"
        "os.makedirs('sub/dir')\n"
        "with open(os.path.join('sub', 'dir', 'x.json'), 'w') as f:\n"
        "    json.dump({'a': 1}, f)\n"
        "print(open('notes.txt').read(), json.load(open('sub/dir/x.json'))['a'], sum(range(10)))\n"
    )
    result = run_python(program, FAST)
    assert result.passed, result.stderr
    assert result.returncode == 0 and not result.timed_out
    assert result.stdout == "hello 1 45\n"
    assert result.stderr == ""  # the layers line is parsed out of stderr
    assert 0 < result.seconds < FAST.timeout_s


def test_a_failing_assert_fails_with_the_error_in_stderr():
    program = "def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5, 'add is broken'\n"
    result = run_python(program, FAST)
    assert not result.passed and not result.timed_out
    assert result.returncode == 1
    assert "AssertionError: add is broken" in result.stderr


def test_a_nonzero_exit_fails():
    result = run_python("import sys\nprint('partial')\nsys.exit(3)\n", FAST)
    assert not result.passed and result.returncode == 3 and result.stdout == "partial\n"


def test_layers_report_namespaces_landlock_and_rlimits():
    """This machine must offer every layer the containment tests below rely on."""
    result = run_python("pass\n", FAST)
    assert result.passed
    assert set(result.layers) >= {"namespaces", "landlock_abi", "rlimits"}
    require_layers(result, namespaces=True, landlock=4)  # ABI 4: Landlock also restricts TCP


def test_the_program_cannot_forge_the_layers_it_ran_under():
    """The layers come over a pipe closed before the program starts: writing a fake report to every
    descriptor it might have, or over its own stderr, changes nothing."""
    fake = '{"namespaces": false, "landlock_abi": 0, "rlimits": false}'
    program = (
        "import os\n"
        "for fd in range(3, 64):\n"
        "    try:\n"
        f"        os.write(fd, {fake!r}.encode())\n"
        "    except OSError:\n"
        "        pass\n"
        "os.lseek(2, 0, 0)\n"
        f"os.write(2, b'SANDBOX-LAYERS ' + {fake!r}.encode() + b'\\n')\n"
    )
    result = run_python(program, FAST)
    assert result.passed, result.stderr
    require_layers(result, namespaces=True, landlock=1)
    assert result.stderr.startswith("SANDBOX-LAYERS")  # what the program wrote, as its output


def test_the_program_runs_as_pid_1_of_its_own_pid_namespace():
    result = run_python("import os\nprint(os.getpid())\n", FAST)
    require_layers(result, namespaces=True)
    assert result.passed and result.stdout == "1\n"


# ---- Files -------------------------------------------------------------------------------------


@pytest.fixture()
def secret_file(tmp_path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text(SECRET)
    return path


@pytest.mark.parametrize(
    "how",
    [
        "data = open({path!r}).read()",
        "data = open('/proc/self/root' + {path!r}).read()",
        "data = os.read(os.open({path!r}, os.O_RDONLY), 1000).decode()",
        "data = subprocess.run(['cat', {path!r}], capture_output=True, check=True, text=True).stdout",
        "data = str(os.listdir(os.path.dirname({path!r})))",
    ],
    ids=["open", "proc-root", "os-open", "subprocess-cat", "listdir"],
)
def test_reading_a_file_outside_its_folder_fails(secret_file, how):
    """Files outside the program's folder (and the Python/system library folders) are unreadable."""
    program = "import os, subprocess\n" + how.format(path=str(secret_file)) + "\nprint(data)\n"
    result = run_python(program, FAST)
    require_layers(result, landlock=1)
    assert not result.passed and not result.timed_out
    assert SECRET not in result.stdout and SECRET not in result.stderr
    assert "secret.txt" not in result.stdout
    assert "PermissionError" in result.stderr


def test_reading_etc_passwd_fails():
    result = run_python("print(open('/etc/passwd').read())\n", FAST)
    require_layers(result, landlock=1)
    assert not result.passed
    assert "root:" not in result.stdout
    assert "PermissionError" in result.stderr


def test_a_program_swallowing_read_errors_leaks_nothing(secret_file):
    """Even a program that catches every error and prints whatever it got shows no secret."""
    program = (
        "import os\n"
        "got = []\n"
        f"for path in [{str(secret_file)!r}, '/etc/passwd', '/etc/shadow', os.path.expanduser('~/../../etc/hostname')]:\n"
        "    try:\n"
        "        got.append(open(path).read())\n"
        "    except OSError as err:\n"
        "        got.append(type(err).__name__)\n"
        "print(got)\n"
        "raise SystemExit(0 if all(g == 'PermissionError' or g == 'FileNotFoundError' for g in got) else 1)\n"
    )
    result = run_python(program, FAST)
    require_layers(result, landlock=1)
    assert SECRET not in result.stdout and "root:" not in result.stdout
    assert result.passed, result.stdout  # every read was refused


@pytest.mark.parametrize(
    "how",
    [
        "open({target!r}, 'w').write('escaped')",
        "os.makedirs({target!r})",
        "os.symlink({target!r}, 'link'); open('link', 'w').write('escaped')",
        "import shutil; shutil.copy(__file__, {target!r})",
    ],
    ids=["open", "mkdir", "through-symlink", "copy"],
)
def test_writing_outside_its_folder_creates_nothing(tmp_path, how):
    target = tmp_path / "escaped"
    program = "import os\n" + how.format(target=str(target)) + "\n"
    result = run_python(program, FAST)
    require_layers(result, landlock=1)
    assert not result.passed and not result.timed_out
    assert "PermissionError" in result.stderr
    assert not target.exists() and not target.is_symlink()
    assert list(tmp_path.iterdir()) == []


def test_writing_into_tmp_outside_its_folder_creates_nothing(tmp_path):
    """/tmp holds the sandbox folder, but its other entries are still out of reach."""
    target = Path("/tmp") / f"tunelab-escape-{os.getpid()}-{tmp_path.name}"
    result = run_python(f"open({str(target)!r}, 'w').write('x')\n", FAST)
    require_layers(result, landlock=1)
    assert not result.passed
    assert not target.exists()


def test_the_sandbox_folder_is_removed_afterwards():
    result = run_python("import os\nprint(os.getcwd())\nopen('left-behind.txt', 'w').write('x')\n", FAST)
    assert result.passed
    assert not Path(workdir_of(result)).exists()


# ---- Time, processes, memory -------------------------------------------------------------------


def test_an_infinite_loop_is_killed_at_the_timeout():
    """A busy loop ends at the wall-clock timeout. (CPU seconds are capped at ceil(timeout) = 2 s,
    which a single process cannot reach within 1.5 s of wall time, so the timeout always fires first.)"""
    limits = SandboxLimits(timeout_s=1.5)
    result = run_python("while True:\n    pass\n", limits)
    assert result.timed_out and not result.passed
    assert result.returncode is None
    assert limits.timeout_s <= result.seconds < limits.timeout_s + 10


def test_a_sleeping_loop_that_ignores_sigterm_is_killed_at_the_timeout():
    limits = SandboxLimits(timeout_s=1.0)
    program = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.05)\n"
    result = run_python(program, limits)
    assert result.timed_out and not result.passed
    assert limits.timeout_s <= result.seconds < limits.timeout_s + 10


def test_the_process_limit_holds():
    """At most `processes` processes: later forks fail (this holds for root too, whose processes
    the kernel exempts from RLIMIT_NPROC unless the sandbox runs them under another real uid)."""
    program = (
        "import os, sys\n"
        "children = 0\n"
        "for _ in range(40):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        import signal; signal.pause()\n"
        "    children += 1\n"
        "print(children)\n"
    )
    result = run_python(program, SandboxLimits(timeout_s=10.0, processes=8))
    require_layers(result, namespaces=True)
    assert result.passed, result.stderr
    assert 1 <= int(result.stdout) < 8


def test_a_fork_bomb_is_contained():
    """A fork bomb fails, and once run_python returns none of its processes is left running."""
    # Only unleash the bomb where the process limit is known to hold (see the test above).
    probe = run_python(
        "import os\nn = 0\ntry:\n    while n < 40:\n        if os.fork() == 0:\n            import signal; signal.pause()\n        n += 1\nexcept OSError:\n    print(n)\n", FAST
    )
    require_layers(probe, namespaces=True)
    assert probe.stdout.strip().isdigit() and int(probe.stdout) < FAST.processes, f"process limit not enforced: {probe}"

    program = "import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    limits = SandboxLimits(timeout_s=2.0, processes=8)
    result = run_python(program, limits)
    require_layers(result, namespaces=True)
    assert not result.passed
    assert result.seconds < limits.timeout_s + 10
    workdir = workdir_of(result)
    assert live_processes_mentioning(workdir) == []
    assert not Path(workdir).exists()


def test_a_detached_background_process_dies_with_the_program():
    """A child that leaves the process group (setsid) and would run forever is killed when the
    program exits (the PID namespace ends with its PID 1), so the run ends without a timeout."""
    program = "import os, time\nprint(os.getcwd(), flush=True)\nif os.fork() == 0:\n    os.setsid()\n    while True:\n        time.sleep(0.05)\nprint('parent done', flush=True)\n"
    limits = SandboxLimits(timeout_s=20.0)
    result = run_python(program, limits)
    require_layers(result, namespaces=True)
    assert not result.timed_out and result.passed
    assert result.seconds < limits.timeout_s
    assert live_processes_mentioning(workdir_of(result)) == []


def test_a_program_that_leaves_the_session_is_killed_at_the_timeout():
    """The program itself calls setsid (out of the process group the parent kills) and sleeps
    forever: the timeout still ends it, run_python returns, and none of it is left running."""
    program = "import os, time\nprint(os.getcwd(), flush=True)\nos.setsid()\nwhile True:\n    time.sleep(0.05)\n"
    limits = SandboxLimits(timeout_s=1.0)
    result = run_python(program, limits)
    require_layers(result, namespaces=True)
    assert result.timed_out and not result.passed
    assert result.seconds < limits.timeout_s + 5
    assert live_processes_mentioning(workdir_of(result)) == []


def test_endless_output_is_cut_by_the_file_size_limit():
    """Printing without end fails at the file-size limit (16 MB of output), long before the
    timeout, and the result keeps only the last OUTPUT_LIMIT characters."""
    result = run_python("import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    print('x' * 100_000)\n", SandboxLimits(timeout_s=30.0))
    require_layers(result)
    assert not result.passed and not result.timed_out
    assert len(result.stdout) <= OUTPUT_LIMIT and set(result.stdout.strip()) == {"x"}
    assert "File too large" in result.stderr


def test_memory_beyond_the_limit_fails():
    limits = SandboxLimits(timeout_s=10.0, memory_mb=256)
    result = run_python("block = bytearray(512 * 2**20)\nprint(len(block))\n", limits)
    assert not result.passed and not result.timed_out
    assert "MemoryError" in result.stderr
    assert result.stdout == ""


def test_memory_grown_step_by_step_beyond_the_limit_fails():
    limits = SandboxLimits(timeout_s=10.0, memory_mb=256)
    program = "blocks = []\nfor _ in range(64):\n    blocks.append(bytearray(16 * 2**20))\nprint(len(blocks))\n"
    result = run_python(program, limits)
    assert not result.passed and not result.timed_out
    assert "MemoryError" in result.stderr


def test_memory_within_the_limit_passes():
    result = run_python("block = bytearray(64 * 2**20)\nprint(len(block))\n", SandboxLimits(timeout_s=10.0, memory_mb=512))
    assert result.passed and result.stdout == f"{64 * 2**20}\n"


# ---- Network -----------------------------------------------------------------------------------


@pytest.fixture()
def tcp_listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def assert_no_connection(server: socket.socket) -> None:
    """A connection the program made would be queued on the listener by now."""
    with pytest.raises(BlockingIOError):
        server.accept()


def test_connecting_to_a_local_listener_fails(tcp_listener):
    port = tcp_listener.getsockname()[1]
    program = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=5)\ns.sendall(b'{SECRET}')\nprint('connected')\n"
    result = run_python(program, FAST)
    require_layers(result, namespaces=True, landlock=4)
    assert not result.passed and not result.timed_out
    assert "connected" not in result.stdout
    assert_no_connection(tcp_listener)


def test_connecting_to_an_external_address_fails():
    program = "import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=5)\nprint('connected')\n"
    result = run_python(program, FAST)
    require_layers(result, namespaces=True, landlock=4)
    assert not result.passed and not result.timed_out
    assert "connected" not in result.stdout
    assert "Error" in result.stderr


def test_udp_to_a_local_socket_delivers_nothing():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    try:
        port = receiver.getsockname()[1]
        program = f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'{SECRET}', ('127.0.0.1', {port}))\nprint('sent')\n"
        result = run_python(program, FAST)
        require_layers(result, namespaces=True)
        assert not result.passed and "sent" not in result.stdout
        with pytest.raises(BlockingIOError):
            receiver.recv(100)
    finally:
        receiver.close()


def test_the_network_namespace_has_no_usable_interface():
    """Inside, only a loopback that is down: even a server on 127.0.0.1 cannot be reached from itself."""
    program = (
        "import socket\nserver = socket.socket()\nserver.bind(('127.0.0.1', 0))\nserver.listen(1)\nsocket.create_connection(server.getsockname(), timeout=5)\nprint('reached')\n"
    )
    result = run_python(program, FAST)
    require_layers(result, namespaces=True)
    assert not result.passed and "reached" not in result.stdout


def test_results_are_json_serializable_for_eval_records():
    """The harness writes `layers` into its metrics (eval.json): it must be plain JSON."""
    result = run_python("pass\n", FAST)
    assert json.loads(json.dumps(result.layers)) == result.layers
