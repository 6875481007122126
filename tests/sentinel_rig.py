"""A Redis primary, a replica and three Redis Sentinels on spare 127.0.0.1 ports, for the failover tests.

Real processes (Debian's redis-server and redis-sentinel): a failover that loses writes is made the way it
happens in production, a replica that missed the last writes being promoted: the replica is paused (SIGSTOP)
while the primary takes writes, the primary is killed, the replica resumes and the Sentinels promote it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

SERVICE = "optout"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SentinelRig:
    def __init__(self, workdir: Path, *, down_after_ms: int = 500) -> None:
        self.workdir = workdir
        self.ports = {"primary": free_port(), "replica": free_port()}
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._down_after_ms = down_after_ms
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def sentinels(self) -> str:
        """The value of REDIS_SENTINELS."""
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def _server(self, name: str, *extra: str) -> None:
        self._procs[name] = subprocess.Popen(
            ["redis-server", "--port", str(self.ports[name]), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--loglevel", "warning", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> SentinelRig:
        self._server("primary")
        self._wait(self.ports["primary"])
        self._server("replica", "--replicaof", "127.0.0.1", str(self.ports["primary"]))
        self._wait(self.ports["replica"])
        for i, port in enumerate(self.sentinel_ports):
            conf = self.workdir / f"sentinel-{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.ports['primary']} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self._down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 3000\nsentinel parallel-syncs {SERVICE} 1\n")
            self._procs[f"sentinel-{i}"] = subprocess.Popen(["redis-sentinel", str(conf)], stdout=subprocess.DEVNULL,
                                                            stderr=subprocess.DEVNULL)
        for port in self.sentinel_ports:
            self._wait(port)
        self.wait_synced()
        return self

    def _wait(self, port: int, within: float = 10.0) -> None:
        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, OSError):
                if client.ping():
                    client.close()
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis on port {port} did not answer")

    def wait_synced(self, within: float = 10.0) -> None:
        replica = redis.Redis(port=self.ports["replica"], decode_responses=True)
        deadline = time.monotonic() + within
        while replica.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica never synced with the primary")
            time.sleep(0.05)
        replica.close()

    def primary_port(self) -> int | None:
        """The primary the Sentinels name now."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError, OSError):
                client = redis.Redis(port=port, decode_responses=True, socket_timeout=0.5)
                addr = client.sentinel_get_master_addr_by_name(SERVICE)
                client.close()
                if addr:
                    return int(addr[1])
        return None

    def pause_replica(self) -> None:
        """The replica stops taking the primary's writes (they will be lost if it is promoted)."""
        os.kill(self._procs["replica"].pid, signal.SIGSTOP)

    def fail_over_losing_writes(self, within: float = 20.0) -> float:
        """Kill the primary, resume the paused replica, wait until the Sentinels promoted it. Returns how long
        the failover took."""
        self._procs["primary"].kill()
        self._procs["primary"].wait(timeout=10)
        os.kill(self._procs["replica"].pid, signal.SIGCONT)
        started = time.monotonic()
        while self.primary_port() != self.ports["replica"]:
            if time.monotonic() - started > within:
                raise RuntimeError("the Sentinels did not promote the replica")
            time.sleep(0.05)
        promoted = redis.Redis(port=self.ports["replica"], decode_responses=True)
        while promoted.info("replication").get("role") != "master":
            if time.monotonic() - started > within:
                raise RuntimeError("the promoted replica never took the primary role")
            time.sleep(0.05)
        promoted.close()
        return time.monotonic() - started

    def stop(self) -> None:
        for proc in self._procs.values():
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGCONT)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        self._procs.clear()
