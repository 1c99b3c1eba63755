"""A one-machine study's Ray listens on the loopback address only (study.search.running.ray_cluster): every TCP socket
that the driver and the Ray processes it started (GCS, raylet, agents, workers) listen on is bound to
127.0.0.1 or ::1, read from /proc/net/tcp{,6} by socket inode of each process of the driver's tree."""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import QUICKSTART, ROOT

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's /proc/net/tcp")
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += children.get(pid, [])
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _address(field: str, v6: bool) -> tuple[str, int]:
    ip_hex, port_hex = field.split(":")
    raw = bytes.fromhex(ip_hex)
    if v6:  # four host-order 32-bit words
        return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))), int(port_hex, 16)
    return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port_hex, 16)


def listening_sockets(root: int) -> list[tuple[str, str, int]]:
    """(process name, ip, port) of every listening TCP socket of `root` and its descendants."""
    owner = {inode: pid for pid in _descendants(root) for inode in _socket_inodes(pid)}
    found = []
    for table, v6 in (("tcp", False), ("tcp6", True)):
        try:
            with open(f"/proc/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[9]) in owner:  # 0A = LISTEN
                pid = owner[int(cols[9])]
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        name = f.read().strip()
                except OSError:
                    name = str(pid)
                found.append((name, *_address(cols[1], v6)))
    return found


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", SINGLE_NODE_ENV)}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


LOCAL_RAY = textwrap.dedent("""
    import os, sys
    from study.search.running.ray_cluster import start_ray
    start_ray(None, 1)
    import ray

    @ray.remote
    def pid():
        return os.getpid()

    ray.get([pid.remote() for _ in range(2)])  # a worker process runs (and listens)
    print("ready", flush=True)
    sys.stdin.readline()  # the test lists the sockets meanwhile
    ray.shutdown()
""")


@pytest.mark.slow
def test_a_local_study_ray_listens_on_loopback_only():
    proc = subprocess.Popen([sys.executable, "-c", LOCAL_RAY], cwd=ROOT, env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()[-3000:] if proc.poll() is not None else line
        sockets = listening_sockets(proc.pid)
        names = {name for name, _, _ in sockets}
        assert len(sockets) >= 3 and {"gcs_server", "raylet"} <= names, sockets  # the servers were found
        exposed = [s for s in sockets if not _loopback(s[1])]
        assert not exposed, f"listening beyond loopback: {exposed} (all: {sockets})"
    finally:
        if proc.poll() is None:
            proc.communicate("\n", timeout=120)


STUDY_COMMAND = textwrap.dedent("""
    import os, sys
    from study import cli
    rc = cli.main(sys.argv[1:])
    import ray
    print(rc, os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), ray.util.get_node_ip_address(), flush=True)
""")


def test_the_study_command_keeps_a_local_ray_on_loopback_and_leaves_a_cluster_alone(tmp_path):
    """`study run` sets Ray's single-node switch before anything imports ray (so the local Ray's node IP is
    127.0.0.1); with --address (joining a cluster) it sets nothing. Both commands are refused before Ray
    starts (--num-cpus 0, a dead address): what matters is what Ray was told."""
    runs = str(tmp_path / "runs")
    local = subprocess.run([sys.executable, "-c", STUDY_COMMAND, "run", str(QUICKSTART), "--runs-dir", runs,
                            "--num-cpus", "0"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert local.stdout.split() == ["2", "0", "127.0.0.1"], local.stdout + local.stderr[-2000:]
    joined = subprocess.run([sys.executable, "-c", STUDY_COMMAND, "run", str(QUICKSTART), "--runs-dir", runs,
                             "--address", "127.0.0.1:1"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert joined.stdout.split()[:2] == ["2", "None"], joined.stdout + joined.stderr[-2000:]
