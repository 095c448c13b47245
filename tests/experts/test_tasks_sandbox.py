"""experts.tasks.sandbox on hostile and on honest code.

Each hostile case runs with the full sandbox, and where a single layer can be tested alone (the audit hook
without namespaces; the namespaces and uid switch without the audit hook) that layer is tested alone too, so a
regression in either shows. Limits are small to keep the tests fast on a shared 2-core machine.
"""

from __future__ import annotations

import ast
import builtins
import os
import socket
import sys
from pathlib import Path

import pytest

from experts.tasks.programs import run_tests
from experts.tasks.sandbox import Limits, isolation, run_many, run_python

# wall-clock limits are generous (a loaded 2-core machine is slow to start a sandbox); CPU limits stay tight
FAST = Limits(timeout_s=30.0, cpu_s=2, memory_mb=256, processes=16)
HOOK_ONLY = Limits(timeout_s=30.0, cpu_s=2, memory_mb=256, processes=16, isolate=False)
ISOLATION_ONLY = Limits(timeout_s=30.0, cpu_s=2, memory_mb=256, processes=8, audit_hook=False)

ISO = isolation()
needs_netns = pytest.mark.skipif("--net" not in ISO["namespaces"], reason="unshare --net is not available here")
needs_nobody = pytest.mark.skipif(not ISO["drops_to_nobody"], reason="not root, or no interpreter nobody can run")
needs_pidns = pytest.mark.skipif("--pid" not in ISO["namespaces"], reason="unshare --pid is not available here")


