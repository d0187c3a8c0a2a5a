"""`fastlb demo`: three local echo backends, fastlb in front of them with weights 5:3:2, a few
seconds of traffic, and the split each backend served.  Everything runs on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from fastlb.control import ControlClient
from fastlb.observe.status import format_status

WEIGHTS = {"a": 5, "b": 3, "c": 2}
CONCURRENCY = 16
PAYLOAD = os.urandom(4096)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(notify: socket.socket, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fastlb serve exited with code {proc.returncode}")
        notify.settimeout(0.2)
        try:
            if b"READY=1" in notify.recv(4096):
                return
        except TimeoutError:
            continue
    raise RuntimeError("fastlb did not become ready in time")


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _client(port: int, until: float, stats: dict[str, int]) -> None:
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(PAYLOAD)
            await writer.drain()
            got = await reader.readexactly(len(PAYLOAD))
            writer.close()
            stats["ok" if got == PAYLOAD else "bad"] += 1
        except (OSError, asyncio.IncompleteReadError):
            stats["failed"] += 1


async def _traffic(backend_ports: dict[str, int], lb_port: int, seconds: float) -> dict[str, int]:
    servers = [await asyncio.start_server(_echo, "127.0.0.1", p) for p in backend_ports.values()]
    stats = {"ok": 0, "bad": 0, "failed": 0}
    until = time.monotonic() + seconds
    await asyncio.gather(*(_client(lb_port, until, stats) for _ in range(CONCURRENCY)))
    for s in servers:
        s.close()
    return stats


def run_demo(seconds: float, workers: int) -> int:
    backend_ports = {name: _free_port() for name in WEIGHTS}
    lb_port = _free_port()
    with tempfile.TemporaryDirectory(prefix="fastlb-demo-") as tmp:
        cfg_path = os.path.join(tmp, "demo.toml")
        backends = ",\n".join(
            f'  {{ name = "{n}", address = "127.0.0.1:{backend_ports[n]}", weight = {w} }}'
            for n, w in WEIGHTS.items()
        )
        config = (
            f'[global]\nworkers = {workers}\ncontrol_socket = "{tmp}/control.sock"\n'
            f'state_file = "{tmp}/state.json"\nshutdown_timeout = "5s"\n\n'
            f'[listeners.demo]\nbind = "127.0.0.1:{lb_port}"\npool = "demo"\nconnect_timeout = "2s"\n'
            f'idle_timeout = "30s"\n\n[pools.demo]\nalgorithm = "weighted_round_robin"\n'
            f"backends = [\n{backends},\n]\n"
        )
        with open(cfg_path, "w") as f:
            f.write(config)
        print(f"config ({cfg_path}):\n{config}")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(os.path.join(tmp, "notify.sock"))
        env = dict(os.environ, NOTIFY_SOCKET=os.path.join(tmp, "notify.sock"))
        log_path = os.path.join(tmp, "fastlb.log")
        log_file = open(log_path, "w")  # noqa: SIM115 - closed below, after the process ends
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastlb", "serve", "-c", cfg_path], env=env, stderr=log_file
        )
        try:
            _wait_ready(notify, proc, 15.0)
            print(
                f"fastlb is ready on 127.0.0.1:{lb_port}; sending traffic for {seconds:.1f}s "
                f"with {CONCURRENCY} concurrent clients ...\n"
            )
            stats = asyncio.run(_traffic(backend_ports, lb_port, seconds))
            st = ControlClient(os.path.join(tmp, "control.sock")).status()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            log_file.close()
            with open(log_path) as f:
                log_text = f.read()
    print(format_status(st))
    total = sum(b["total"] for b in st["pools"][0]["backends"]) or 1
    print("\nshare of connections (configured weights 5:3:2 = 50% / 30% / 20%):")
    for b in st["pools"][0]["backends"]:
        print(
            f"  {b['name']}: {b['total']:7d} connections  {100.0 * b['total'] / total:5.1f}%  "
            f"{b['bytes_in']:>12,d} bytes in  {b['bytes_out']:>12,d} bytes out"
        )
    print(
        f"\nclients: {stats['ok']} echoed correctly, {stats['bad']} wrong bytes, {stats['failed']} failed; "
        f"fastlb exited with code {code}"
    )
    good = stats["bad"] == 0 and stats["failed"] == 0 and code == 0 and stats["ok"] > 0
    if not good:
        print(f"\nfastlb's log:\n{log_text}", file=sys.stderr)
    return 0 if good else 1
