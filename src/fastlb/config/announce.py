"""Configuration of VIP announcement (fleet/announce.py): `announce` in [global] and per listener,
and [global] announce_table, announce_protocol, announce_rise, announce_withdraw_delay."""

from __future__ import annotations

import ipaddress

from fastlb.config.model import Address, AnnounceConfig
from fastlb.config.values import _Table

ANNOUNCE_GLOBAL_KEYS = (
    "announce",
    "announce_table",
    "announce_protocol",
    "announce_rise",
    "announce_withdraw_delay",
)
ANNOUNCE_LISTENER_KEYS = ("announce",)
MAX_TABLE = 2**32 - 1
# rtm_protocol values a route of ours must not carry: unspec (0), redirect (1), kernel (2) and
# bird (12) are ignored or owned by the kernel and by BIRD themselves
_RESERVED_PROTOCOLS = {0: "unspec", 1: "redirect", 2: "kernel", 12: "bird"}
# tables the kernel itself uses (unspec, compat 252, default 253, main 254, local 255)
_RESERVED_TABLES = {0: "unspec", 252: "compat", 253: "default", 254: "main", 255: "local"}


def parse_announce(t: _Table) -> AnnounceConfig:
    """The [global] announce keys (defaults: off, table 200, protocol 4, rise 2s, withdraw delay 5s)."""
    d = AnnounceConfig()
    table = t.get_int("announce_table", d.table, 1, MAX_TABLE)
    if table in _RESERVED_TABLES:
        raise t.error(
            "announce_table", f"{table} is the kernel's {_RESERVED_TABLES[table]} table: choose another"
        )
    protocol = t.get_int("announce_protocol", d.protocol, 3, 255)
    if protocol in _RESERVED_PROTOCOLS:
        raise t.error(
            "announce_protocol",
            f"{protocol} is the {_RESERVED_PROTOCOLS[protocol]} protocol (a routing daemon ignores it): choose another",
        )
    return AnnounceConfig(
        default=t.get_bool("announce", d.default),
        table=table,
        protocol=protocol,
        rise=t.get_duration("announce_rise", d.rise),
        withdraw_delay=t.get_duration("announce_withdraw_delay", d.withdraw_delay),
    )


def listener_announce(t: _Table, bind: Address, default: bool) -> bool:
    """A listener's `announce` (else [global] announce): its bind address must be one host address,
    not a wildcard (0.0.0.0 or ::), which cannot be announced as a /32 or /128."""
    announce = t.get_bool("announce", default)
    if announce and ipaddress.ip_address(bind.host).is_unspecified:
        where = "announce" if "announce" in t.data else "bind"
        raise t.error(
            where,
            f"announce = true needs a specific bind address, not {bind} (set announce = false on this listener)",
        )
    return announce
