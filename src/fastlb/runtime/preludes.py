"""The connection preludes (PROXY protocol accept, TLS SNI peek) in `fastlb status`."""

from __future__ import annotations

from fastlb.config import ListenerConfig

PRELUDE_COUNTERS = (
    "proxy_accepted",
    "proxy_refused",
    "proxy_errors",
    "prelude_timeouts",
    "sni_found",
    "sni_missing",
    "sni_rejected",
)


def prelude_status(lc: ListenerConfig, record: dict) -> dict:
    """The `preludes` part of a listener's status: its settings and the workers' counters
    (Region.listener() record)."""
    return {
        "proxy_protocol": lc.proxy_protocol,
        "proxy_protocol_from": [str(n) for n in lc.proxy_protocol_from],
        "sni": lc.needs_sni,
        "sni_timeout": lc.sni_timeout,
        "sni_no_match": lc.sni_no_match,
        **{k: record[k] for k in PRELUDE_COUNTERS},
    }
