"""The cost of connection preludes: connections/s per balancer CPU-second, fastlb and HAProxy.

    .venv/bin/python bench/prelude.py [--rounds 3] [--duration 5] [--concurrency 64] [--quick]

Workload: a new connection per request.  The client (bench/prelude_load.c, compiled here) keeps
--concurrency connections in flight: connect, send a real TLS ClientHello (server name
admin.example.test, captured from Python's ssl module), read the backend's "ok", close.  The backend
(the same program) answers once it has the ClientHello.  Targets, each forwarding to that backend:

  fastlb plain          a listener without preludes (the bytes are just bytes)
  fastlb sni            a listener with an SNI route: the ClientHello is peeked and parsed first
  fastlb send-proxy-v2  plain listener, pool with send_proxy = "v2"
  fastlb accept-proxy   the client puts a PROXY v2 header first; proxy_protocol = "v2"
  haproxy plain / sni (tcp-request inspect-delay + req.ssl_sni) / send-proxy-v2 / accept-proxy

The balancer runs pinned to CPU 1 inside a cgroup with a CPU quota (bench/system.py's CpuLimit: 50 % of one
CPU by default); client and backend run on CPU 0.  Targets are interleaved in rounds; the result per
target is the median (min-max) of its rounds.  Writes bench/results/prelude.json and prelude.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from system import CpuLimit, Procs, cpu_seconds  # noqa: E402  (bench/system.py: cgroup and process helpers)

RESULTS = HERE / "results"
SNI = "admin.example.test"
BALANCER_CPU, LOAD_CPU = 1, 0
TARGETS = (
    "fastlb plain",
    "fastlb sni",
    "fastlb send-proxy-v2",
    "fastlb accept-proxy",
    "haproxy plain",
    "haproxy sni",
    "haproxy send-proxy-v2",
    "haproxy accept-proxy",
)
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def log(msg: str) -> None:
    print(f"[prelude-bench] {msg}", file=sys.stderr, flush=True)


def client_hello(name: str) -> bytes:
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def proxy_v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    return V2_SIG + b"\x21\x11" + len(body).to_bytes(2, "big") + body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def fastlb_config(kind: str, port: int, backend: int, ctl: str) -> str:
    lst = f'bind = "127.0.0.1:{port}"\nconnect_timeout = "2s"\nidle_timeout = "30s"\n'
    pool = 'algorithm = "round_robin"\n'
    routes = ""
    if kind == "sni":
        routes = (
            f'\n[[listeners.web.routes]]\nname = "admin"\nmatch = {{ sni = ["{SNI}"] }}\n'
            'backends = [{ pool = "web" }]\n\n[[listeners.web.routes]]\nname = "default"\n'
            'backends = [{ pool = "web" }]\n'
        )
    else:
        lst += 'pool = "web"\n'
    if kind == "accept-proxy":
        lst += 'proxy_protocol = "v2"\nproxy_protocol_from = ["127.0.0.0/8"]\n'
    elif kind == "send-proxy-v2":
        pool += 'send_proxy = "v2"\n'
    return (
        f'[global]\nworkers = 1\ncontrol_socket = "{ctl}"\nshutdown_timeout = "2s"\n\n'
        f"[listeners.web]\n{lst}\n[pools.web]\n{pool}"
        f'backends = [{{ name = "b", address = "127.0.0.1:{backend}" }}]\n{routes}'
    )


def haproxy_config(kind: str, port: int, backend: int) -> str:
    head = (
        "global\n    nbthread 1\n    maxconn 8000\n\ndefaults\n    mode tcp\n    timeout connect 2s\n"
        "    timeout client 30s\n    timeout server 30s\n\n"
    )
    server = f"127.0.0.1:{backend}"
    if kind == "sni":
        return head + (
            f"frontend f\n    bind 127.0.0.1:{port}\n    tcp-request inspect-delay 5s\n"
            "    tcp-request content accept if { req.ssl_hello_type 1 }\n"
            f"    use_backend admin if {{ req.ssl_sni -i {SNI} }}\n    default_backend other\n"
            f"backend admin\n    server s {server}\nbackend other\n    server s {server}\n"
        )
    bind = f"127.0.0.1:{port}" + (" accept-proxy" if kind == "accept-proxy" else "")
    opt = " send-proxy-v2" if kind == "send-proxy-v2" else ""
    return head + f"listen l\n    bind {bind}\n    server s {server}{opt}\n"


def run_one(
    target: str, args, tool: Path, payloads: dict[str, Path], work: Path, procs: Procs, cpu: CpuLimit
) -> dict:
    system, kind = target.split(" ", 1)
    port, backend = free_port(), free_port()
    hello = payloads["hello"]
    payload = payloads["proxied"] if kind == "accept-proxy" else hello
    logp = work / f"{system}-{kind}.log".replace(" ", "_")
    be = procs.start(
        "backend", [str(tool), "server", str(backend), str(hello.stat().st_size)], cpu=LOAD_CPU, log_path=logp
    )
    wait_port(backend, be)
    if system == "fastlb":
        cfg = work / f"fastlb-{kind}.toml"
        cfg.write_text(fastlb_config(kind, port, backend, str(work / f"ctl-{kind}.sock")))
        argv = [sys.executable, "-m", "fastlb", "serve", "-c", str(cfg)]
    else:
        cfg = work / f"haproxy-{kind}.cfg"
        cfg.write_text(haproxy_config(kind, port, backend))
        argv = [shutil.which("haproxy") or "haproxy", "-f", str(cfg), "-db"]
    lb = procs.start(system, argv, cpu=BALANCER_CPU, log_path=logp, procs_file=cpu.procs_file)
    try:
        wait_port(port, lb)
        time.sleep(0.3)
        c0 = cpu_seconds(lb.pid)
        r = subprocess.run(
            ["taskset", "-c", str(LOAD_CPU), str(tool), "client", str(port), str(args.concurrency),
             str(args.duration), str(payload)],
            capture_output=True, text=True, timeout=args.duration + 30,
        )  # fmt: skip
        c1 = cpu_seconds(lb.pid)
        out = json.loads(r.stdout)
    finally:
        procs.stop(lb)
        procs.stop(be)
    cpu_s = c1 - c0
    rate = out["done"] / out["seconds"]
    return {
        "conn_per_s": rate,
        "balancer_cpu_s": cpu_s,
        "conn_per_cpu_s": out["done"] / cpu_s if cpu_s > 0 else None,
        "errors": out["errors"],
        "done": out["done"],
    }


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for target, rs in runs.items():
        s = {}
        for key in ("conn_per_s", "conn_per_cpu_s", "balancer_cpu_s"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                s[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        s["errors"] = sum(r["errors"] for r in rs)
        out[target] = s
    return out


def markdown(summary: dict[str, dict], settings: dict) -> str:
    def fmt(v: dict) -> str:
        return f"{v['median']:,.0f} ({v['min']:,.0f}–{v['max']:,.0f})"

    plain = {
        s: summary.get(f"{s} plain", {}).get("conn_per_cpu_s", {}).get("median")
        for s in ("fastlb", "haproxy")
    }
    lines = [
        "### Connection preludes: SNI peek, PROXY protocol send and accept (bench/prelude.py)",
        "",
        f"New connection per request carrying a real TLS ClientHello ({settings['hello_bytes']} bytes); "
        f"{settings['concurrency']} connections in flight, {settings['rounds']} interleaved rounds of "
        f"{settings['duration']:g} s, medians (min–max); balancer: 1 worker/thread pinned to one CPU, "
        f"{settings['cpu_limit']}.",
        "",
        "| target | conn/s | conn per balancer CPU-s | vs same balancer plain | vs HAProxy same work | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for target in TARGETS:
        s = summary.get(target)
        if not s or "conn_per_cpu_s" not in s:
            continue
        system, kind = target.split(" ", 1)
        per = s["conn_per_cpu_s"]["median"]
        vs_plain = f"{per / plain[system]:.2f}x" if plain.get(system) else "–"
        h = summary.get(f"haproxy {kind}", {}).get("conn_per_cpu_s", {}).get("median")
        vs_h = f"{per / h:.2f}x" if system == "fastlb" and h else "–"
        lines.append(
            f"| {target} | {fmt(s['conn_per_s'])} | {fmt(s['conn_per_cpu_s'])} | {vs_plain} | {vs_h} | {s['errors']} |"
        )
    lines += [
        "",
        NOTE,
    ]
    return "\n".join(lines) + "\n"


NOTE = (
    "The work per balancer CPU-second is the figure to read: at this concurrency the client and the backend "
    "(one CPU) are the limit, not the balancer's quota, so conn/s mostly shows the load side. "
    '"vs same balancer plain": the prelude\'s cost on that balancer (goal for fastlb: within 5 %); '
    '"vs HAProxy same work": fastlb against HAProxy configured for the same prelude (`req.ssl_sni` '
    "routing with `tcp-request inspect-delay`, `send-proxy-v2`, `accept-proxy`)."
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--cpu-quota", type=int, default=50, help="percent of one CPU for the balancer")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s (smoke test; results not written)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 2.0
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    work = Path(tempfile.mkdtemp(prefix="flb-prelude-bench-"))
    tool = work / "prelude_load"
    subprocess.run(
        [shutil.which("cc") or "clang", "-O2", "-o", str(tool), str(HERE / "prelude_load.c")], check=True
    )
    hello = client_hello(SNI)
    payloads = {"hello": work / "hello.bin", "proxied": work / "proxied.bin"}
    payloads["hello"].write_bytes(hello)
    payloads["proxied"].write_bytes(proxy_v2("192.0.2.7", "127.0.0.1", 40000, 443) + hello)
    cpu = CpuLimit(args.cpu_quota, 10000, boost=True)
    procs = Procs()
    runs: dict[str, list[dict]] = {t: [] for t in targets}
    try:
        for rnd in range(args.rounds):
            for target in targets:
                r = run_one(target, args, tool, payloads, work, procs, cpu)
                runs[target].append(r)
                log(
                    f"round {rnd + 1} {target}: {r['conn_per_s']:,.0f} conn/s, {r['conn_per_cpu_s'] or 0:,.0f} per CPU-s, {r['errors']} errors"
                )
    finally:
        procs.stop_all()
        cpu.remove()
    settings = {
        "rounds": args.rounds,
        "duration": args.duration,
        "concurrency": args.concurrency,
        "hello_bytes": len(hello),
        "cpu_limit": cpu.describe(),
        "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
    }
    summary = summarize(runs)
    md = markdown(summary, settings)
    print(md)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "prelude.json").write_text(
            json.dumps({"settings": settings, "runs": runs, "summary": summary}, indent=1) + "\n"
        )
        (RESULTS / "prelude.md").write_text(md)
        log(f"wrote {RESULTS / 'prelude.json'} and {RESULTS / 'prelude.md'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
