"""HAProxy (configs/haproxy.cfg.tmpl): mode tcp, option splice-auto, nbthread = workers, round robin."""

from __future__ import annotations

from common import LOOPBACK, NOFILE_HARD_FALLBACK, render_template

NAME = "haproxy"
LABEL = "HAProxy"
ORDER = 20
BALANCER = True


def command(suite, workers: int, ports: dict[str, int], run, env: dict[str, str]) -> list[str]:
    s = suite.s
    maxconn = min(9500, s.idle_conns + 400)
    sections = []
    for pool, port in ports.items():
        sections.append(f"frontend {pool}\n    bind {LOOPBACK}:{port}\n    default_backend {pool}\n")
    for pool in ports:
        servers = "\n".join(f"    server b{i} {LOOPBACK}:{p}" for i, p in enumerate(suite.bp[pool]))
        sections.append(f"backend {pool}\n    balance roundrobin\n{servers}\n")
    cfg = render_template(
        "haproxy.cfg.tmpl",
        suite.rundir / "haproxy.cfg",
        workers=workers,
        maxconn=maxconn,
        # HAProxy reserves 2 fds per splice pipe (maxpipes defaults to maxconn/4): keep the total
        # under the 20,000 open-file limit; a few hundred pipes cover every non-idle workload here.
        maxpipes=max(64, (NOFILE_HARD_FALLBACK - 2 * maxconn - 200) // 2),
        rundir=suite.rundir,
        sections="\n".join(sections),
    )
    return ["haproxy", "-db", "-f", str(cfg)]
