"""A slow network in front of the test S3 server: a TCP proxy on 127.0.0.1 that passes requests
on at once and, on demand, holds each chunk of the server's responses for ``delay`` seconds
(a slow or stalled S3 as the client sees it: its writes land, its answers come late or never),
or cuts the next response short after ``cut_after`` bytes (a connection reset mid-body)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class SlowProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.delay = 0.0
        self.cut_after: int | None = None
        self._mutex = threading.Lock()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="slow-proxy", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                continue
            for src, dst, response in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, response), daemon=True).start()

    def _hold(self) -> None:
        """Wait out the delay (lowering it lets held chunks go)."""
        start = time.monotonic()
        while time.monotonic() - start < self.delay:
            time.sleep(0.01)

    def _take_cut(self) -> int | None:
        with self._mutex:
            cut, self.cut_after = self.cut_after, None
            return cut

    def _pump(self, src: socket.socket, dst: socket.socket, response: bool) -> None:
        left = self._take_cut() if response else None
        try:
            while data := src.recv(65536):
                if response:
                    if left is None:
                        left = self._take_cut()
                    if self.delay:
                        self._hold()
                    if left is not None:
                        data, left = data[:left], left - len(data)
                dst.sendall(data)
                if left is not None and left <= 0:
                    break  # the response is cut here: both connections close
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
