"""Run untrusted Python (model-written code plus its tests) in a separate, confined process.

Contract:
- `run_python(source, limits)` never executes `source` in this process. It runs `python -I -B -c <guard>`
  in a fresh temporary working directory (deleted afterwards) with an empty environment except PATH, LANG,
  HOME/TMPDIR (= that directory); stdin is /dev/null; stdout/stderr go to files capped by RLIMIT_FSIZE.
  It returns a `SandboxResult`: `passed` (the program ran to its end and exited 0), `failed` (an exception,
  a non-zero exit, an early `exit()`, a resource limit hit) or `timeout` (wall clock or CPU time exceeded),
  with the tails of stdout and stderr.
- Confinement, in layers (each one alone stops the hostile cases the tests cover):
  1. namespaces, when `unshare` works here (root on Linux; probed once): a new network namespace (no
     interface is up, not even loopback: every connect fails) and a new PID namespace with its own /proc
     (nothing outside is visible; killing its first process kills every process the program started);
  2. the guard, run as root only long enough to: set resource limits (RLIMIT_AS memory, RLIMIT_CPU,
     RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE = 0 so no core files, RLIMIT_NPROC), switch to the unprivileged
     user `nobody` when started as root (so RLIMIT_NPROC applies and files of other users are out of
     reach) — only with an interpreter `nobody` can run, probed once —, then
  3. install an audit hook that refuses sockets, process creation (fork, exec, spawn, subprocess, system),
     signals to other processes, ctypes, and every file write/create/rename/delete/chmod outside the working
     directory; then it compiles and runs the program as `__main__`.
  Without root (or without unshare) layers 1–2 degrade to what the platform allows and layer 3 still holds.
  The audit hook is a second layer, not a boundary against a determined attacker (Python audit hooks can be
  bypassed from native code, which is why ctypes is refused); the namespaces and the uid switch are.
- The interpreter is this one (`sys.executable`) unless the uid switch needs another that `nobody` can read
  (here a venv under /root is not): then the first of `python3` on PATH, /usr/bin/python3 that works. Either
  way the program sees a standard library only in practice (`-I`: no user site, no PYTHONPATH, no cwd).
- The run counts as `passed` only when the guard reports, on an inherited pipe, that the program's top level
  finished: a program that calls `exit(0)` or `os._exit(0)` before its tests run has not passed. (A program
  written to forge that report could; the graders guard against mistakes and crude gaming, not against
  adversarial code aiming at the reward — the confinement above is what protects the machine.)
- `run_many(sources, limits, workers)` runs several programs concurrently (threads waiting on processes).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

Status = Literal["passed", "failed", "timeout"]
NOBODY = 65534
_TAIL = 2000


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run. Memory is address space (RLIMIT_AS), so it includes the interpreter."""

    timeout_s: float = 10.0            # wall clock, from start to kill
    cpu_s: int = 10                    # RLIMIT_CPU (seconds of CPU time)
    memory_mb: int = 1024              # RLIMIT_AS
    file_mb: int = 16                  # RLIMIT_FSIZE: largest file the program (or its output) may write
    open_files: int = 64               # RLIMIT_NOFILE
    processes: int = 64                # RLIMIT_NPROC (counts all processes of the sandbox user)
    isolate: bool = True               # use namespaces and the uid switch when the platform allows
    audit_hook: bool = True            # install the audit hook (switching it off is for tests of layer 1-2)


@dataclass(frozen=True)
class SandboxResult:
    status: Status
    returncode: int | None
    stdout: str                        # last characters of stdout
    stderr: str                        # last characters of stderr
    seconds: float
    workdir: str                       # the (deleted) working directory: identifies the run's processes

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The guard: argv = [workdir, limits..., done_fd, uid]; runs the program file of workdir as __main__.
_GUARD = r'''
import os, sys, resource
wd, mem, cpu, fsize, nofile, nproc, done_fd, uid, hook = sys.argv[1:10]
mem, cpu, fsize, nofile, nproc, done_fd, uid = map(int, (mem, cpu, fsize, nofile, nproc, done_fd, uid))
os.chdir(wd)
src = open("program.py", encoding="utf-8").read()
for res, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, nofile),
                 (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(res, (val, val))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
if uid >= 0 and os.getuid() == 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
code = compile(src, os.path.join(wd, "program.py"), "exec")
del src

def _install(root, _real=os.path.realpath, _join=os.path.join, _cwd=os.getcwd, _sep=os.sep):
    deny_prefix = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                   "os.forkpty", "os.system", "os.kill", "os.killpg", "signal.pthread_kill", "pty.", "winreg.")
    path_events = {"os.remove": 0, "os.rmdir": 0, "os.mkdir": 0, "os.rename": (0, 1), "os.symlink": 1,
                   "os.link": 1, "os.chmod": 0, "os.chown": 0, "os.truncate": 0, "os.utime": 0,
                   "shutil.rmtree": 0, "shutil.move": (0, 1), "os.chdir": -1, "os.chroot": -1, "os.setxattr": 0,
                   "os.removexattr": 0, "os.mkfifo": 0, "os.mknod": 0}
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(p):
        if isinstance(p, int):
            return True                    # an already open descriptor
        if isinstance(p, bytes):
            p = p.decode("utf-8", "replace")
        full = _real(_join(_cwd(), str(p)))
        return full == root or full.startswith(root + _sep) or full == "/dev/null"

    def hook(event, args):
        if event.startswith(deny_prefix):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if path is None:
                return
            w = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags and (flags & writing))
            if w and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
        elif event in path_events:
            idx = path_events[event]
            if idx == -1:
                raise PermissionError(f"sandbox: {event} is not allowed")
            for i in (idx if isinstance(idx, tuple) else (idx,)):
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} outside the working directory")
    sys.addaudithook(hook)

if hook == "1":
    _install(os.path.realpath(wd))
del _install
sys.argv = ["program.py"]
g = {"__name__": "__main__", "__file__": os.path.join(wd, "program.py"), "__builtins__": __builtins__}
try:
    exec(code, g)
except SystemExit as e:
    if e.code not in (None, 0):
        raise
    sys.stderr.write("sandbox: the program called exit() before its end\n")
    os._exit(3)
os.write(done_fd, b"done")
'''


