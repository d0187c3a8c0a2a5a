"""fastlb with its access log on (`[global] access_log` to a file in the run directory, json): the
same config as the `fastlb` target otherwise, so `--targets fastlb,fastlb-log` measures what the
log costs (the workers' ring writes and the control process draining them) in one interleaved run."""

from __future__ import annotations

from targets import fastlb as plain

NAME = "fastlb-log"
LABEL = "fastlb + access log"
ORDER = 51
BALANCER = True
DEFAULT = False  # only with --targets fastlb,fastlb-log (the access log's cost)


def command(suite, workers: int, ports: dict[str, int], run, env: dict[str, str]) -> list[str]:
    argv = plain.command(suite, workers, ports, run, env)
    cfg = suite.rundir / "fastlb.toml"
    text = cfg.read_text().replace(
        "[global]\n", f'[global]\naccess_log = "{suite.rundir}/access.log"\naccess_log_buffer = 65536\n', 1
    )
    cfg.write_text(text)
    return argv


def ready(run) -> None:
    plain.ready(run)
