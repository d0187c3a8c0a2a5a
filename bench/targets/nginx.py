"""nginx stream (configs/nginx_stream.conf.tmpl): worker_processes = workers, reuseport listeners,
round robin (nginx's default)."""

from __future__ import annotations

from common import LOOPBACK, NOFILE_HARD_FALLBACK, render_template

NAME = "nginx"
LABEL = "nginx stream"
ORDER = 30
BALANCER = True
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def command(suite, workers: int, ports: dict[str, int], run, env: dict[str, str]) -> list[str]:
    blocks = []
    for pool in ports:
        servers = "\n".join(f"        server {LOOPBACK}:{p};" for p in suite.bp[pool])
        blocks.append(f"    upstream {pool} {{\n{servers}\n    }}")
    for pool, port in ports.items():
        blocks.append(
            f"    server {{\n        listen {LOOPBACK}:{port} reuseport;\n        proxy_pass {pool};\n    }}"
        )
    cfg = render_template(
        "nginx_stream.conf.tmpl",
        suite.rundir / "nginx-stream.conf",
        stream_module=STREAM_MODULE,
        workers=workers,
        nofile=NOFILE_HARD_FALLBACK,
        worker_connections=NOFILE_HARD_FALLBACK - 200,
        rundir=suite.rundir,
        blocks="\n".join(blocks),
    )
    return [
        "nginx",
        "-p",
        str(suite.rundir),
        "-c",
        str(cfg),
        "-e",
        str(suite.rundir / "nginx-stream-error.log"),
    ]
