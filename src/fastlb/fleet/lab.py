"""A fleet lab in network namespaces: clients behind a router whose ECMP route spreads flows over
several fastlb instances that share one virtual address, with real backends behind them.

    client ns (many source addresses) ── router ns ──┬── lb1 ns: fastlb, VIP on lo ──┐
                                        ECMP to VIP  ├── lb2 ns: fastlb, VIP on lo ──┼── (via the router)
                                                     └── lb3 ns: fastlb, VIP on lo ──┘      │
                                                                         backend ns: servers

Two ways to make the router's route to the VIP.  `Lab(bgp=True)`, the real thing: the router runs
BIRD 2 with one eBGP session per balancer and `merge paths` (ECMP over the sessions); each balancer
runs BIRD too (its kernel protocol imports ANNOUNCE_TABLE, one session to the router) and its
fastlb announces the VIP there (`announce = true`, fleet/announce.py).  BGP hold time 3 s.  The BIRD
configs are generated here (bird_router_conf, bird_lb_conf) and each daemon runs in the foreground
with its own -c CONF -s SOCK -P PIDFILE, never the system service.  `Lab()` writes the ECMP route
by hand instead (`set_nexthops`).

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
ANNOUNCE_TABLE = 200
ANNOUNCE_PROTOCOL = 201  # the rtm_protocol of fastlb's routes; each balancer's BIRD imports only these
ROUTER_AS, FLEET_AS = 65000, 65001
HOLD_TIME = 3  # seconds (BIRD's minimum): a dead balancer's BIRD is noticed this late
WITHDRAW_DELAY = "2s"  # announce_withdraw_delay in the lab: BGP converges here in milliseconds


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
    bgp: bool = False  # BIRD on the router and the balancers, fastlb announcing (see the top)

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
        if self.bgp:
            self.pin_flows()
            self.start_bird("r")
            for k in range(1, self.n_lbs + 1):
                self.start_bird(f"lb{k}")
        else:
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

    # --- BGP: BIRD on the router and on every balancer --------------------------------------------

    def bird_conf(self, name: str) -> str:
        return bird_router_conf(self.n_lbs) if name == "r" else bird_lb_conf(int(name[2:]))

    def pin_flows(self) -> None:
        """Keep an established connection on the balancer it started on, whatever the ECMP route
        does later.  Linux hashes every packet afresh: when a nexthop leaves, flows of the others
        move too (hash-threshold), and a moved connection is reset by the instance it lands on.
        Routers that keep flows in place (resilient hashing, a stateful edge) do not; the lab's
        router does it with conntrack: the first packet's outgoing link is saved in the
        connection's mark, later packets are routed by the mark (table 100+K: the VIP via K)."""
        r = self.ns("r")
        saves = "".join(
            f'    ct state new oifname "to-lb{k}" ct mark set {k}\n' for k in range(1, self.n_lbs + 1)
        )
        rules = (
            "table ip pin {\n"
            "  chain pre {\n    type filter hook prerouting priority mangle;\n"
            "    ct state established,related meta mark set ct mark\n  }\n"
            f"  chain post {{\n    type filter hook postrouting priority mangle;\n{saves}  }}\n}}\n"
        )
        conf = self.workdir / "pin.nft"
        conf.write_text(rules)
        _run("nft", "-f", str(conf), ns=r)
        for k in range(1, self.n_lbs + 1):
            _run("ip", "route", "add", f"{VIP}/32", "via", lb_address(k), "table", str(100 + k), ns=r)
            _run("ip", "rule", "add", "fwmark", str(k), "lookup", str(100 + k), "pref", "100", ns=r)

    def start_bird(self, name: str) -> None:
        """BIRD in namespace `name` ("r" or "lbK"), in the foreground (-f: the Popen is the daemon,
        so kill -9 reaches it), with this lab's config, control socket and pid file."""
        conf = self.workdir / f"bird-{name}.conf"
        conf.write_text(self.bird_conf(name))
        argv = ["bird", "-f", "-c", str(conf), "-s", str(self.workdir / f"bird-{name}.ctl")]
        argv += ["-P", str(self.workdir / f"bird-{name}.pid")]
        self.procs[f"bird-{name}"] = self._popen(name, f"bird-{name}", argv)

    def kill_bird(self, k: int) -> None:
        """kill -9 of balancer k's BIRD (its BGP session dies without a word)."""
        p = self.procs.pop(f"bird-lb{k}")
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def nexthops(self) -> set[int]:
        """The balancers the router's kernel route to the VIP points at (read over netlink)."""
        return router_nexthops(self.ns("r"))

    def wait_nexthops(self, want: set[int], timeout: float) -> float:
        """Seconds until the router's route is over exactly `want`; RuntimeError after timeout."""
        t0 = time.monotonic()
        while True:
            got = self.nexthops()
            if got == want:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"router nexthops {sorted(got)}, not {sorted(want)}, after {timeout}s")
            time.sleep(0.05)

    # --- processes -----------------------------------------------------------------------------

    def config(self, k: int) -> str:
        """The config every instance runs (only the control socket path differs, a local file)."""
        entries = ", ".join(
            f'{{ name = "{b}", address = "{BACKEND_HOST}:{9000 + i}" }}' for i, b in enumerate(self.backends)
        )
        announce = (
            f"announce_table = {ANNOUNCE_TABLE}\nannounce_protocol = {ANNOUNCE_PROTOCOL}\n"
            f'announce_withdraw_delay = "{WITHDRAW_DELAY}"\n'
            if self.bgp
            else ""
        )
        bind = f"{VIP}:{PORT}" if self.bgp else f"0.0.0.0:{PORT}"
        return (
            f'[global]\nworkers = 1\ncontrol_socket = "{self.workdir}/lb{k}.sock"\nshutdown_timeout = "5s"\n'
            f'state_file = "{self.workdir}/lb{k}.state.json"\n'
            f'admin = "{lb_address(k)}:{ADMIN_PORT}"\nadmin_token_file = "{self.workdir}/token"\n{announce}\n'
            f'[listeners.web]\nbind = "{bind}"\npool = "web"\n{"announce = true" if self.bgp else ""}\n\n'
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
            self.start_lb(k)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(self.admin_ok(k) for k in range(1, self.n_lbs + 1)):
                return self
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited: {self.log(name)[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("the fleet did not come up in 30 s")

    def start_lb(self, k: int, *extra: str) -> subprocess.Popen:
        """`fastlb serve` of balancer k (extra: e.g. "--takeover"), logging to lbK.log."""
        cfg = self.workdir / f"lb{k}.toml"
        cfg.write_text(self.config(k))
        p = self._popen(f"lb{k}", f"lb{k}", [sys.executable, "-m", "fastlb", "serve", "-c", str(cfg), *extra])
        self.procs[f"lb{k}"] = p
        return p

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


# --- BIRD configs and the router's table -------------------------------------------------------

_BGP_TIMERS = (
    f"  hold time {HOLD_TIME}; keepalive time 1;\n"
    "  connect delay time 1; connect retry time 1; error wait time 1, 5;\n"
)


def bird_router_conf(n_lbs: int) -> str:
    """The router: one eBGP session per balancer; `merge paths` makes the equal routes one ECMP
    kernel route (the kernel hashes on L4: fib_multipath_hash_policy = 1)."""
    sessions = "".join(
        f"protocol bgp lb{k} from fleet {{\n  neighbor {lb_address(k)} as {FLEET_AS};\n"
        f"  source address 10.77.{10 + k}.1;\n}}\n"
        for k in range(1, n_lbs + 1)
    )
    return (
        "# generated by fastlb.fleet.lab: the router\n"
        "log stderr all;\nrouter id 10.77.0.1;\n"
        "protocol device { scan time 1; }\n"
        "protocol kernel {\n  ipv4 { import none; export all; };\n  merge paths on;\n}\n"
        f"template bgp fleet {{\n  local as {ROUTER_AS};\n{_BGP_TIMERS}"
        "  ipv4 { import all; export none; };\n}\n" + sessions
    )


def bird_lb_conf(k: int) -> str:
    """Balancer k: the kernel protocol learns fastlb's routes (table ANNOUNCE_TABLE, protocol
    ANNOUNCE_PROTOCOL) and the one BGP session exports them with itself as the next hop."""
    return (
        f"# generated by fastlb.fleet.lab: balancer {k}\n"
        f"log stderr all;\nrouter id {lb_address(k)};\n"
        "protocol device { scan time 1; }\n"
        f"protocol kernel {{\n  kernel table {ANNOUNCE_TABLE};\n  learn;\n  scan time 1;\n"
        f"  ipv4 {{ import where krt_source = {ANNOUNCE_PROTOCOL}; export none; }};\n}}\n"
        f"protocol bgp uplink {{\n  local {lb_address(k)} as {FLEET_AS};\n"
        f"  neighbor 10.77.{10 + k}.1 as {ROUTER_AS};\n{_BGP_TIMERS}"
        "  ipv4 { import none; export all; };\n}\n"
    )


def router_nexthops(ns: str) -> set[int]:
    """Balancers (1-based) the VIP's route in namespace ns's main table goes through."""
    from pyroute2 import NetNS

    found: set[int] = set()
    with NetNS(ns) as nl:
        for msg in nl.get_routes(family=socket.AF_INET, table=254):
            if msg.get_attr("RTA_DST") != VIP or msg["dst_len"] != 32:
                continue
            gws = [msg.get_attr("RTA_GATEWAY")]
            for hop in msg.get_attr("RTA_MULTIPATH") or []:
                gws.append(hop.get_attr("RTA_GATEWAY"))
            found |= {int(gw.split(".")[2]) - 10 for gw in gws if gw}
    return found


# --- the processes that run inside the namespaces ------------------------------------------------


def serve_backends(names: list[str]) -> None:
    """Backend i listens on BACKEND_HOST:9000+i and greets each connection with "NAME PEER\\n" (PEER:
    the address fastlb connected from, i.e. which instance carried the flow), then echoes what it
    receives until the client closes (a probe closes after the greeting)."""
    sel = selectors.DefaultSelector()
    for i, name in enumerate(names):
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((BACKEND_HOST, 9000 + i))
        ls.listen(1024)
        sel.register(ls, selectors.EVENT_READ, name)
    while True:
        for key, _ in sel.select():
            if key.data is None:  # an accepted connection: echo, or close on EOF / error
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                    if data:
                        conn.sendall(data)
                        continue
                except OSError:
                    pass
                sel.unregister(conn)
                conn.close()
                continue
            conn, peer = key.fileobj.accept()
            try:
                conn.sendall(f"{key.data} {peer[0]}\n".encode())
            except OSError:
                conn.close()
                continue
            sel.register(conn, selectors.EVENT_READ, None)


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
    lab = Lab(prefix=f"fd{os.getpid() % 10000}", bgp=True)
    try:
        print(
            "building namespaces: client, router (BIRD), 3 balancers (BIRD + fastlb), backends ...",
            flush=True,
        )
        lab.build().start()
        took = lab.wait_nexthops({1, 2, 3}, 30)
        print(f"router: 3 nexthops for {VIP} over BGP, {took:.2f}s after the instances were ready")
        recs = lab.probe("vip", lab.sources(), 4)
        ok, n = agreement(recs)
        lbs = Counter(r.get("lb") for r in recs)
        print(f"{len(recs)} flows from {n} client addresses over instances {dict(sorted(lbs.items()))}")
        print(f"client addresses whose flows all reached the same backend: {ok} of {n}")
        before = {r["src"]: r["backend"] for r in recs if "backend" in r}
        admin3 = ("--admin", f"http://{lb_address(3)}:{ADMIN_PORT}")
        lab.fastlb(*admin3, "drain-instance")
        took = lab.wait_nexthops({1, 2}, 10)
        print(f"fastlb drain-instance on instance 3: its nexthop left the router after {took:.3f}s")
        recs = lab.probe("vip", lab.sources(), 2)
        same = sum(1 for r in recs if before.get(r["src"]) == r.get("backend"))
        print(f"after: {same} of {len(recs)} flows reached the backend their address had before")
        lab.fastlb(*admin3, "undrain-instance")
        took = lab.wait_nexthops({1, 2, 3}, 10)
        print(f"fastlb undrain-instance: back after {took:.2f}s (announce_rise 2s)")
        bird = lab.procs["bird-lb2"]
        bird.send_signal(signal.SIGSTOP)
        took = lab.wait_nexthops({1, 3}, 10)
        print(
            f"instance 2's BIRD frozen (SIGSTOP): router dropped it after {took:.2f}s (hold time {HOLD_TIME}s)"
        )
        bird.send_signal(signal.SIGCONT)
        took = lab.wait_nexthops({1, 2, 3}, 20)
        print(f"... and took it back {took:.2f}s after SIGCONT")
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
