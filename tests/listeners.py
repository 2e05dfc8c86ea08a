"""The TCP sockets a process tree listens on, read from /proc (Linux): which addresses a local Ray cluster started
by this process (its GCS, raylet, agents and workers are all descendants) is reachable on."""
import os
import socket


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except OSError:
                pass
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def socket_inodes(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    return inodes


def address(hexaddr: str, v6: bool) -> tuple[str, int]:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if v6:
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, raw), int(port, 16)
    return socket.inet_ntoa(raw[::-1]), int(port, 16)


def listening(pid: int | None = None) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket held by `pid` (default: this process) or a descendant."""
    inodes = socket_inodes(descendants(pid or os.getpid()))
    out = []
    for name, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        with open(name) as handle:
            next(handle)
            for line in handle:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in inodes:   # 0A: LISTEN
                    out.append(address(parts[1], v6))
    return out
