"""A TCP proxy for tests: clients reach the broker through it, and stopping it is the broker going
away (connections cut, new ones refused) while the broker keeps its data, as a restarted real broker
with persistent storage would. The embedded broker only stores in memory, so it cannot be restarted
without losing the topics; the proxy is how the tests take it away and bring it back."""

from __future__ import annotations

import socket
import threading


class TcpProxy:
    def __init__(self, listen_port: int, target_port: int, host: str = "127.0.0.1"):
        self.listen_port = listen_port
        self.target = (host, target_port)
        self.host = host
        self._server: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> "TcpProxy":
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((self.host, self.listen_port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def _accept(self, server: socket.socket) -> None:
        # A timeout rather than a blocking accept: closing a socket does not wake a thread blocked in
        # accept() on Linux, which would then let one more client in after stop().
        server.settimeout(0.1)
        while self._server is server:
            try:
                client, _ = server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self._server is not server:
                client.close()
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=2)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            with self._lock:
                self._sockets.discard(src)
                self._sockets.discard(dst)

    def stop(self) -> None:
        """Cut every connection and refuse new ones, as a broker that went down."""
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
