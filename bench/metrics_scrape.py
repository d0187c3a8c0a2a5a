"""Does a Prometheus scrape slow the data plane?  A measurement, not a test (docs/metrics.md).

fastlb (1 worker) forwards an iperf3 stream to an iperf3 server on loopback, with `[global] metrics`
on.  Rounds alternate without scrapes and with a scraper fetching /metrics back to back (far more
often than any Prometheus would) or once a second; each round reports the stream's throughput and the worker's CPU
time per GiB forwarded.  Usage: .venv/bin/python bench/metrics_scrape.py [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Wait until something listens on port, without connecting (iperf3 would take it for a client)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in psutil.net_connections("tcp")
        ):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="flb-scrape-")
    iperf_port, lb_port, metrics_port = free_port(), free_port(), free_port()
    cfg = os.path.join(work, "fastlb.toml")
    with open(cfg, "w") as f:
        f.write(
            f'[global]\nworkers = 1\ncontrol_socket = "{work}/control.sock"\nmetrics = "127.0.0.1:{metrics_port}"\n'
            f'[listeners.web]\nbind = "127.0.0.1:{lb_port}"\npool = "web"\n'
            f'[pools.web]\nbackends = [{{ name = "iperf", address = "127.0.0.1:{iperf_port}" }}]\n'
        )
    procs = [subprocess.Popen(["iperf3", "-s", "-p", str(iperf_port)], stdout=subprocess.DEVNULL)]
    procs.append(
        subprocess.Popen([sys.executable, "-m", "fastlb", "serve", "-c", cfg], stderr=subprocess.DEVNULL)
    )
    try:
        wait_port(iperf_port)
        wait_port(lb_port)
        wait_port(metrics_port)
        worker = psutil.Process(procs[1].pid).children()[0]
        # seconds between scrapes: None = no scraper, 0 = back to back
        modes = {"no scrapes": None, "1 scrape/s": 1.0, "back to back": 0.0}
        rows: dict[str, list[tuple[float, float, int]]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode in rows:
                stop = threading.Event()
                scrapes = [0]

                def scrape(stop=stop, scrapes=scrapes, pause=modes[mode]) -> None:
                    while not stop.is_set():
                        url = f"http://127.0.0.1:{metrics_port}/metrics"
                        with urllib.request.urlopen(url, timeout=5) as r:
                            r.read()
                        scrapes[0] += 1
                        stop.wait(pause)

                t = threading.Thread(target=scrape, daemon=True) if modes[mode] is not None else None
                if t:
                    t.start()
                cpu0 = sum(worker.cpu_times()[:2])
                out = subprocess.run(
                    ["iperf3", "-c", "127.0.0.1", "-p", str(lb_port), "-t", str(args.seconds), "-J"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                cpu = sum(worker.cpu_times()[:2]) - cpu0
                stop.set()
                if t:
                    t.join()
                end = json.loads(out)["end"]["sum_received"]
                gib = end["bytes"] / 2**30
                rows[mode].append((end["bits_per_second"] / 1e9, cpu / gib, scrapes[0]))
        print(f"{'':12} {'Gbit/s (median)':>16} {'worker CPU s/GiB':>17} {'scrapes/s':>10}")
        for mode, rs in rows.items():
            gbps = statistics.median(r[0] for r in rs)
            cpu = statistics.median(r[1] for r in rs)
            rate = statistics.median(r[2] for r in rs) / args.seconds
            print(f"{mode:12} {gbps:16.2f} {cpu:17.3f} {rate:10.0f}")
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