@functools.lru_cache(maxsize=None)
def _unshare_prefix() -> tuple[str, ...]:
    """The namespace prefix that works here (probed once), or () when none does."""
    exe = shutil.which("unshare")
    if not exe or not sys.platform.startswith("linux"):
        return ()
    for prefix in ((exe, "--net", "--pid", "--fork", "--kill-child", "--mount-proc"), (exe, "--net")):
        try:
            r = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return prefix
    return ()


@functools.lru_cache(maxsize=None)
def _interpreter_for(uid: int) -> str | None:
    """An interpreter that user `uid` can run with its standard library (probed once), or None."""
    if os.getuid() != 0:
        return sys.executable
    seen: list[str] = []
    for cand in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3"):
        if not cand or cand in seen:
            continue
        seen.append(cand)
        try:
            r = subprocess.run([cand, "-I", "-B", "-c", "import json, collections, re, math, heapq"],
                               user=uid, group=uid, extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin"},
                               capture_output=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return cand
    return None


def isolation() -> dict[str, object]:
    """What confinement this machine gives (for logs and tests)."""
    uid_ok = os.getuid() == 0 and _interpreter_for(NOBODY) is not None
    return {"namespaces": list(_unshare_prefix()[1:]), "drops_to_nobody": uid_ok,
            "interpreter": _interpreter_for(NOBODY) if uid_ok else sys.executable}


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 4 * _TAIL))
            return fh.read().decode("utf-8", "replace")[-_TAIL:]
    except OSError:
        return ""


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def run_python(source: str, limits: Limits = Limits()) -> SandboxResult:
    """Run `source` as a confined Python program; see the module contract."""
    # 1. where: a fresh working directory (writable by the sandbox user) and a private one for the output
    work = Path(tempfile.mkdtemp(prefix="t2-sandbox-"))
    logs = Path(tempfile.mkdtemp(prefix="t2-sandbox-out-"))
    read_fd, write_fd = os.pipe()
    try:
        (work / "program.py").write_text(source, encoding="utf-8")
        # 2. who and how: namespaces + uid switch when possible
        drop = limits.isolate and os.getuid() == 0 and _interpreter_for(NOBODY) is not None
        python = _interpreter_for(NOBODY) if drop else sys.executable
        if drop:
            os.chown(work, NOBODY, NOBODY)
            os.chmod(work / "program.py", 0o644)
        prefix = _unshare_prefix() if limits.isolate else ()
        mb = 1 << 20
        argv = [*prefix, python, "-I", "-B", "-c", _GUARD, str(work), str(limits.memory_mb * mb),
                str(limits.cpu_s), str(limits.file_mb * mb), str(limits.open_files), str(limits.processes),
                str(write_fd), str(NOBODY if drop else -1), "1" if limits.audit_hook else "0"]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
        # 3. run with a wall-clock timeout; kill the whole process group (and namespace) on expiry
        start = time.monotonic()
        timed_out = False
        with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
            proc = subprocess.Popen(argv, cwd=str(work), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, pass_fds=(write_fd,), start_new_session=True)
            os.close(write_fd)
            write_fd = -1
            try:
                rc = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill(proc)
                rc = proc.wait()
            _kill(proc)          # stragglers left in the process group by a program that exited
        seconds = time.monotonic() - start
        # 4. classify
        os.set_blocking(read_fd, False)
        try:
            done = os.read(read_fd, 16) == b"done"
        except BlockingIOError:
            done = False
        cpu_killed = rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU) or (
            rc in (-signal.SIGKILL, 128 + signal.SIGKILL) and seconds >= limits.cpu_s)
        if timed_out or cpu_killed:
            status: Status = "timeout"
        elif rc == 0 and done:
            status = "passed"
        else:
            status = "failed"
        return SandboxResult(status, None if timed_out else rc, _tail(logs / "out"), _tail(logs / "err"),
                             seconds, str(work))
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


def run_many(sources: Sequence[str], limits: Limits = Limits(), workers: int | None = None) -> list[SandboxResult]:
    """`run_python` over several programs, `workers` at a time (default: the CPU count), results in order."""
    workers = max(1, min(len(sources) or 1, workers or os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda s: run_python(s, limits), sources))
