"""The `fastlb` command line: click commands only; each parses its arguments and calls the package."""

from __future__ import annotations

import sys

import click

from fastlb._version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastlb")
@click.option("--admin", "admin_url", metavar="URL", help="Drive a (remote) fastlb through its admin API.")
@click.option("--token-file", type=click.Path(), help="Bearer token for --admin (first line of the file).")
@click.option("--cafile", type=click.Path(), help="CA certificate(s) to verify an https:// admin API.")
@click.pass_context
def main(ctx: click.Context, admin_url: str | None, token_file: str | None, cafile: str | None) -> None:
    """fastlb: a Layer-4 (TCP and UDP) load balancer (Cython data plane, Python control plane)."""
    ctx.obj = {"admin": admin_url, "token_file": token_file, "cafile": cafile}


def _token(token_file: str | None) -> str | None:
    if token_file is None:
        return None
    from fastlb.fleet.client import read_token_file

    try:
        return read_token_file(token_file)
    except OSError as exc:
        click.echo(f"fastlb: --token-file {token_file}: {exc.strerror or exc}", err=True)
        sys.exit(2)


@main.command("check-config")
@click.argument("config_file", type=click.Path())
def check_config(config_file: str) -> None:
    """Validate CONFIG_FILE: exit 0 if it is good, 2 with one line naming file, key and problem if not."""
    from fastlb.config import ConfigError, load_config

    try:
        cfg = load_config(config_file)
    except ConfigError as exc:
        click.echo(f"fastlb: {exc}", err=True)
        sys.exit(2)
    admin = cfg.global_.admin
    if admin is not None and admin.token_file is not None:
        from fastlb.config.fleet import read_admin_token

        problem = None
        try:  # its owner and mode, as `fastlb serve` (running as this user) will check them
            read_admin_token(admin.token_file)
        except OSError as exc:
            problem = f"{admin.token_file}: {exc.strerror or exc}"
        except ValueError as exc:
            problem = str(exc)
        if problem is not None:
            click.echo(f"fastlb: {config_file}: global.admin_token_file: {problem}", err=True)
            sys.exit(2)
    n_backends = sum(len(p.backends) for p in cfg.pools.values())
    # a pool with `discover` gets its backends only when fastlb runs: name where they come from
    dns = [
        f"{p.discover.name.rstrip('.')} ({'SRV' if p.discover.kind == 'srv' else 'A/AAAA'}, pool {p.name})"
        for p in cfg.pools.values()
        if p.discover is not None
    ]
    backends = (
        f"{n_backends} static backends, backends from DNS: {', '.join(dns)}"
        if dns
        else f"{n_backends} backends"
    )
    click.echo(f"{config_file}: OK ({len(cfg.listeners)} listeners, {len(cfg.pools)} pools, {backends})")
    if admin is not None:
        from fastlb.config.fleet import describe_admin

        click.echo(describe_admin(admin))


def _setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s fastlb[{__import__('os').getpid()}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from fastlb.runtime.log_limit import install

    install()  # repeated identical lines: at most 5 per 10 s, then one with a count


def _load_or_exit(config_file: str):  # -> Config
    from fastlb.config import ConfigError, load_config

    try:
        return load_config(config_file)
    except ConfigError as exc:
        click.echo(f"fastlb: {exc}", err=True)
        sys.exit(2)


@main.command()
@click.option("-c", "--config", "config_file", required=True, type=click.Path(), help="TOML config file.")
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=None,
    help="Worker processes (default: config, else CPUs).",
)
@click.option(
    "--takeover",
    is_flag=True,
    help="Replace the fastlb running with this control socket: take its listening sockets, "
    "then let it drain (restart or upgrade without a refused connection).",
)
def serve(config_file: str, workers: int | None, takeover: bool) -> None:
    """Run the load balancer in the foreground until SIGTERM/SIGINT.

    Refuses to start (exit 1) if another fastlb answers on the control socket (unless --takeover)
    or a listener address is in use; takes over the orphaned workers of a crashed instance."""
    cfg = _load_or_exit(config_file)
    _setup_logging(cfg.global_.log_level)
    if cfg.global_.admin is None or cfg.global_.admin.tls_cert is None:
        _keep_openssl_out()  # an admin API over TLS needs asyncio's TLS support
    from fastlb.runtime.supervisor import serve as run

    sys.exit(run(cfg, workers, takeover))


