"""A real Ray cluster on loopback for the tests: a head started with `ray start --head` and more nodes with
`ray start --address`, each with its own CPUs, all under one temp dir of their own; token authentication on,
with a token of the cluster's own. Stopped by process id (the processes whose command line names that temp
dir, and the workers their raylets started), never `ray stop`, which would stop every Ray on the machine."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, cpus_per_node: list[int]):
        # short: Ray's unix socket paths live under it and must stay under ~107 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        self.port, self.client_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.client_address = f"ray://127.0.0.1:{self.client_port}"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_TMPDIR": self.temp_dir,
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        common = ["--node-ip-address", "127.0.0.1", "--object-store-memory", str(80 << 20),
                  "--disable-usage-stats"]
        try:
            self._ray("start", "--head", "--port", str(self.port), "--ray-client-server-port", str(self.client_port),
                      "--num-cpus", str(cpus_per_node[0]), "--include-dashboard=false", "--temp-dir", self.temp_dir,
                      *common)
            for cpus in cpus_per_node[1:]:
                self._ray("start", "--address", self.address, "--num-cpus", str(cpus), *common)
        except BaseException:
            self.stop()
            raise

    def _ray(self, *args: str) -> None:
        proc = subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args[:2])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")

    def processes(self) -> dict[int, tuple[int, str]]:
        """pid -> (parent pid, command line) of this machine's processes."""
        found = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                found[int(entry.name)] = (ppid, cmd)
        return found

    def own_pids(self, procs: dict[int, tuple[int, str]] | None = None) -> set[int]:
        """This cluster's processes: those naming its temp dir, and their descendants (the workers)."""
        procs = procs if procs is not None else self.processes()
        client_server = f"--port={self.client_port} "  # the one process that does not name the temp dir
        own = {pid for pid, (_, cmd) in procs.items()
               if self.temp_dir in cmd or ("ray.util.client.server" in cmd and client_server in cmd + " ")}
        grew = True
        while grew:
            more = {pid for pid, (ppid, _) in procs.items() if ppid in own} - own
            own |= more
            grew = bool(more)
        return own - {os.getpid()}

    def worker_pids(self, title: str = "CaptionWorker") -> list[int]:
        procs = self.processes()
        return [pid for pid in self.own_pids(procs) if procs[pid][1].startswith("ray::") and title in procs[pid][1]]

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            pids = self.own_pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while pids and time.monotonic() < deadline:
                pids = {p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)}
                time.sleep(0.1)
            if not pids:
                break


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
