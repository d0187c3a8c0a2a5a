"""A fleet lab in network namespaces: clients behind a router whose ECMP route spreads flows over
several fastlb instances that share one virtual address, with real backends behind them.

    client ns (many source addresses) ── router ns ──┬── lb1 ns: fastlb, VIP on lo ──┐
                                        ECMP to VIP  ├── lb2 ns: fastlb, VIP on lo ──┼── (via the router)
                                                     └── lb3 ns: fastlb, VIP on lo ──┘      │
                                                                         backend ns: servers

Every address below lives only inside the namespaces this module creates (and deletes).  The router
hashes on the L4 5-tuple (`fib_multipath_hash_policy = 1`), so one client address's connections
from different ports reach different instances; with the same config (Maglev on source_ip) every
instance sends that address to the same backend.  Used by scripts/fleet-demo and
tests/test_fleet_ecmp.py.  Needs root and iproute2.

    python -m fastlb.fleet.lab demo             build, run, print the agreement figures, tear down
    python -m fastlb.fleet.lab backend ...      (inside the backend ns) the backend servers
    python -m fastlb.fleet.lab probe ...        (inside the client ns) connections, one JSON line each
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

VIP = "10.77.200.1"
PORT = 8080
ADMIN_PORT = 9091
BACKEND_HOST = "10.77.50.2"
CLIENT_NET = "10.77.100"  # client source addresses CLIENT_NET.1 ...
TOKEN = "fleet-lab-token-0123456789abcdef"


def _run(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def lb_address(k: int) -> str:
    """Balancer k's own address (1-based) on its link to the router."""
    return f"10.77.{10 + k}.2"