def _survivors(workdir: str) -> list[int]:
    """Processes whose command line names the run's working directory (every sandboxed process does)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if workdir.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


# ================================================ honest code ===============================================

def test_correct_program_passes_and_output_comes_back():
    r = run_python("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('ok', f(41))", FAST)
    assert r.status == "passed" and r.passed and r.returncode == 0
    assert r.stdout == "ok 42\n"


def test_wrong_program_fails_with_its_traceback():
    r = run_python("def f(x):\n    return x\nassert f(1) == 2, 'f is wrong'", FAST)
    assert r.status == "failed" and not r.passed
    assert "AssertionError: f is wrong" in r.stderr


def test_syntax_error_fails():
    r = run_python("def f(:\n", FAST)
    assert r.status == "failed" and "SyntaxError" in r.stderr


def test_run_tests_on_solutions():
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
    assert run_tests("def add(a, b):\n    return a + b\n", tests, limits=FAST)
    assert not run_tests("def add(a, b):\n    return a - b\n", tests, limits=FAST)
    assert run_tests("def add(a, b):\n    return OFFSET + a + b - 10\n", tests, setup="OFFSET = 10", limits=FAST)


def test_the_program_may_write_in_its_own_directory():
    r = run_python("import tempfile, os\nopen('a.txt', 'w').write('hi')\nassert open('a.txt').read() == 'hi'\n"
                   "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\nos.remove('a.txt')", FAST)
    assert r.passed, r.stderr


def test_early_exit_is_not_a_pass():
    for src in ("import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)\nassert False", "exit()\nassert False"):
        r = run_python(src, FAST)
        assert r.status == "failed", src


def test_run_many_keeps_the_order():
    rs = run_many(["assert True", "assert False", "print(3)"], FAST, workers=2)
    assert [r.status for r in rs] == ["passed", "failed", "passed"] and rs[2].stdout == "3\n"


# =============================================== hostile code ===============================================

@pytest.mark.parametrize("src", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_infinite_loop_and_sleep_time_out(src):
    r = run_python(src, Limits(timeout_s=1.5, cpu_s=1, memory_mb=256))
    assert r.status == "timeout" and not r.passed
    assert r.seconds < 60                        # killed, not run to its end (60 s of sleep)
    assert _survivors(r.workdir) == []


def test_big_allocation_hits_the_memory_limit():
    r = run_python("x = bytearray(2 * 1024 ** 3)\nprint('allocated')", FAST)
    assert r.status == "failed" and "MemoryError" in r.stderr and "allocated" not in r.stdout
    ok = run_python("x = bytearray(32 * 1024 ** 2)\nprint(len(x))", FAST)   # a modest one still works
    assert ok.passed and ok.stdout.strip() == str(32 * 1024 ** 2)


def test_file_size_limit_caps_writes_and_output():
    small = Limits(timeout_s=30.0, cpu_s=2, memory_mb=256, file_mb=1)
    r = run_python("with open('big.bin', 'wb') as f:\n    f.write(b'x' * (8 << 20))\nprint('wrote')", small)
    assert r.status == "failed" and "wrote" not in r.stdout
    r = run_python("import sys\nfor _ in range(1 << 16):\n    sys.stdout.write('y' * 1024)", small)   # 64 MiB of output
    assert r.status == "failed" and len(r.stdout) <= 2000


FORK_BOMB = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30)\n"
             "            os._exit(0)\n        n += 1\nfinally:\n    print('forked', n, flush=True)\n")


def test_fork_bomb_is_stopped():
    r = run_python(FORK_BOMB, FAST)
    assert r.status == "failed" and "forked 0" in r.stdout and "os.fork is not allowed" in r.stderr
    assert _survivors(r.workdir) == []


def test_subprocess_is_refused():
    r = run_python("import subprocess\nsubprocess.run(['true'])", FAST)
    assert r.status == "failed" and "not allowed" in r.stderr


@needs_nobody
@needs_pidns
def test_fork_bomb_without_the_hook_is_bounded_by_nproc_and_the_pid_namespace():
    r = run_python(FORK_BOMB, ISOLATION_ONLY)
    assert r.status == "failed" and "BlockingIOError" in r.stderr
    forked = int(r.stdout.split()[-1])
    assert 0 < forked < ISOLATION_ONLY.processes
    assert _survivors(r.workdir) == []          # the sleeping children died with the namespace


def _write_outside(target: Path) -> str:
    return f"open({str(target)!r}, 'w').write('pwned')\n"


@pytest.mark.parametrize("limits", [FAST, HOOK_ONLY], ids=["full", "hook-only"])
def test_writing_outside_the_working_directory_is_blocked(tmp_path, limits):
    open_dir = tmp_path / "world-writable"
    open_dir.mkdir()
    open_dir.chmod(0o777)                       # only the hook can stop this one
    for target in (tmp_path / "outside.txt", open_dir / "outside.txt"):
        r = run_python(_write_outside(target), limits)
        assert r.status == "failed" and not target.exists(), (target, r.stderr)
    victim = open_dir / "victim.txt"
    victim.write_text("keep me")
    victim.chmod(0o666)
    r = run_python(f"import os\nos.remove({str(victim)!r})\n", limits)
    assert r.status == "failed" and victim.read_text() == "keep me"
    r = run_python(f"import os\nos.rename({str(open_dir)!r}, {str(tmp_path / 'moved')!r})\n", limits)
    assert r.status == "failed" and open_dir.exists()


@needs_nobody
def test_writing_outside_without_the_hook_is_blocked_by_the_uid_switch(tmp_path):
    target = tmp_path / "outside.txt"           # root-owned directory, 0755
    r = run_python(_write_outside(target), ISOLATION_ONLY)
    assert r.status == "failed" and "Permission" in r.stderr and not target.exists()


@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.5)
    yield srv
    srv.close()


def _connect(port: int) -> str:
    return (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            f"s.sendall(b'exfiltrated')\nprint('connected')\n")


def _no_connection(srv: socket.socket) -> bool:
    try:
        conn, _ = srv.accept()
    except socket.timeout:
        return True
    conn.close()
    return False


def test_the_listener_does_see_an_unsandboxed_connection(listener):
    # the control: the same client code outside the sandbox does connect, so the tests below can fail
    with socket.create_connection(("127.0.0.1", listener.getsockname()[1]), timeout=2):
        pass
    assert not _no_connection(listener)


@pytest.mark.parametrize("limits", [pytest.param(FAST, id="full"), pytest.param(HOOK_ONLY, id="hook-only"),
                                    pytest.param(ISOLATION_ONLY, id="netns-only", marks=needs_netns)])
def test_network_is_blocked(listener, limits):
    r = run_python(_connect(listener.getsockname()[1]), limits)
    assert r.status == "failed" and "connected" not in r.stdout
    assert _no_connection(listener)


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("T2_TEST_SECRET", "hunter2-sandbox")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-hunter2-sandbox")
    src = (f"import os\nprint(sorted(os.environ.items()))\n"
           f"try:\n    print(open('/proc/{os.getpid()}/environ', 'rb').read())\nexcept OSError as e:\n"
           f"    print('cannot read:', type(e).__name__)\n")
    r = run_python(src, FAST)
    assert r.passed, r.stderr
    assert "hunter2" not in r.stdout and "hunter2" not in r.stderr
    env = dict(ast.literal_eval(r.stdout.splitlines()[0]))
    assert set(env) <= {"PATH", "LANG", "HOME", "TMPDIR", "LC_CTYPE"}, env


def test_the_sandbox_never_runs_code_in_this_process():
    marker = "T2_SANDBOX_IN_PROCESS_MARKER"
    run_python(f"import builtins\nbuiltins.{marker} = True\nimport sys\nsys.modules['{marker}'] = None", FAST)
    assert not hasattr(builtins, marker)
    assert marker not in sys.modules
