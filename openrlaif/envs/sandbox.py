"""Run untrusted Python (a policy's tool call) in a subprocess: no network, CPU-time, memory and file-size limits,
an empty temporary working directory, a scrubbed environment, killed (its whole process group) on timeout, and
(`isolate_fs`) a read-only view of the file system with the users' files hidden.

The limits are set by the child itself before it runs the code (a small runner script: `setrlimit`, then
`unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS)`, which leaves it a network namespace with no interface but a
downed loopback and a mount namespace of its own), so nothing unsafe runs between fork and exec in a threaded
parent. In its mount namespace the runner makes every mount read-only (`mount_setattr(AT_RECURSIVE,
MOUNT_ATTR_RDONLY)`, Linux 5.12+), mounts empty tmpfs over /home, /root, /tmp, /var/tmp, /mnt, /media, /srv and the
trainer's working directory (checkpoints, data, keys; never a folder holding the interpreter itself), and works in a
fresh tmpfs: the code reads the system's files, writes only its own, and sees none of the users'. `isolation` says
what it got: "netns+fs", "netns" (no mount isolation: an old kernel), or, where the kernel refuses user namespaces
(some containers), "python_guard": Python's socket constructors replaced, which stops honest code, not a
determined attacker. The tool environment counts the last two (`env/sandbox_without_netns`, `sandbox_without_fs`)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_RUNNER = r'''
import ctypes, os, resource, sys
cpu_s, memory_mb, fsize_mb, isolate_fs = (int(v) for v in sys.argv[1:5])
hide = sys.argv[5:]
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_mb << 20, fsize_mb << 20))


def read_only_world(libc, workdir):
    """Every mount read-only, the users' folders under empty tmpfs, a fresh tmpfs to work in; False if refused."""
    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]
    for name, line in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as handle:   # our own ids, so the files we create have an owner
            handle.write(line)
    if libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) != 0:       # MS_REC | MS_PRIVATE
        return False
    attr = MountAttr(1, 0, 0, 0)                                            # MOUNT_ATTR_RDONLY
    if libc.syscall(442, -100, b"/", 0x8000, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:   # mount_setattr,
        return False                                                        # AT_FDCWD, AT_RECURSIVE
    def under(path, folders):
        return any(path == f or path.startswith(f + os.sep) for f in folders)
    interpreter = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix) if os.path.isdir(p)}
    handles = {p: os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in interpreter}   # to mount them back
    hidden = []
    for folder in sorted({os.path.realpath(f) for f in hide}, key=len):
        if os.path.isdir(folder) and folder != "/" and not under(folder, hidden):
            if libc.mount(b"tmpfs", folder.encode(), b"tmpfs", 0, b"size=1m,mode=755") != 0:
                return False
            hidden.append(folder)
    for path, handle in handles.items():   # the interpreter's own folders, where a hidden one held them
        if under(path, hidden):
            os.makedirs(path, exist_ok=True)
            if libc.mount(f"/proc/self/fd/{handle}".encode(), path.encode(), None, 0x1000 | 0x4000, None) != 0:
                return False                                                # MS_BIND | MS_REC
    os.makedirs(workdir, exist_ok=True)   # inside the fresh /tmp when it was hidden
    if libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", 0, f"size={fsize_mb * 4}m,mode=700".encode()) != 0:
        return False
    for folder in hidden:   # the covers read-only too, once the folders above are made in them
        if libc.mount(None, folder.encode(), None, 32 | 1, None) != 0:     # MS_REMOUNT | MS_RDONLY
            return False
    os.chdir(workdir)
    return True


isolation = "netns"
try:
    libc = ctypes.CDLL(None, use_errno=True)
    workdir, uid, gid = os.getcwd(), os.getuid(), os.getgid()
    if isolate_fs and libc.unshare(0x10000000 | 0x40000000 | 0x00020000) == 0:   # + CLONE_NEWNS
        if read_only_world(libc, workdir):
            isolation = "netns+fs"
    elif libc.unshare(0x10000000 | 0x40000000) != 0:     # CLONE_NEWUSER | CLONE_NEWNET
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
del ctypes, os, resource, cpu_s, memory_mb, fsize_mb, isolate_fs, hide, read_only_world, uid, gid
exec(compile(code, "<tool>", "exec"), {"__name__": "__main__"})
'''


@dataclass
class SandboxResult:
    output: str            # stdout, then stderr (cut to max_output_chars)
    error: str | None      # None, or the kind: "timeout", "error" (an exception / non-zero exit), "memory", "cpu"
    isolation: str         # "netns+fs", "netns" or "python_guard" (the module docstring), "" if it never started


HIDDEN = ("/home", "/root", "/tmp", "/var/tmp", "/mnt", "/media", "/srv")


def run_python(code: str, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512, fsize_mb: int = 8,
               max_output_chars: int = 2000, isolate_fs: bool = True) -> SandboxResult:
    """Run `code` as a script in a fresh, limited interpreter; what it printed, and whether it failed."""
    with tempfile.TemporaryDirectory(prefix="openrlaif-tool-") as workdir:
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1",
               "LANG": "C.UTF-8"}
        hide = [*HIDDEN, os.getcwd(), os.path.expanduser("~")]
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _RUNNER, str(cpu_s), str(memory_mb), str(fsize_mb),
             str(int(isolate_fs)), *hide],
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