@dataclass
class Lab:
    """The namespaces, processes and files of one lab; `close()` removes all of them."""

    prefix: str
    n_lbs: int = 3
    n_sources: int = 250
    backends: tuple[str, ...] = ("a", "b", "c", "d", "e")
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="flb-fleet-")))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)

    def ns(self, name: str) -> str:
        return f"{self.prefix}{name}"

    # --- topology ------------------------------------------------------------------------------

    def build(self) -> Lab:
        names = ["c", "r", "be"] + [f"lb{k}" for k in range(1, self.n_lbs + 1)]
        for n in names:
            _run("ip", "netns", "add", self.ns(n))
            self.created.append(self.ns(n))
            _run("ip", "link", "set", "lo", "up", ns=self.ns(n))
        r = self.ns("r")
        self._link("c", "10.77.0.2/24", "r", "10.77.0.1/24")
        self._link("be", f"{BACKEND_HOST}/24", "r", "10.77.50.1/24")
        for k in range(1, self.n_lbs + 1):
            self._link(f"lb{k}", f"{lb_address(k)}/24", "r", f"10.77.{10 + k}.1/24")
            lb = self.ns(f"lb{k}")
            _run("ip", "addr", "add", f"{VIP}/32", "dev", "lo", ns=lb)
            _run("ip", "route", "add", "default", "via", f"10.77.{10 + k}.1", ns=lb)
        for i in range(1, self.n_sources + 1):
            _run("ip", "addr", "add", f"{CLIENT_NET}.{i}/32", "dev", "veth-c", ns=self.ns("c"))
        _run("ip", "route", "add", "default", "via", "10.77.0.1", ns=self.ns("c"))
        _run("ip", "route", "add", "default", "via", "10.77.50.1", ns=self.ns("be"))
        _run("ip", "route", "add", f"{CLIENT_NET}.0/24", "via", "10.77.0.2", ns=r)
        _run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=r)
        _run("sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1", ns=r)
        self.set_nexthops(list(range(1, self.n_lbs + 1)))
        return self

    def _link(self, a: str, a_addr: str, b: str, b_addr: str) -> None:
        """A veth pair between namespaces a and b, named veth-<a> on a's side."""
        tmp_a, tmp_b = f"{self.prefix}{a}x"[-15:], f"{self.prefix}{a}y"[-15:]
        _run("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        _run("ip", "link", "set", tmp_a, "netns", self.ns(a))
        _run("ip", "link", "set", tmp_b, "netns", self.ns(b))
        _run("ip", "link", "set", tmp_a, "name", f"veth-{a}", ns=self.ns(a))
        _run("ip", "link", "set", tmp_b, "name", f"to-{a}", ns=self.ns(b))
        _run("ip", "addr", "add", a_addr, "dev", f"veth-{a}", ns=self.ns(a))
        _run("ip", "addr", "add", b_addr, "dev", f"to-{a}", ns=self.ns(b))
        _run("ip", "link", "set", f"veth-{a}", "up", ns=self.ns(a))
        _run("ip", "link", "set", f"to-{a}", "up", ns=self.ns(b))

    def set_nexthops(self, lbs: list[int]) -> None:
        """The router's route to the VIP: ECMP over these balancers (an instance leaves the fleet)."""
        hops: list[str] = []
        for k in lbs:
            hops += ["nexthop", "via", f"10.77.{10 + k}.2"]
        _run("ip", "route", "replace", f"{VIP}/32", *hops, ns=self.ns("r"))

    # --- processes -----------------------------------------------------------------------------

    def config(self, k: int) -> str:
        """The config every instance runs (only the control socket path differs, a local file)."""
        entries = ", ".join(
            f'{{ name = "{b}", address = "{BACKEND_HOST}:{9000 + i}" }}' for i, b in enumerate(self.backends)
        )
        return (
            f'[global]\nworkers = 1\ncontrol_socket = "{self.workdir}/lb{k}.sock"\nshutdown_timeout = "2s"\n'
            f'admin = "{lb_address(k)}:{ADMIN_PORT}"\nadmin_token_file = "{self.workdir}/token"\n\n'
            f'[listeners.web]\nbind = "0.0.0.0:{PORT}"\npool = "web"\n\n'
            f'[pools.web]\nalgorithm = "maglev"\nhash_key = "source_ip"\nbackends = [{entries}]\n'
        )

    def start(self) -> Lab:
        token = self.workdir / "token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)  # the admin API refuses a token file others can read
        self.procs["be"] = self._popen(
            "be", "backends", [sys.executable, "-m", "fastlb.fleet.lab", "backend", *self.backends]
        )
        for k in range(1, self.n_lbs + 1):
            cfg = self.workdir / f"lb{k}.toml"
            cfg.write_text(self.config(k))
            self.procs[f"lb{k}"] = self._popen(
                f"lb{k}", f"lb{k}", [sys.executable, "-m", "fastlb", "serve", "-c", str(cfg)]
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(self.admin_ok(k) for k in range(1, self.n_lbs + 1)):
                return self
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited: {self.log(name)[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("the fleet did not come up in 30 s")

    def _popen(self, ns: str, log: str, argv: list[str]) -> subprocess.Popen:
        out = open(self.workdir / f"{log}.log", "ab")  # noqa: SIM115 - the child holds it
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns(ns), *argv],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def log(self, name: str) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def admin_ok(self, k: int) -> bool:
        r = self.fastlb("--admin", f"http://{lb_address(k)}:{ADMIN_PORT}", "status", check=False)
        return r.returncode == 0

    def fastlb(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`fastlb ARGS` from the client namespace (it reaches every instance's admin API)."""
        return _run(
            sys.executable,
            "-m",
            "fastlb",
            "--token-file",
            str(self.workdir / "token"),
            *args,
            ns=self.ns("c"),
            check=check,
        )

    def hosts_file(self, lbs: list[int] | None = None) -> Path:
        path = self.workdir / "hosts.txt"
        ks = lbs or list(range(1, self.n_lbs + 1))
        path.write_text("".join(f"http://{lb_address(k)}:{ADMIN_PORT}\n" for k in ks))
        return path

    def stop_lb(self, k: int) -> None:
        p = self.procs.pop(f"lb{k}", None)
        if p is not None:
            p.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(15)

    def probe(self, target: str, sources: list[str], per_source: int) -> list[dict]:
        """per_source connections from each source address to target (ip or "vip"): one record each."""
        r = _run(
            sys.executable,
            "-m",
            "fastlb.fleet.lab",
            "probe",
            target,
            str(per_source),
            *sources,
            ns=self.ns("c"),
        )
        return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]

    def sources(self) -> list[str]:
        return [f"{CLIENT_NET}.{i}" for i in range(1, self.n_sources + 1)]

    def close(self) -> None:
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGKILL)
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        self.procs.clear()
        # the fastlb workers are the serve processes' children in the same namespaces: kill them all
        for name in self.created:
            pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for name in reversed(self.created):
            _run("ip", "netns", "delete", name, check=False)
        self.created.clear()


# --- the processes that run inside the namespaces ------------------------------------------------


def serve_backends(names: list[str]) -> None:
    """Backend i listens on BACKEND_HOST:9000+i and greets each connection with "NAME PEER\\n" (PEER:
    the address fastlb connected from, i.e. which instance carried the flow), then closes."""
    sel = selectors.DefaultSelector()
    for i, name in enumerate(names):
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((BACKEND_HOST, 9000 + i))
        ls.listen(1024)
        sel.register(ls, selectors.EVENT_READ, name)
    while True:
        for key, _ in sel.select():
            conn, peer = key.fileobj.accept()
            with contextlib.suppress(OSError):
                conn.sendall(f"{key.data} {peer[0]}\n".encode())
            conn.close()


def run_probe(target: str, per_source: int, sources: list[str]) -> None:
    """Connect per_source times from each source; print {"src", "sport", "backend", "via", "lb"}."""
    host = VIP if target == "vip" else target
    lock = threading.Lock()

    def one(src: str) -> None:
        for _ in range(per_source):
            rec: dict = {"src": src}
            try:
                with socket.create_connection((host, PORT), timeout=5, source_address=(src, 0)) as s:
                    rec["sport"] = s.getsockname()[1]
                    data = b""
                    while not data.endswith(b"\n") and len(data) < 200:
                        chunk = s.recv(200)
                        if not chunk:
                            break
                        data += chunk
                name, _, via = data.decode(errors="replace").strip().partition(" ")
                rec.update(backend=name, via=via, lb=int(via.split(".")[2]) - 10 if via else None)
            except OSError as exc:
                rec["error"] = str(exc)
            with lock:
                print(json.dumps(rec), flush=True)

    threads = [threading.Thread(target=one, args=(s,)) for s in sources]
    for i in range(0, len(threads), 50):  # at most 50 sources at once: a bounded load
        batch = threads[i : i + 50]
        for t in batch:
            t.start()
        for t in batch:
            t.join()


def agreement(records: list[dict]) -> tuple[int, int]:
    """(source addresses whose flows all reached one backend, source addresses seen)."""
    per_src: dict[str, set[str]] = {}
    for r in records:
        if "backend" in r:
            per_src.setdefault(r["src"], set()).add(r["backend"])
    return sum(1 for s in per_src.values() if len(s) == 1), len(per_src)


def demo() -> int:
    lab = Lab(prefix=f"fd{os.getpid() % 10000}")
    try:
        print("building namespaces: client, router (ECMP), 3 balancers, backends ...", flush=True)
        lab.build().start()
        recs = lab.probe("vip", lab.sources(), 4)
        ok, n = agreement(recs)
        lbs = Counter(r.get("lb") for r in recs)
        print(f"{len(recs)} flows from {n} client addresses over instances {dict(sorted(lbs.items()))}")
        print(f"client addresses whose flows all reached the same backend: {ok} of {n}")
        before = {r["src"]: r["backend"] for r in recs if "backend" in r}
        lab.set_nexthops([1, 2])
        print("instance 3 leaves the ECMP route ...", flush=True)
        recs = lab.probe("vip", lab.sources(), 2)
        same = sum(1 for r in recs if before.get(r["src"]) == r.get("backend"))
        print(f"after: {same} of {len(recs)} flows reached the backend their address had before")
        print(lab.fastlb("fleet", "-f", str(lab.hosts_file([1, 2, 3])), "status", check=False).stdout)
        return 0
    finally:
        lab.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastlb.fleet.lab")
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("demo")
    b = sub.add_parser("backend")
    b.add_argument("names", nargs="+")
    p = sub.add_parser("probe")
    p.add_argument("target")
    p.add_argument("per_source", type=int)
    p.add_argument("sources", nargs="+")
    args = ap.parse_args(argv)
    if args.what == "demo":
        return demo()
    if args.what == "backend":
        serve_backends(args.names)
        return 0
    run_probe(args.target, args.per_source, args.sources)
    return 0


if __name__ == "__main__":
    sys.exit(main())
