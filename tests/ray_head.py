"""A real `ray start --head` node for the tests that need a cluster of their own (the suite's ``ray_local`` holds
Ray's default ports).

Ports are picked below the kernel's ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``) and above Ray's
worker ports (10002–19999): a port picked by bind-and-release inside the ephemeral range can be taken, before the
head binds it, as the source port of any outgoing connection on the machine — and the suite's other Ray runs open
many. A head that loses a port dies ~35 s later ("timed out during startup"; a CI run was lost to it), so ``start``
waits until the head answers, starts it again on fresh ports if it died (at most ``attempts`` times, each
failure kept in the message), and fails with the tail of the head's own output otherwise.
"""

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))
_LOW, _HIGH = 20000, 32767  # above Ray's worker ports, below the usual ephemeral range


@dataclass(frozen=True)
class Head:
    """Where a started head listens: ``address`` (host:gcs port, for ray.init), ``dashboard`` (http URL, for
    ``ray job``), ``metrics_port`` (the node's Prometheus endpoint) and its ``temp`` dir."""

    address: str
    dashboard: str
    metrics_port: int
    temp: Path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int, rng: random.Random) -> list[int]:
    """``n`` distinct ports that bind on 127.0.0.1 and 0.0.0.0 now, outside the ephemeral range."""
    high = min(_HIGH, _ephemeral_low() - 1)
    out: list[int] = []
    while len(out) < n:
        port = rng.randint(_LOW, high)
        if port in out:
            continue
        try:
            for host in ("127.0.0.1", "0.0.0.0"):
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        out.append(port)
    return out


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).read()
        return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to `ray start` alone stops its children in ~2 s (signalling the whole group takes ~33 s); then
    anything left in its process group is killed."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def head_node(env: dict[str, str], num_cpus: int, *, ready_s: float = 120, attempts: int = 3) -> Iterator[Head]:
    """A head node on 127.0.0.1 with every port its own, yielded once its dashboard and its metrics endpoint
    answer; stopped and its temp dir removed on exit. Fails the test (with the head's output) if no attempt
    comes up within ``ready_s`` seconds each."""
    rng = random.Random()  # unseeded on purpose: two suites on one machine must not pick the same ports
    failures: list[str] = []
    for _ in range(attempts):
        gcs, metrics, dashboard, listen, grpc, runtime_env = free_ports(6, rng)
        temp = Path("/tmp") / f"nrh-{os.getpid()}-{gcs}"  # short: Ray's socket paths have a length limit
        log = Path(f"{temp}.log")
        with log.open("w") as out:
            proc = subprocess.Popen(
                [RAY, "start", "--head", "--block", "--num-cpus", str(num_cpus), "--port", str(gcs),
                 "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                 "--temp-dir", str(temp), "--dashboard-agent-listen-port", str(listen),
                 "--dashboard-agent-grpc-port", str(grpc), "--runtime-env-agent-port", str(runtime_env),
                 "--metrics-export-port", str(metrics), "--disable-usage-stats"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        urls = (f"http://127.0.0.1:{dashboard}/api/version", f"http://127.0.0.1:{metrics}/metrics")
        deadline = time.time() + ready_s
        while proc.poll() is None and time.time() < deadline and not all(_answers(u) for u in urls):
            time.sleep(1)
        if proc.poll() is None and all(_answers(u) for u in urls):
            try:
                yield Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", metrics, temp)
            finally:
                _stop(proc)
                subprocess.run(["rm", "-rf", str(temp), str(log)], check=False)
            return
        state = f"exited {proc.returncode}" if proc.poll() is not None else f"not answering after {ready_s:.0f} s"
        _stop(proc)
        failures.append(f"head on ports {gcs}/{metrics}/{dashboard} {state}:\n{log.read_text()[-2000:]}")
        subprocess.run(["rm", "-rf", str(temp), str(log)], check=False)
    pytest.fail("\n\n".join(failures))
