"""UDP peers for the end-to-end tests: a UDP server process (udp_server.py), UDP client sockets and
a pipelined byte-exact echo check (echo_every_size).

DNS servers (dnsmasq) come from support.dns."""

from __future__ import annotations

import random
import select
import selectors
import socket
import struct
from collections import deque
from pathlib import Path

from .backends import ServerProcess
from .helpers import Deadline
from .udp_server import MODES


def udp_server(name: str, mode: str, **params) -> dict:
    """One UDP server's spec: udp_server("a", "echo"), udp_server("b", "tag", host="::1")."""
    if mode not in MODES:
        raise ValueError(f"unknown UDP server mode {mode!r}")
    return {"name": name, "mode": mode, **params}


class UdpServers(ServerProcess):
    """The UDP server process seen from the test: ports and per-server datagram counts."""

    script = str(Path(__file__).with_name("udp_server.py"))
    what = "UDP server process"

    def address(self, name: str) -> str:
        host = next(s.get("host", "127.0.0.1") for s in self.servers if s["name"] == name)
        return f"[{host}]:{self.ports[name]}" if ":" in host else f"{host}:{self.ports[name]}"

    def received(self) -> dict[str, int]:
        return self.stats()["received"]

    def burst(self, name: str, n: int) -> None:
        """Server `name` sends n copies of its last datagram back to its last sender, at once."""
        assert self._call(f"burst {name} {n}") == {"sent": n}


