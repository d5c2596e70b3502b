"""A real multi-node Ray cluster on this machine, for the opt-in multi-node tests and the
cluster/README.md recipe: every node is its own ``ray start --block`` process tree.

Other people's Ray sessions may run on the same machine, so this cluster never touches them:
it has its own temp dir and its own ports (GCS, dashboard, client server, each node's agent and
metrics ports), and it is stopped by signalling its own process groups and then any process whose
command line names its temp dir, never with ``ray stop`` (which stops every Ray of the user).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from builders import free_port

ALL = ""  # every interface: what a Ray node binds its ports on

RAY = str(Path(sys.executable).with_name("ray"))


def node_ip() -> str:
    import ray._private.services

    return ray._private.services.get_node_ip_address()


class LocalRayCluster:
    """A head and worker nodes as separate ``ray start`` processes.

    ``env``: variables every node's processes get (PYTHONPATH for this checkout, the S3 endpoint
    and credentials), since Ray workers inherit their raylet's environment. ``object_store_mb``
    keeps each node's shared memory small: several nodes share one machine.
    """

    def __init__(self, env: dict[str, str] | None = None, object_store_mb: int = 200) -> None:
        # Short: Ray puts Unix sockets under it, and their paths are limited to 107 bytes.
        self.temp_dir = Path(tempfile.gettempdir()) / f"hrmn-{uuid.uuid4().hex[:6]}"
        self.temp_dir.mkdir()
        # `ray start --head` turns token authentication on by default (Ray 2.5x+); this cluster lives
        # on one machine for tests, and drivers connect without a token, as to a local Ray.
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
        self.object_store = object_store_mb * 1024 * 1024
        self.port = free_port(ALL)
        self.address = f"{node_ip()}:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.workers = 0

    def _start(self, args: list[str], name: str, env: dict[str, str], attempts: int = 3,
               timeout_s: float = 240.0) -> None:
        """Start one node and wait until ``ray start`` says it is up (it then blocks).

        On a loaded machine a node can miss Ray's fixed 30 s for its raylet to register ("timed
        out during startup"); that attempt's processes are stopped and the node started again.
        """
        for attempt in range(1, attempts + 1):
            log = self.temp_dir / f"{name}-{attempt}.log"
            self.logs.append(log)
            with open(log, "wb") as out:
                # Own session = own process group: stop() signals the node's tree and nothing else.
                proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args],
                                        env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append(proc)
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                if b"will now block forever" in log.read_bytes():
                    return
                time.sleep(0.5)
            self._signal([proc], signal.SIGKILL)
        raise RuntimeError(f"Ray node {name} did not start in {attempts} attempts:\n{self.tail()}")

    @staticmethod
    def _signal(procs: list[subprocess.Popen], sig: int) -> None:
        for p in procs:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)

    def _node_ports(self) -> list[str]:
        return [f"--dashboard-agent-listen-port={free_port(ALL)}", f"--metrics-export-port={free_port(ALL)}",
                f"--runtime-env-agent-port={free_port(ALL)}", f"--object-store-memory={self.object_store}"]

    def start_head(self, num_cpus: float = 0, resources: dict[str, float] | None = None,
                   autoscaling_config: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> None:
        """The head: no CPUs by default, so no stage work can be scheduled there.

        ``autoscaling_config``: a fake_multinode autoscaler config (cluster/fake-multinode.yaml);
        its provider is pointed at this head's GCS port (the provider assumes 6379 otherwise, which
        may be another session's Ray). ``env``: variables for the head's processes only (the
        autoscaler's own settings)."""
        env = {**self.env, **(env or {})}
        args = ["--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
                f"--num-cpus={num_cpus:g}", f"--dashboard-port={free_port(ALL)}",
                f"--ray-client-server-port={free_port(ALL)}", "--dashboard-host=127.0.0.1", *self._node_ports()]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        if autoscaling_config is not None:
            config = json.loads(json.dumps(autoscaling_config))
            config["provider"]["gcs_address"] = self.address
            path = self.temp_dir / "autoscaling.yaml"
            path.write_text(yaml.safe_dump(config))
            args.append(f"--autoscaling-config={path}")
            # The fake provider refuses to run without it; the autoscaler loop every second.
            env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        self._start(args, "head", env)

    def add_worker(self, num_cpus: float, resources: dict[str, float] | None = None) -> None:
        args = [f"--address={self.address}", f"--num-cpus={num_cpus:g}", *self._node_ports()]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        self.workers += 1
        self._start(args, f"worker{self.workers}", self.env)

    def kill_node(self, index: int) -> list[int]:
        """SIGKILL every process of worker node ``index`` (1-based, in add order), as a reclaimed spot
        machine loses them: its ``ray start`` process group (raylet, agents) and the workers its
        raylet started, found by the raylet's socket name on their command lines. Returns the pids."""
        name = f"worker{index}-"
        (proc,) = [p for p, log in zip(self.procs, self.logs) if log.name.startswith(name) and p.poll() is None]
        pids = _kill_node_processes(lambda pid: os.getpgid(pid) == proc.pid)
        proc.wait(15)
        return pids

    def kill_launched_node(self, node_id: str) -> list[int]:
        """SIGKILL every process of a node the fake autoscaler launched: its provider starts the
        node's raylet inside the head's monitor process, with the node's id in the raylet's
        environment (``RAY_OVERRIDE_NODE_ID_FOR_TESTING``), so that is how its processes are found.
        The provider still lists the node: the autoscaler learns of the loss as a cloud's does, by
        the node's missing heartbeats. Returns the pids."""
        mark = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode()

        def of_node(pid: int) -> bool:
            return mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")

        pids = _kill_node_processes(of_node)
        if not pids:
            raise AssertionError(f"no process of node {node_id} found")
        return pids

    def tail(self, lines: int = 30) -> str:
        """The last lines of every node's log (for a failed start)."""
        out = []
        for log in self.logs:
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            out.append(f"--- {log.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        """SIGTERM to each node's process group, then SIGKILL to what is left of them, then to any
        process still naming this cluster's temp dir (workers that left the group)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            self._signal(self.procs, sig)
        for pid in self.stray_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stray_pids(self) -> list[int]:
        """This user's processes whose command line names this cluster's temp dir."""
        mark = str(self.temp_dir).encode()
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if d.stat().st_uid == os.getuid() and mark in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids


def _kill_node_processes(is_node: Any) -> list[int]:
    """SIGKILL the processes ``is_node(pid)`` names, and every process started for their raylet
    (found by the raylet's socket name on its command line: workers, agents). Returns the pids."""
    pids, sockets = set(), set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if is_node(int(d.name)):
                pids.add(int(d.name))
                sockets.update(a.split("=", 1)[1] for a in (d / "cmdline").read_bytes().decode(errors="replace")
                               .split("\0") if a.startswith("--raylet_socket_name="))
        except (OSError, ValueError):
            continue
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and sockets:
            try:
                if any(s.encode() in (d / "cmdline").read_bytes() for s in sockets):
                    pids.add(int(d.name))
            except OSError:
                continue
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(pids)