def _keep_openssl_out() -> None:
    """The control process never speaks TLS, but asyncio imports ssl whenever it can, and that maps
    OpenSSL: about 4 MiB resident for nothing.  Import asyncio with ssl marked absent (asyncio
    supports that), then drop the mark so that an explicit `import ssl` later still works."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]


def _client(config_file: str | None, socket_path: str | None):  # -> ControlClient
    from fastlb.control import ControlClient

    opts = click.get_current_context().find_root().obj or {}
    if opts.get("admin"):
        from fastlb.fleet.client import AdminClient

        client = AdminClient(opts["admin"], _token(opts.get("token_file")), cafile=opts.get("cafile"))
    elif socket_path:
        client = ControlClient(socket_path)
    elif config_file:
        client = ControlClient(_load_or_exit(config_file).global_.control_socket)
    else:
        from fastlb.config import GlobalConfig

        client = ControlClient(GlobalConfig.control_socket)  # the default, /run/fastlb/control.sock
    # a change applied but not kept across a restart (the state file cannot be written): stderr
    client.on_warning = lambda text: click.echo(f"fastlb: warning: {text}", err=True)
    return client


def _control_options(f):
    f = click.option(
        "-c", "--config", "config_file", type=click.Path(), help="Config of the running fastlb."
    )(f)
    f = click.option(
        "--socket",
        "socket_path",
        type=click.Path(),
        help="Its control socket (default /run/fastlb/control.sock).",
    )(f)
    return f


def _run_control(action):  # call, turning ControlError into exit 1 with the reason
    from fastlb.control import ControlError

    try:
        return action()
    except ControlError as exc:
        click.echo(f"fastlb: {exc}", err=True)
        sys.exit(1)


@main.command()
@_control_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_file: str | None, socket_path: str | None, as_json: bool) -> None:
    """Show pools, backends, states, weights and counters of a running fastlb."""
    import json

    from fastlb.control import ControlError
    from fastlb.observe.status import format_status

    client = _client(config_file, socket_path)
    try:
        st = client.status()
    except ControlError as exc:
        click.echo(f"fastlb: {exc}", err=True)
        _explain_unreachable(getattr(client, "path", None), as_json)
        sys.exit(1)
    click.echo(json.dumps(st, indent=2) if as_json else format_status(st))


def _explain_unreachable(control_socket: str | None, as_json: bool) -> None:
    """After "cannot reach": a control process that is gone while its workers still serve, from the
    runtime file and their shared region (fastlb.observe.orphans)."""
    import json

    from fastlb.observe.orphans import format_orphans, orphan_report

    rep = orphan_report(control_socket) if control_socket else None
    if rep is not None:
        click.echo(json.dumps(rep, indent=2) if as_json else format_orphans(rep))


@main.command("set-weight", context_settings={"ignore_unknown_options": True})
@_control_options
@click.argument("pool")
@click.argument("backend")
@click.argument("weight")
def set_weight(
    config_file: str | None, socket_path: str | None, pool: str, backend: str, weight: str
) -> None:
    """Set BACKEND's weight in POOL (0..1000) on a running fastlb; new connections follow at once."""
    from fastlb.control import MAX_WEIGHT

    try:
        w = int(weight, 10)
    except ValueError:
        w = -1
    if not 0 <= w <= MAX_WEIGHT:
        click.echo(f"fastlb: weight must be an integer 0..{MAX_WEIGHT}, got {weight!r}", err=True)
        sys.exit(1)
    r = _run_control(lambda: _client(config_file, socket_path).set_weight(pool, backend, w))
    click.echo(f"{pool}/{backend}: weight {r['previous']} -> {r['weight']}")


def _admin_command(name: str, doc: str):
    @_control_options
    @click.argument("pool")
    @click.argument("backend")
    def cmd(config_file: str | None, socket_path: str | None, pool: str, backend: str) -> None:
        client = _client(config_file, socket_path)
        r = _run_control(lambda: getattr(client, name)(pool, backend))
        click.echo(f"{pool}/{backend}: {r['previous']} -> {r['admin']}")

    cmd.__doc__ = doc
    main.command(name)(cmd)


