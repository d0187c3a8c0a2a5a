"""The BGP fleet lab's client side (fastlb.fleet.lab): clients that loop through a whole test, a
connection held through one chosen instance, the router's nexthops watched while something runs."""

from __future__ import annotations

import socket
import threading
import time

from fastlb.fleet.lab import PORT, VIP, Lab

from .netns import socket_in


class ClientLoop:
    """New connections from the client namespace, round after round (40 source addresses each),
    until stop() or `rounds` / `seconds` run out: every record kept, failures counted."""

    def __init__(self, lab: Lab, rounds: int = 200, seconds: float = 60.0, sources: int = 40) -> None:
        self.lab, self.rounds, self.seconds, self.sources = lab, rounds, seconds, sources
        self.records: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        end = time.monotonic() + self.seconds
        for _ in range(self.rounds):
            if self._stop.is_set() or time.monotonic() > end:
                return
            self.records.extend(self.lab.probe("vip", self.lab.sources()[: self.sources], 1))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.seconds + 30)

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.records if "error" in r]


def hold_through(lab: Lab, k: int, tries: int = 300) -> socket.socket:
    """An established connection (client ns -> VIP) that the router sent to balancer k, greeting
    read: new source addresses until one hashes there."""
    for i in range(tries):
        s = socket_in(lab.ns("c"), socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5)
        s.bind((lab.sources()[i % len(lab.sources())], 0))
        s.connect((VIP, PORT))
        greeting = s.makefile("rb").readline()
        if greeting.split()[1:] == [f"10.77.{10 + k}.2".encode()]:
            return s
        s.close()
    raise AssertionError(f"no connection reached balancer {k} in {tries} tries")


def echo(s: socket.socket, payload: bytes) -> bytes:
    """Send payload on a held connection, return what the backend echoed back."""
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def accepts_locally(lab: Lab, k: int) -> bool:
    """Does balancer k's listener still accept (a connection to the VIP from inside its namespace)?"""
    s = socket_in(lab.ns(f"lb{k}"), socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect((VIP, PORT))
        return bool(s.recv(100))
    except OSError:
        return False
    finally:
        s.close()


class NexthopWatch:
    """Samples the router's nexthops for the VIP every 20 ms in the background: (time, set) pairs."""

    def __init__(self, lab: Lab, seconds: float = 60.0) -> None:
        self.lab, self.seconds = lab, seconds
        self.samples: list[tuple[float, set[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> NexthopWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        end = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < end:
            self.samples.append((time.monotonic(), self.lab.nexthops()))
            time.sleep(0.02)
