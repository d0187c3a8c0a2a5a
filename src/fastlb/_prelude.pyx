# cython: language_level=3
# _prelude.pyx - thin Python wrappers over the data plane's pure-C prelude parsers (flb_proxy.h,
# flb_tls.h), for the unit and property tests.  Not used by the data plane or the control process:
# the workers call the same C functions directly (core/prelude.pxi).

from libc.stdint cimport uint8_t
from libc.string cimport memcpy, memset

from flb_prelude cimport *

import socket

PP_V1_MAX = FLB_PP_V1_MAX
PP_V2_MAX = FLB_PP_V2_MAX
SNI_SCRATCH = 16384
SNI_RESULTS = {
    FLB_SNI_FOUND: "found",
    FLB_SNI_NEED_MORE: "need_more",
    FLB_SNI_NOT_TLS: "not_tls",
    FLB_SNI_NO_SNI: "no_sni",
    FLB_SNI_MALFORMED: "malformed",
    FLB_SNI_TOO_BIG: "too_big",
}


def parse_proxy(bytes data):
    """flb_proxy_parse() on `data`: (rc, info).

    rc > 0 is the header length and info a dict (version, command, family as socket.AF_* or 0,
    transport, src, dst as (host, port) or None, n_tlvs); rc == 0 needs more bytes; rc < 0 is
    -errno (info None).
    """
    cdef flb_proxy_result r
    cdef const uint8_t *buf = data
    cdef size_t n = len(data)
    cdef int rc
    memset(&r, 0, sizeof(r))
    with nogil:
        rc = flb_proxy_parse(buf, n, &r)
    if rc <= 0:
        return rc, None
    src = dst = None
    if r.family != 0:
        n = 4 if r.family == socket.AF_INET else 16
        src = (socket.inet_ntop(r.family, bytes(r.src_addr[:n])), r.src_port)
        dst = (socket.inet_ntop(r.family, bytes(r.dst_addr[:n])), r.dst_port)
    return rc, {
        "version": r.version,
        "command": r.command,
        "family": r.family,
        "transport": r.transport,
        "src": src,
        "dst": dst,
        "n_tlvs": r.n_tlvs,
        "header_len": r.header_len,
    }


def write_proxy(int version, src=None, dst=None):
    """flb_proxy_write(): the header announcing src -> dst ((host, port) pairs of one family), or
    v1 "UNKNOWN" / v2 LOCAL when they are None.  Raises ValueError on a negative return."""
    cdef flb_proxy_result r
    cdef uint8_t out[FLB_PP_WRITE_MAX]
    cdef int rc
    cdef bytes a, b
    memset(&r, 0, sizeof(r))
    if src is not None:
        fam = socket.AF_INET6 if ":" in src[0] else socket.AF_INET
        a = socket.inet_pton(fam, src[0])
        b = socket.inet_pton(fam, dst[0])
        r.family = fam
        memcpy(r.src_addr, <const uint8_t *>a, len(a))
        memcpy(r.dst_addr, <const uint8_t *>b, len(b))
        r.src_port = src[1]
        r.dst_port = dst[1]
    rc = flb_proxy_write(version, &r, out, sizeof(out))
    if rc < 0:
        raise ValueError(f"flb_proxy_write returned {rc}")
    return bytes(out[:rc])


def parse_sni(bytes data, int scratch_cap=SNI_SCRATCH, int name_cap=256):
    """flb_sni_parse() on `data`: (result name, server name or None)."""
    cdef const uint8_t *buf = data
    cdef bytearray scratch = bytearray(max(scratch_cap, 1))
    cdef uint8_t *sp = scratch
    cdef char name[512]
    cdef size_t name_len = 0
    cdef size_t n = len(data)
    cdef int rc
    if name_cap > 512:
        name_cap = 512
    with nogil:
        rc = flb_sni_parse(buf, n, sp, scratch_cap, name, name_cap, &name_len)
    if rc == FLB_SNI_FOUND:
        return "found", name[:name_len].decode("ascii")
    return SNI_RESULTS[rc], None
