"""The small-message path of the data plane (recv + send through the worker's scratch buffer) and its
hand-over to splice: order kept across sizes around the 16 KiB switch, a slow reader forcing the
rest of a message into the pipe, and data arriving together with the FIN."""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time

from support.backends import server
from support.helpers import Bg, drain, recv_exact, wait_until


class ThreadServer:
    """A one-purpose backend on 127.0.0.1 served by a thread per connection (few connections)."""

    def __init__(self, handler, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf:  # inherited by accepted sockets; set before listen() so the window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.results: list = []
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(30)
                self.results.append(self.handler(conn))
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def close(self) -> None:
        self.sock.close()


def test_messages_around_the_scratch_size_keep_their_order(backends, fastlb):
    b = backends(server("e", "echo"))
    lb = fastlb([("e", b.address("e"), None)], workers=1)
    rnd = random.Random(7)
    with lb.connect(timeout=20) as s:
        # one at a time, each echoed before the next: sizes on both sides of 16 KiB
        for size in (1, 10, 16383, 16384, 16385, 5, 70000, 3, 200000, 7, 1):
            msg = rnd.randbytes(size)
            s.sendall(msg)
            assert recv_exact(s, size) == msg, f"message of {size} bytes came back different"
    with lb.connect(timeout=20) as s:
        # then 3,000 small messages written back to back while the echo streams back
        msgs = [rnd.randbytes(rnd.randint(1, 3000)) for _ in range(3000)]
        want = b"".join(msgs)
        got = hashlib.sha256()
        reader = Bg(drain, s, got, len(want))
        for m in msgs:
            s.sendall(m)
        assert reader.result(30) == (len(want), "limit")
        assert got.hexdigest() == hashlib.sha256(want).hexdigest()


def test_stalled_reader_gets_every_byte_in_order(fastlb):
    # small messages, paced so that fastlb reads them one by one (no 16 KiB read switches the
    # direction to splice yet), towards a backend with a tiny window that reads nothing until the
    # client is done: once fastlb's socket buffer towards it is full, send() comes up short, the
    # rest of the message waits in the pipe and the splice path takes over.  Every byte must still
    # arrive, in order.
    go = threading.Event()

    def stalled_sink(conn: socket.socket) -> tuple[int, str]:
        assert go.wait(60)
        h = hashlib.sha256()
        n = 0
        while chunk := conn.recv(65536):
            h.update(chunk)
            n += len(chunk)
        return n, h.hexdigest()

    srv = ThreadServer(stalled_sink, rcvbuf=4096)
    try:
        lb = fastlb([("s", f"127.0.0.1:{srv.port}", None)], workers=1)
        rnd = random.Random(3)
        msgs = [rnd.randbytes(rnd.randint(200, 1500)) for _ in range(6000)]  # ~5 MiB
        want = b"".join(msgs)
        sent = [0]
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # little room on the client side
        s.settimeout(60)
        s.connect(lb.addr)

        def send_all() -> None:
            for m in msgs:
                s.sendall(m)
                sent[0] += len(m)
                time.sleep(0.00002)
            s.shutdown(socket.SHUT_WR)

        sender = Bg(send_all)
        # the chain is full - so fastlb's send() towards the backend came up short - once the
        # client has been stuck for a while with most of its data not yet sent
        last = [-1, time.monotonic()]

        def stuck() -> bool:
            now = time.monotonic()
            if sent[0] != last[0]:
                last[:] = [sent[0], now]
            return sent[0] < len(want) and now - last[1] > 0.3

        wait_until(stuck, 30, lambda: f"the client to block ({sent[0]} of {len(want)} bytes sent)")
        go.set()
        sender.result(60)
        assert s.recv(1) == b""  # the backend closes after EOF; fastlb forwards its FIN
        s.close()
        wait_until(lambda: srv.results or srv.errors, 30, "the backend to finish reading")
        assert not srv.errors, srv.errors
        assert srv.results == [(len(want), hashlib.sha256(want).hexdigest())]
    finally:
        go.set()
        srv.close()


def test_data_and_fin_together_both_ways(fastlb):
    # each side writes a few bytes and closes at once: data and FIN arrive together, so the
    # short recv() must not be taken for "drained" before the EOF is seen
    def answer_and_close(conn: socket.socket) -> bytes:
        got = b""
        while chunk := conn.recv(65536):
            got += chunk
        conn.sendall(b"pong:" + got)
        return got

    srv = ThreadServer(answer_and_close)
    try:
        lb = fastlb([("p", f"127.0.0.1:{srv.port}", None)], workers=2)
        for i in range(200):
            msg = b"ping %d" % i
            with lb.connect(timeout=10) as s:
                s.sendall(msg)
                s.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
            assert reply == b"pong:" + msg, f"connection {i}: {reply!r}"
        wait_until(
            lambda: len(srv.results) + len(srv.errors) == 200, 10, "every backend connection to finish"
        )
        assert not srv.errors, srv.errors[:3]
        assert sorted(srv.results) == sorted(b"ping %d" % i for i in range(200))
    finally:
        srv.close()
