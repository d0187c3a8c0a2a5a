"""The deployment commands of the `fastlb` CLI (registered on the main group by fastlb.cli):
`drain [--wait]`, `wait --healthy`, `rollout ...`, `switch ...`."""

from __future__ import annotations

import sys
from typing import Any

import click


class Duration(click.ParamType):
    """ "500ms", "30s", "5m", "1h" or plain seconds, as in the config file."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        from fastlb.config import ConfigError
        from fastlb.config.values import parse_duration

        try:
            text = value.strip() if isinstance(value, str) else value
            if isinstance(text, str) and text.replace(".", "", 1).isdigit():
                return float(text)
            return parse_duration(text, param.name if param else "duration", "command line")
        except ConfigError as exc:
            self.fail(exc.problem, param, ctx)


DURATION = Duration()


def register(main: click.Group, control_options, client, run_control) -> None:
    """Add the deployment commands to `main`.  control_options/client/run_control are fastlb.cli's
    helpers (-c/--socket options, ControlClient from them, ControlError -> exit 1)."""

    @main.command()
    @control_options
    @click.argument("pool")
    @click.argument("backend")
    @click.option("--wait", "wait_", is_flag=True, help="Return when BACKEND holds no connection (exit 0).")
    @click.option(
        "--timeout",
        type=DURATION,
        default="5m",
        show_default=True,
        help="With --wait: give up (exit 1) after this.",
    )
    def drain(
        config_file: str | None, socket_path: str | None, pool: str, backend: str, wait_: bool, timeout: float
    ) -> None:
        """Drain BACKEND: no new connections; established ones continue.  With --wait, return when it
        holds no connection (exit 0) or at the timeout (exit 1, with the count still open)."""
        from fastlb.deploy.waits import drained, wait_for

        c = client(config_file, socket_path)
        r = run_control(lambda: c.drain(pool, backend))
        click.echo(f"{pool}/{backend}: {r['previous']} -> {r['admin']}")
        if not wait_:
            return
        res = run_control(lambda: _wait(lambda: wait_for(c, pool, backend, drained, timeout)))
        if res.ok:
            click.echo(f"{pool}/{backend}: drained (0 connections)")
            return
        click.echo(
            f"fastlb: {pool}/{backend}: {res.backend['active']} connections still open after {timeout:g}s",
            err=True,
        )
        sys.exit(1)

    @main.command()
    @control_options
    @click.argument("pool")
    @click.argument("backend")
    @click.option(
        "--healthy", is_flag=True, required=True, help="Wait until BACKEND is up after its rise checks."
    )
    @click.option("--ramped", is_flag=True, help="Also wait until its slow-start ramp is over.")
    @click.option(
        "--timeout", type=DURATION, default="5m", show_default=True, help="Give up (exit 1) after this."
    )
    def wait(
        config_file: str | None,
        socket_path: str | None,
        pool: str,
        backend: str,
        healthy: bool,
        ramped: bool,
        timeout: float,
    ) -> None:
        """Return when BACKEND is healthy: up, after `rise` passing health checks that ran after this
        command started (at once if its pool has no health check); --ramped: and at full weight after
        slow start.  Exit 0 when it is, 1 at the timeout."""
        from fastlb.deploy.waits import backend_record, healthy_since, wait_for

        c = client(config_file, socket_path)
        first, _ = run_control(lambda: _wait(lambda: backend_record(c, pool, backend)))
        done = healthy_since(first.get("checks", 0), ramped)
        res = run_control(lambda: _wait(lambda: wait_for(c, pool, backend, done, timeout)))
        b = res.backend
        if res.ok:
            click.echo(
                f"{pool}/{backend}: healthy ({b['health']}, weight {b['effective_weight']}/{b['weight']})"
            )
            return
        click.echo(
            f"fastlb: {pool}/{backend}: not healthy after {timeout:g}s "
            f"(health {b['health']}, {b.get('checks_ok', 0)} passing checks in a row, "
            f"weight {b['effective_weight']}/{b['weight']})",
            err=True,
        )
        sys.exit(1)


def _wait(fn):
    """fn(), with an unknown pool/backend turned into a ControlError (exit 1 with its message)."""
    from fastlb.control import ControlError

    try:
        return fn()
    except KeyError as exc:
        raise ControlError(exc.args[0]) from None
