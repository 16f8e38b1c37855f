"""Real multi-node Ray clusters on this machine, for tests: `ray start --block` per node, each in its own
session (setsid), on its own loopback address and free ports, with its own auth token.

Every process of a cluster (the `ray start` commands, GCS, raylets, agents, workers, actors, submitted
job drivers, and the driver subprocesses a test starts with `cluster.env`) carries the environment
variable FACEGEN_TEST_CLUSTER=<unique id>; stopping a node or the cluster kills exactly the processes
that carry it (and the node's process group), never anything else, and checks that none is left.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MARK = "FACEGEN_TEST_CLUSTER"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def marked_pids(mark: str) -> set[int]:
    """Processes whose environment holds MARK=mark (readable only for our own user's processes)."""
    needle = f"{MARK}={mark}".encode() + b"\0"
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle in handle.read() + b"\0":
                    found.add(int(entry))
        except OSError:
            continue
    return found - {os.getpid()}


def alive(pid: int) -> bool:
    """Running (a zombie, already dead and waiting to be reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Node:
    ip: str
    proc: subprocess.Popen
    mark: str  # node-level mark: NODE_MARK=<cluster id>/<ip>
    log: Path


class LocalRayCluster:
    """A head node plus worker nodes, all on this machine; use as a context manager."""

    def __init__(self, head_ip: str = "127.0.0.5", head_cpus: int = 0, system_config: dict | None = None):
        self.id = secrets.token_hex(6)
        self.root = Path(tempfile.mkdtemp(prefix=f"rc{self.id[:4]}-", dir="/tmp"))  # short: socket paths
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.head_ip, self.head_cpus = head_ip, head_cpus
        self.port, self.dashboard_port = free_port(head_ip), free_port("127.0.0.1")
        self.system_config = system_config or {}
        self.nodes: list[Node] = []
        # The whole cluster and its clients: token auth on, with this cluster's own token.
        # This interpreter's scripts first: `ray`, and the `facegen` a submitted job's entrypoint runs.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, MARK: self.id, "RAY_AUTH_MODE": "token", "PATH": path,
                    "RAY_AUTH_TOKEN_PATH": str(self.token_path), "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def __enter__(self) -> LocalRayCluster:
        try:
            self.start_head()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- nodes ---------------------------------------------------------------------------------
    def _start(self, ip: str, args: list[str], num_cpus: int) -> Node:
        mark = f"{self.id}/{ip}"
        log = self.root / f"node-{ip}.log"
        command = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--node-ip-address", ip,
                   "--num-cpus", str(num_cpus),
                   "--disable-usage-stats", "--temp-dir", str(self.root / f"ray-{ip}"),
                   "--dashboard-agent-listen-port", str(free_port(ip)), *args]
        with open(log, "wb") as handle:
            proc = subprocess.Popen(command, env={**self.env, "FACEGEN_TEST_NODE": mark}, stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(ip, proc, mark, log)
        self.nodes.append(node)
        return node

    def start_head(self) -> Node:
        args = ["--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port(self.head_ip))]
        if self.system_config:
            args += ["--system-config", json.dumps(self.system_config)]
        node = self._start(self.head_ip, args, self.head_cpus)
        self.wait_for_nodes(1, timeout_s=120)
        return node

    def add_workers(self, ips: list[str], num_cpus: int = 2) -> list[Node]:
        """Start worker nodes (in parallel) and wait until the head sees all of them."""
        expected = len(self.alive_nodes()) + len(ips)
        nodes = [self._start(ip, ["--address", self.address], num_cpus) for ip in ips]
        self.wait_for_nodes(expected, timeout_s=120, ips=ips)
        return nodes

    def kill_node(self, node: Node) -> None:
        """SIGKILL every process of one node (raylet, agents, workers, actors), as a lost machine."""
        pids = {p for p in marked_pids(self.id) if _env_has(p, f"FACEGEN_TEST_NODE={node.mark}")}
        with _suppress():
            os.killpg(node.proc.pid, signal.SIGKILL)
        for pid in pids:
            with _suppress():
                os.kill(pid, signal.SIGKILL)
        node.proc.wait(timeout=30)

    def stop(self) -> None:
        """Kill every node (workers first) and every process of this cluster; assert none is left."""
        for node in reversed(self.nodes):
            with _suppress():
                os.killpg(node.proc.pid, signal.SIGKILL)
        deadline = time.time() + 30
        while True:
            left = [p for p in marked_pids(self.id) if alive(p)]
            for pid in left:
                with _suppress():
                    os.kill(pid, signal.SIGKILL)
            if not left or time.time() > deadline:
                break
            time.sleep(0.2)
        for node in self.nodes:
            with _suppress():
                node.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
        assert not left, f"processes of test cluster {self.id} survived: {left}"

    def leftovers(self) -> list[int]:
        return [p for p in marked_pids(self.id) if alive(p)]

    # -- state ---------------------------------------------------------------------------------
    def api(self, path: str) -> dict:
        request = urllib.request.Request(self.dashboard_url + path,
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> list[str]:
        """IPs of the nodes the head's GCS considers alive."""
        nodes = self.api("/nodes?view=summary")["data"]["summary"]
        return [n["raylet"]["nodeManagerAddress"] for n in nodes if n["raylet"].get("state") == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout_s: float, ips: list[str] = ()) -> None:
        deadline = time.time() + timeout_s
        while True:
            for node in self.nodes:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"ray start on {node.ip} exited: {node.log.read_text()[-2000:]}")
            try:
                nodes = self.alive_nodes()
                if len(nodes) >= count and set(ips) <= set(nodes):
                    return
            except OSError:
                pass  # the dashboard is not up yet
            if time.time() > deadline:
                raise TimeoutError(f"{count} nodes not alive after {timeout_s}s")
            time.sleep(0.5)


def _env_has(pid: int, entry: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return entry.encode() + b"\0" in handle.read() + b"\0"
    except OSError:
        return False


class _suppress:
    """Ignore a process that is already gone."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb) -> bool:
        return kind is not None and issubclass(kind, (ProcessLookupError, PermissionError, OSError,
                                                      subprocess.TimeoutExpired))
