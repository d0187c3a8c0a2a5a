"""The deployment commands of the `fastlb` CLI (registered on the main group by fastlb.cli):
`drain [--wait]`, `wait --healthy`, `rollout ...`, `switch ...`."""

from __future__ import annotations

import json
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

    _register_rollout(main, control_options, client, run_control)
    _register_switch(main, control_options, client, run_control)


GATE_OPTIONS = (
    (
        "--max-failure-rate",
        "max_failure_rate",
        'Connect failures (refused, timed out) per attempt, e.g. "1%" (default 1%; "off").',
    ),
    (
        "--max-early-reset-rate",
        "max_early_reset_rate",
        'Resets/closes before any byte per attempt (default 1%; "off").',
    ),
    (
        "--max-reset-rate",
        "max_reset_rate",
        'Resets after the backend\'s first byte per connection (default 1%; "off").',
    ),
    ("--max-unhealthy", "max_unhealthy", 'Share of canary backends down or ejected (default 0%; "off").'),
    ("--max-connect-time", "max_connect_time", 'Average connect time, e.g. "50ms" (default off).'),
    (
        "--min-connections",
        "min_connections",
        "Canary connections per window, fewer: inconclusive, hold (default 10).",
    ),
    ("--check", "check", "External gate: a command run each judgement (sh -c), exit 0 = pass."),
    ("--check-timeout", "check_timeout", "How long --check may run (default 10s); longer: failed."),
    ("--threshold", "threshold", "Failed judgements before the automatic rollback (default 2)."),
)


def _register_rollout(main: click.Group, control_options, client, run_control) -> None:
    @main.group()
    def rollout() -> None:
        """Canary rollouts run by the running fastlb: start, status, pause, resume, promote, abort."""

    def start(config_file, socket_path, target, to, from_, steps, interval, pause_at, name, as_json, **gates):
        if len(target) not in (1, 2):
            click.echo(
                "fastlb: rollout start takes LISTENER ROUTE (or the NAME of a [rollouts.NAME] table)",
                err=True,
            )
            sys.exit(2)
        req: dict[str, Any] = {k: v for k, v in gates.items() if v is not None}
        if len(target) == 1:
            req["rollout"] = target[0]
        else:
            req["listener"], req["route"] = target
            if to is None and name is None:
                click.echo("fastlb: rollout start LISTENER ROUTE needs --to POOL", err=True)
                sys.exit(2)
        for key, value in (
            ("to", to),
            ("from", from_),
            ("steps", steps),
            ("interval", interval),
            ("pause_at", pause_at),
            ("name", name),
        ):
            if value is not None:
                req[key] = value
        c = client(config_file, socket_path)
        v = run_control(lambda: c.request({"cmd": "rollout-start", **req})["rollout"])
        if as_json:
            click.echo(json.dumps(v, indent=2))
            return
        split = " ".join(f"{p}={w}" for p, w in v["split"].items())
        if v["next_judgement_in"] is None:  # a single step (--steps 100): promoted at once
            click.echo(f"rollout {v['name']}: {v['status']} at {v['share']}% (split {split})")
            return
        click.echo(
            f"rollout {v['name']}: started: {v['canary']} at {v['share']}% "
            f"(split {split}), next judgement in {v['next_judgement_in']:.1f}s"
        )

    start.__doc__ = """Start a canary rollout of pool --to on ROUTE of LISTENER (or a [rollouts.NAME] table
    by its NAME): the canary's share goes through --steps, judged by the gates every --interval;
    threshold failed judgements roll back at once; the last step (100) promotes and drains the
    old pool."""
    f = start
    for opt, dest, help_ in reversed(GATE_OPTIONS):
        kind = int if dest in ("min_connections", "threshold") else str
        f = click.option(opt, dest, type=kind, default=None, help=help_)(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print the rollout's status as JSON.")(f)
    f = click.option("--name", default=None, help="Rollout name (default LISTENER-ROUTE, or the table's).")(f)
    f = click.option("--pause-at", default=None, help="Pause when this step is reached (until resume).")(f)
    f = click.option("--interval", default=None, help="Time between judgements (default 30s).")(f)
    f = click.option("--steps", default=None, help="Canary shares in percent (default 5,10,25,50,100).")(f)
    f = click.option("--from", "from_", default=None, help="The stable pool (default: the route's largest).")(
        f
    )
    f = click.option("--to", default=None, help="The canary pool.")(f)
    f = click.argument("target", nargs=-1)(f)
    f = control_options(f)
    rollout.command("start")(f)

    @rollout.command("status")
    @control_options
    @click.argument("name", required=False)
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def status(config_file, socket_path, name, as_json) -> None:
        """Step, share, time to the next judgement, each gate's last figures, history of judgements."""
        from fastlb.deploy.view import format_rollout

        vs = run_control(lambda: client(config_file, socket_path).rollout_status(name))
        if as_json:
            click.echo(json.dumps(vs if name is None else vs[0], indent=2))
        elif not vs:
            click.echo("no rollouts")
        else:
            click.echo("\n\n".join(format_rollout(v) for v in vs))

    def action(verb: str, doc: str) -> None:
        @control_options
        @click.argument("name", required=False)
        def cmd(config_file, socket_path, name) -> None:
            v = run_control(lambda: client(config_file, socket_path).rollout_action(verb, name))
            click.echo(
                f"rollout {v['name']}: {v['status']} at {v['share']}%"
                + (f": {v['reason']}" if v["reason"] else "")
            )

        cmd.__doc__ = doc
        rollout.command(verb)(cmd)

    action("pause", "Hold the current share (failed judgements still count and still roll back).")
    action("resume", "Continue a paused rollout (a new judgement window starts).")
    action("promote", "Skip to 100 now: the canary takes everything, the old pool is drained.")
    action("abort", "Roll back now: the canary's share goes to 0.")


def _register_switch(main: click.Group, control_options, client, run_control) -> None:
    @main.command()
    @control_options
    @click.argument("listener")
    @click.argument("route")
    @click.argument("pool", required=False)
    @click.option(
        "--drain-old", "drain_old", is_flag=True, help="Drain the old side within its drain_timeout."
    )
    @click.option(
        "--keep-old", "keep_old", is_flag=True, help="Let the old side's connections run on (default)."
    )
    @click.option("--back", is_flag=True, help="Switch back to the side that was live before.")
    def switch(config_file, socket_path, listener, route, pool, drain_old, keep_old, back) -> None:
        """Blue-green: send every new connection of ROUTE to POOL in one atomic publish (or --back)."""
        from fastlb.deploy.view import format_switch

        if drain_old and keep_old:
            click.echo("fastlb: --drain-old and --keep-old exclude each other", err=True)
            sys.exit(2)
        if back == (pool is not None):
            click.echo("fastlb: give POOL or --back (not both)", err=True)
            sys.exit(2)
        c = client(config_file, socket_path)
        s = run_control(lambda: c.switch(listener, route, pool, drain_old=drain_old, back=back))
        click.echo(format_switch(s))


def _wait(fn):
    """fn(), with an unknown pool/backend turned into a ControlError (exit 1 with its message)."""
    from fastlb.control import ControlError

    try:
        return fn()
    except KeyError as exc:
        raise ControlError(exc.args[0]) from None