def udp_client(addr: tuple[str, int], timeout: float = 5.0, rcvbuf: int = 0) -> socket.socket:
    """A UDP socket connected to addr (so only its replies are received), with a timeout."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(addr)
    return s


# --- pipelined byte-exact echoes -------------------------------------------------------------------

MAX_UDP4 = 65507  # the largest UDP payload over IPv4: 65,535 - 20 (IP header) - 8 (UDP header)
_SEQ = struct.Struct("<II")  # a payload starts with its sequence number and its size
_FILL = random.Random(13).randbytes(2 * 65536)


def udp_payload(seq: int, size: int) -> bytes:
    """Datagram `seq` of `size` bytes: seq and size (little-endian u32 each, cut short below 8 bytes:
    a 1-byte payload is seq's low byte), then bytes of a fixed random block at an offset set by seq."""
    off = (seq * 7919) % 65536
    return (_SEQ.pack(seq, size) + _FILL[off : off + max(0, size - _SEQ.size)])[:size]


def udp_kernel_drops() -> dict[str, int]:
    """This network namespace's UDP receive drops so far (/proc/net/snmp, snmp6): a datagram that met
    a full socket buffer is counted there and nowhere else."""
    out: dict[str, int] = {}
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    out.update({f"Udp{k}": int(v) for k, v in zip(rows[0][1:], rows[1][1:], strict=True) if "Errors" in k})
    with open("/proc/net/snmp6") as f:
        for line in f:
            k, v = line.split()
            if k.startswith("Udp6") and "Errors" in k:
                out[k] = int(v)
    return out


def echo_every_size(
    addr: tuple[str, int],
    sizes: list[int],
    *,
    flows: int = 4,
    window: int = 8,
    window_bytes: int | None = None,
    timeout: float = 120.0,
    stall: float = 10.0,
    rcvbuf: int = 4 << 20,
) -> int:
    """Send one datagram of each of `sizes` to addr (an echo behind it) and check every reply byte
    for byte; returns the datagrams echoed (len(sizes)).

    The sizes are shuffled (fixed seed) and dealt round-robin to `flows` connected client sockets
    (SO_RCVBUF `rcvbuf`), datagram i carrying udp_payload(i, size).  Each flow keeps at most
    `window` datagrams and at most `window_bytes` payload bytes outstanding (always at least one).
    The byte bound defaults to 3/4 of net.core.rmem_default: with fastlb in between, all of a flow's
    outstanding replies may sit at once in the balancer's backend socket of that flow, which keeps
    the kernel's default receive buffer (208 KiB on most hosts), and a full one drops a datagram
    silently, counted only in the kernel's RcvbufErrors (a datagram takes up to about twice its size
    there: a small one is rounded up to a power of two; `window` 8 keeps those under the bound too).

    Nothing is ever re-sent: a lost, duplicated, reordered, misrouted or altered datagram fails
    (AssertionError naming flow, sequence number and size, with the kernel's UDP drop counters) at
    the flow's next reply, or once no reply at all came for `stall` seconds, or at `timeout`."""
    deadline = Deadline(timeout)
    if window_bytes is None:
        window_bytes = int(Path("/proc/sys/net/core/rmem_default").read_text()) * 3 // 4
    order = list(sizes)
    random.Random(13).shuffle(order)
    todo = [deque((i, n) for i, n in enumerate(order) if i % flows == f) for f in range(flows)]
    flying: list[deque[tuple[int, int]]] = [deque() for _ in range(flows)]
    in_flight = [0] * flows  # outstanding payload bytes per flow
    socks = [udp_client(addr, timeout=0.0, rcvbuf=rcvbuf) for _ in range(flows)]
    sel = selectors.DefaultSelector()
    drops_before = udp_kernel_drops()
    done = 0
    last_reply = Deadline(stall)

    def state() -> str:
        drops = {k: v - drops_before[k] for k, v in udp_kernel_drops().items() if v != drops_before[k]}
        waiting = {f: list(q)[:3] for f, q in enumerate(flying) if q}
        return (
            f"{done} of {len(order)} echoed; waiting (flow: [(seq, size), ...]) {waiting}; "
            f"kernel UDP drops since the start {drops or 'none'}"
        )

    def send_more(f: int) -> None:
        s = socks[f]
        while todo[f] and len(flying[f]) < window:
            seq, n = todo[f][0]
            if flying[f] and in_flight[f] + n > window_bytes:
                return
            data = udp_payload(seq, n)
            while True:
                try:
                    s.send(data)
                    break
                except BlockingIOError:  # the send buffer is full: wait for room, not forever
                    if not select.select([], [s], [], deadline.left())[1]:
                        raise AssertionError(f"flow {f}: no room to send #{seq} ({n} B); {state()}") from None
            todo[f].popleft()
            flying[f].append((seq, n))
            in_flight[f] += n

    try:
        for f, s in enumerate(socks):
            sel.register(s, selectors.EVENT_READ, f)
            send_more(f)
        while done < len(order):
            if deadline.expired():
                raise AssertionError(f"echoes incomplete after {timeout:g}s: {state()}")
            if last_reply.expired():
                raise AssertionError(f"no reply for {stall:g}s: {state()}")
            for key, _ in sel.select(min(0.5, deadline.left(), last_reply.left())):
                f = key.data
                while True:
                    try:
                        got = key.fileobj.recv(65536)
                    except BlockingIOError:
                        break
                    if not flying[f]:
                        raise AssertionError(f"flow {f}: a reply of {len(got)} B nobody waits for; {state()}")
                    seq, n = flying[f].popleft()
                    if got != udp_payload(seq, n):
                        raise AssertionError(
                            f"flow {f}: expected #{seq} ({n} B), got {_describe(got)}; {state()}"
                        )
                    in_flight[f] -= n
                    done += 1
                    last_reply = Deadline(stall)
                send_more(f)
    finally:
        sel.close()
        for s in socks:
            s.close()
    return done


def _describe(got: bytes) -> str:
    """What a wrong reply is: another intact datagram of the run (lost, reordered, duplicated or
    misrouted) or an altered one."""
    if len(got) >= _SEQ.size:
        seq, n = _SEQ.unpack(got[: _SEQ.size])
        if n == len(got) and got == udp_payload(seq, n):
            return f"an intact #{seq} ({n} B)"
    return f"{len(got)} B matching no datagram of the run (first bytes {got[:16].hex()})"
