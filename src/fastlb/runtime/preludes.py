"""Publishing the connection-prelude settings (PROXY protocol, SNI peek) into the shared region."""

from __future__ import annotations

import socket

from fastlb._shm import Region
from fastlb.config import Config, ListenerConfig
from fastlb.config.prelude import PROXY_PROTOCOLS, SEND_PROXY, SNI_POLICIES


def publish_preludes(region: Region, cfg: Config, pool_index: dict[str, int]) -> None:
    """Write every listener's prelude fields and trusted-sender ranges, and every pool's send_proxy.
    Before the workers start (these are read-only afterwards)."""
    k = 0
    for i, lc in enumerate(cfg.listeners.values()):
        first = k
        for net in lc.proxy_protocol_from:
            fam = socket.AF_INET if net.version == 4 else socket.AF_INET6
            region.set_cidr(k, fam, net.network_address.packed, net.prefixlen)
            k += 1
        region.set_listener_prelude(
            i,
            PROXY_PROTOCOLS.index(lc.proxy_protocol),
            first,
            k - first,
            lc.needs_sni,
            int(lc.sni_timeout * 1000),
            SNI_POLICIES.index(lc.sni_policy),
        )
    for name, pc in cfg.pools.items():
        region.set_pool_send_proxy(pool_index[name], SEND_PROXY.index(pc.send_proxy))


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
    """The `preludes` part of a listener's status: its settings and the workers' counters."""
    return {
        "proxy_protocol": lc.proxy_protocol,
        "proxy_protocol_from": [str(n) for n in lc.proxy_protocol_from],
        "sni": lc.needs_sni,
        "sni_timeout": lc.sni_timeout,
        "sni_policy": lc.sni_policy,
        **{k: record[k] for k in PRELUDE_COUNTERS},
    }
