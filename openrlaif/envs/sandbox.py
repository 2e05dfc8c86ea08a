"""Run untrusted Python (a policy's tool call) in a subprocess: no network, CPU-time, memory and file-size limits,
an empty temporary working directory, a scrubbed environment, killed (its whole process group) on timeout.

The limits are set by the child itself before it runs the code (a small runner script: `setrlimit`, then
`unshare(CLONE_NEWUSER | CLONE_NEWNET)`, which leaves it a network namespace with no interface but a downed
loopback), so nothing unsafe runs between fork and exec in a threaded parent. Where the kernel refuses user
namespaces (some containers), the runner replaces Python's socket constructors instead and says so in
`SandboxResult.isolation`; that guard stops honest code, not a determined attacker, and is counted by the tool
environment (`env/sandbox_without_netns`)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_RUNNER = r'''
import ctypes, resource, sys
cpu_s, memory_mb, fsize_mb = (int(v) for v in sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_mb << 20, fsize_mb << 20))
isolation = "netns"
try:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000 | 0x40000000) != 0:     # CLONE_NEWUSER | CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "unshare")
except (OSError, AttributeError):
    import socket
    def _refused(*args, **kwargs):
        raise PermissionError("network access is disabled in this sandbox")
    socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = _refused
    isolation = "python_guard"
sys.stderr.write("\x00isolation=" + isolation + "\x00\n")
sys.stderr.flush()
code = sys.stdin.read()
del ctypes, resource, cpu_s, memory_mb, fsize_mb
exec(compile(code, "<tool>", "exec"), {"__name__": "__main__"})
'''


@dataclass
class SandboxResult:
    output: str            # stdout, then stderr (cut to max_output_chars)
    error: str | None      # None, or the kind: "timeout", "error" (an exception / non-zero exit), "memory", "cpu"
    isolation: str         # "netns" or "python_guard" (see the module docstring), "" if it never started


def run_python(code: str, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512, fsize_mb: int = 8,
               max_output_chars: int = 2000) -> SandboxResult:
    """Run `code` as a script in a fresh, limited interpreter; what it printed, and whether it failed."""
    with tempfile.TemporaryDirectory(prefix="openrlaif-tool-") as workdir:
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1",
               "LANG": "C.UTF-8"}
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _RUNNER, str(cpu_s), str(memory_mb), str(fsize_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=env,
            start_new_session=True, text=True)
        try:
            out, err = process.communicate(code, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)     # the code's own children too
            out, err = process.communicate()
            return SandboxResult(f"timed out after {timeout_s:g} s", "timeout", _isolation(err))
    isolation = _isolation(err)
    err = err.split("\x00\n", 1)[-1] if isolation else err
    output = (out + err)[-max_output_chars:]
    if process.returncode == 0:
        return SandboxResult(output, None, isolation)
    if process.returncode == -signal.SIGXCPU or process.returncode == -signal.SIGKILL and not err:
        return SandboxResult(f"CPU time limit ({cpu_s} s) exceeded", "cpu", isolation)
    if "MemoryError" in err:
        return SandboxResult(f"memory limit ({memory_mb} MiB) exceeded", "memory", isolation)
    last = err.strip().splitlines()[-1] if err.strip() else f"exit code {process.returncode}"
    return SandboxResult((out[-max_output_chars // 2:] + last)[-max_output_chars:], "error", isolation)


def _isolation(stderr: str) -> str:
    marker = "\x00isolation="
    if marker not in stderr:
        return ""
    return stderr.split(marker, 1)[1].split("\x00", 1)[0]