_admin_command("enable", "Put BACKEND back in service (ready).")
_admin_command("disable", "Put BACKEND in maintenance: no new connections.")


@main.command("set-split", context_settings={"ignore_unknown_options": True})
@_control_options
@click.argument("listener")
@click.argument("route")
@click.argument("weights", nargs=-1, required=True)
def set_split(
    config_file: str | None, socket_path: str | None, listener: str, route: str, weights: tuple[str, ...]
) -> None:
    """Set ROUTE's whole split on LISTENER: POOL=WEIGHT... (0..1000; pools left out get 0), in one
    atomic publish: every connection accepted after the reply goes by it.  E.g. v1=0 v2=100."""
    from fastlb.control import MAX_WEIGHT

    split: dict[str, int] = {}
    for arg in weights:
        pool, sep, text = arg.partition("=")
        try:
            w = int(text, 10) if sep and pool else -1
        except ValueError:
            w = -1
        if not 0 <= w <= MAX_WEIGHT:
            click.echo(f"fastlb: expected POOL=WEIGHT with a weight 0..{MAX_WEIGHT}, got {arg!r}", err=True)
            sys.exit(1)
        if pool in split:
            click.echo(f"fastlb: pool {pool!r} given twice", err=True)
            sys.exit(1)
        split[pool] = w
    r = _run_control(lambda: _client(config_file, socket_path).set_split(listener, route, split))

    def fmt(s: dict) -> str:
        return " ".join(f"{p}={w}" for p, w in s.items())

    click.echo(f"{listener}/{route}: {fmt(r['previous'])} -> {fmt(r['weights'])}")


def _register_deploy() -> None:
    from fastlb.deploy.cli import register

    register(main, _control_options, _client, _run_control)


_register_deploy()  # drain [--wait], wait, rollout, switch (fastlb.deploy.cli)


@main.command()
@_control_options
@click.option(
    "--timeout", type=click.FloatRange(1, 600), default=60.0, help="Seconds to wait for the new one."
)
def upgrade(config_file: str | None, socket_path: str | None, timeout: float) -> None:
    """Restart the running fastlb in place, dropping no connection: it starts `fastlb serve --takeover`
    (from the fastlb installed now) in its own service, which takes the listening sockets over; the
    old one drains.  Waits until the new instance answers on the control socket."""
    client = _client(config_file, socket_path)
    r = _run_control(client.upgrade)
    old, new = r["pid"], r["successor"]
    error = _wait_takeover(client, old, new, timeout)
    if error is not None:
        click.echo(f"fastlb: {error}", err=True)
        sys.exit(1)
    click.echo(f"upgraded: pid {old} -> {new}")


def _wait_takeover(client, old: int, new: int, timeout: float) -> str | None:
    """Wait until pid `new` answers on the control socket instead of `old`: None, or why it did
    not (the old instance's status says the new one gave up, or the time ran out)."""
    import time

    from fastlb.control import ControlError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st = client.status()
        except ControlError:  # the socket is being replaced: ask again
            st = {}
        if st.get("pid") == new:
            return None
        up = st.get("upgrade") or {}
        if st.get("pid") == old and up.get("successor") == new and up.get("error"):
            return f"pid {new} did not take over, pid {old} keeps running: {up['error']}"
        time.sleep(0.1)
    return f"pid {new} did not take over within {timeout:.0f}s (see the log)"


