"""scripts/rolling-update: replace each backend of a pool in turn, never more than --max-unavailable
out of service at once (Kubernetes' maxUnavailable).

For each backend: drain it and wait until it holds no connection (--drain-timeout), run the replace
command, wait until it is healthy again (up after its rise checks, --healthy-timeout; with --ramped
also at the end of its slow start), enable it.  The replace command runs through /bin/sh with
{pool}, {backend}, {address}, {host}, {port} replaced, and FASTLB_POOL, FASTLB_BACKEND,
FASTLB_ADDRESS in its environment.

A step that fails (the drain or the health wait times out, the command exits non-zero) stops the
update: backends not yet started are left alone, the failed one stays drained (out of service, so
clients never reach a half-replaced backend), the others in flight finish their step; exit 1 with the
reason.  Exit 0 when every backend was replaced and is back in service.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastlb.control import ControlClient, ControlError
from fastlb.deploy.waits import backend_record, drained, healthy_since, wait_for


class StepFailed(Exception):
    pass


def _duration(text: str) -> float:
    from fastlb.config import ConfigError
    from fastlb.config.values import parse_duration

    try:
        return (
            float(text)
            if text.replace(".", "", 1).isdigit()
            else parse_duration(text, "duration", "argument")
        )
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="rolling-update",
        description="Replace each backend of a fastlb pool in turn: drain and wait, replace, wait healthy, enable.",
    )
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", help="config file of the running fastlb")
    where.add_argument("--socket", help="its control socket")
    ap.add_argument("pool", help="the pool whose backends are replaced")
    ap.add_argument("command", help="replace command (sh -c), e.g. 'systemctl restart app@{port}'")
    ap.add_argument(
        "--max-unavailable", type=int, default=1, help="backends out of service at once (default 1)"
    )
    ap.add_argument("--backends", help="comma-separated subset, in this order (default: all, in pool order)")
    ap.add_argument("--drain-timeout", type=_duration, default=300.0, help="per backend (default 5m)")
    ap.add_argument("--healthy-timeout", type=_duration, default=300.0, help="per backend (default 5m)")
    ap.add_argument("--command-timeout", type=_duration, default=600.0, help="per backend (default 10m)")
    ap.add_argument(
        "--ramped", action="store_true", help="also wait for the end of slow start before the next"
    )
    args = ap.parse_args(argv)
    if args.max_unavailable < 1:
        ap.error("--max-unavailable must be at least 1")
    return args


class RollingUpdate:
    def __init__(self, client: ControlClient, args: argparse.Namespace, out=sys.stdout) -> None:
        self.client = client
        self.args = args
        self.out = out
        self.lock = threading.Lock()
        self.failed: str | None = None
        self.unavailable = 0
        self.max_seen = 0

    def say(self, text: str) -> None:
        with self.lock:
            print(f"rolling-update: {text}", file=self.out, flush=True)

    def backends(self) -> list[dict]:
        st = self.client.status()
        pool = next((p for p in st["pools"] if p["name"] == self.args.pool), None)
        if pool is None:
            raise StepFailed(f"unknown pool {self.args.pool!r}")
        live = {b["name"]: b for b in pool["backends"] if not b.get("removed")}
        if not self.args.backends:
            return list(live.values())
        wanted = [n.strip() for n in self.args.backends.split(",") if n.strip()]
        missing = [n for n in wanted if n not in live]
        if missing:
            raise StepFailed(f"pool {self.args.pool} has no backend {', '.join(missing)}")
        return [live[n] for n in wanted]

    def replace(self, name: str, address: str) -> None:
        pool, a = self.args.pool, self.args
        if self.failed:
            return
        with self.lock:
            self.unavailable += 1
            self.max_seen = max(self.max_seen, self.unavailable)
        try:
            self.client.drain(pool, name)
            self.say(f"{pool}/{name}: draining")
            res = wait_for(self.client, pool, name, drained, a.drain_timeout)
            if not res.ok:
                raise StepFailed(
                    f"{pool}/{name}: {res.backend['active']} connections still open after {a.drain_timeout:g}s"
                )
            host, _, port = address.rpartition(":")
            cmd = a.command.format(pool=pool, backend=name, address=address, host=host.strip("[]"), port=port)
            self.say(f"{pool}/{name}: drained; running: {cmd}")
            start_checks = backend_record(self.client, pool, name)[0].get("checks", 0)
            env = dict(os.environ, FASTLB_POOL=pool, FASTLB_BACKEND=name, FASTLB_ADDRESS=address)
            try:
                r = subprocess.run(["/bin/sh", "-c", cmd], env=env, timeout=a.command_timeout, check=False)
            except subprocess.TimeoutExpired:
                raise StepFailed(
                    f"{pool}/{name}: replace command still running after {a.command_timeout:g}s"
                ) from None
            if r.returncode != 0:
                raise StepFailed(f"{pool}/{name}: replace command exited {r.returncode}; left drained")
            res = wait_for(self.client, pool, name, healthy_since(start_checks, False), a.healthy_timeout)
            if not res.ok:
                raise StepFailed(
                    f"{pool}/{name}: not healthy after {a.healthy_timeout:g}s (health {res.backend['health']}); "
                    "left drained"
                )
            self.client.enable(pool, name)
            if a.ramped:
                wait_for(self.client, pool, name, healthy_since(0, True), a.healthy_timeout)
            self.say(f"{pool}/{name}: replaced, healthy, enabled")
        except (StepFailed, ControlError, KeyError) as exc:
            with self.lock:
                self.failed = self.failed or str(exc.args[0] if isinstance(exc, KeyError) else exc)
        finally:
            with self.lock:
                self.unavailable -= 1

    def run(self) -> int:
        start = time.monotonic()
        try:
            todo = self.backends()
        except (StepFailed, ControlError) as exc:
            print(f"rolling-update: {exc}", file=sys.stderr)
            return 1
        self.say(
            f"pool {self.args.pool}: {len(todo)} backends, at most {self.args.max_unavailable} out of service at once"
        )
        with ThreadPoolExecutor(max_workers=self.args.max_unavailable) as ex:
            for f in [ex.submit(self.replace, b["name"], b["address"]) for b in todo]:
                f.result()
        if self.failed:
            print(f"rolling-update: FAILED: {self.failed}", file=sys.stderr)
            return 1
        self.say(
            f"pool {self.args.pool}: done, {len(todo)} backends replaced in {time.monotonic() - start:.1f}s"
        )
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.socket:
        path = args.socket
    else:
        from fastlb.config import ConfigError, load_config

        try:
            path = load_config(args.config).global_.control_socket
        except ConfigError as exc:
            print(f"rolling-update: {exc}", file=sys.stderr)
            return 2
    return RollingUpdate(ControlClient(path), args).run()


if __name__ == "__main__":
    sys.exit(main())