@main.command()
@_control_options
@click.option(
    "--timeout",
    type=click.FloatRange(1, 600),
    default=60.0,
    help="Seconds to wait for a takeover the reload starts.",
)
def reload(config_file: str | None, socket_path: str | None, timeout: float) -> None:
    """Re-read the running fastlb's config file; print what changed and how it was applied.

    Changes the running process cannot apply (new, removed or re-bound listeners, workers, new
    pools, ...) are applied by a takeover the reload starts ([global] reload_takeover); the command
    waits until the new instance answers.  Exit 0 when the new config was applied, 1 when it was
    refused (nothing changed), the takeover failed, or fastlb cannot be reached, 3 when it was
    applied except for changes that need a restart (reload_takeover = false)."""
    from fastlb.observe.status import format_reload

    client = _client(config_file, socket_path)
    r = _run_control(client.reload)
    click.echo(format_reload(r))
    if r.get("successor"):
        if r.get("control_socket") and getattr(client, "path", None) not in (None, r["control_socket"]):
            from fastlb.control import ControlClient

            client = ControlClient(r["control_socket"])  # the reload moved it
        error = _wait_takeover(client, r["pid"], r["successor"], timeout)
        if error is not None:
            click.echo(f"fastlb: reload: {error}", err=True)
            sys.exit(1)
        click.echo(f"taken over: pid {r['pid']} -> {r['successor']}")
    sys.exit(3 if r.get("needs_restart") else 0)


@main.command("drain-instance")
@_control_options
def drain_instance(config_file: str | None, socket_path: str | None) -> None:
    """Take this instance out of the fleet without stopping it: withdraw every announced address
    (announce = true); it keeps serving what still reaches it.  `undrain-instance` undoes it."""
    _instance_command("drain-instance", config_file, socket_path)


@main.command("undrain-instance")
@_control_options
def undrain_instance(config_file: str | None, socket_path: str | None) -> None:
    """Announce this instance's addresses again (each once usable for announce_rise)."""
    _instance_command("undrain-instance", config_file, socket_path)


def _instance_command(cmd: str, config_file: str | None, socket_path: str | None) -> None:
    r = _run_control(lambda: _client(config_file, socket_path).request({"cmd": cmd}))
    if not r.get("announce"):
        click.echo(f"{cmd}: {r.get('note', 'nothing announced')}")
        return
    for a in r["announce"]:
        state = "announced" if a["announced"] else "withdrawn"
        click.echo(f"{a['address']}: {state} ({a['reason']})")


@main.command()
@_control_options
@click.option("--interval", type=click.FloatRange(0.2, 60), default=1.0, help="Seconds between refreshes.")
def top(config_file: str | None, socket_path: str | None, interval: float) -> None:
    """Live view of a running fastlb: listeners, routes, pools, backends and their rates (q quits)."""
    from fastlb.observe.top import run_top

    client = _client(config_file, socket_path)
    sys.exit(_run_control(lambda: run_top(client.status, client.path, interval)))


@main.command()
@click.option("--seconds", type=click.FloatRange(0.5, 60), default=3.0, help="How long to send traffic.")
@click.option("--workers", type=click.IntRange(1, 64), default=2)
def demo(seconds: float, workers: int) -> None:
    """Start three local backends and fastlb in front of them (weights 5:3:2), send traffic, show the split."""
    from fastlb.demo import run_demo

    sys.exit(run_demo(seconds, workers))


@main.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "-f", "--hosts", "hosts_file", required=True, type=click.Path(), help="Admin URLs, one per line."
)
@click.option("--timeout", type=click.FloatRange(0.1, 600), default=10.0, help="Seconds per instance.")
@click.argument("operation")
@click.argument("args", nargs=-1)
@click.pass_context
def fleet(ctx: click.Context, hosts_file: str, timeout: float, operation: str, args: tuple[str, ...]) -> None:
    """Apply OPERATION (status, set-weight, drain, enable, disable, set-split, reload) to every instance
    listed in the hosts file, in parallel; one line per instance; exit 1 if any failed."""
    from fastlb.fleet import fanout

    opts = ctx.find_root().obj or {}
    try:
        hosts = fanout.read_hosts(hosts_file)
        request = fanout.build_request(operation, args)
    except (OSError, fanout.UsageError) as exc:
        click.echo(f"fastlb: {getattr(exc, 'strerror', None) or exc}", err=True)
        sys.exit(2)
    results = fanout.apply(hosts, request, _token(opts.get("token_file")), timeout, opts.get("cafile"))
    failed = 0
    for host, reply, error in results:
        if reply is not None:
            click.echo(f"{host}: ok {fanout.summary(operation, reply)}")
        else:
            failed += 1
            click.echo(f"{host}: FAILED {error}")
    click.echo(f"{len(results) - failed} of {len(results)} instances ok")
    sys.exit(1 if failed else 0)
