"""The pure-C prelude parsers (includes/flb_proxy.h, includes/flb_tls.h) through fastlb._prelude.

Real inputs (ClientHellos made by Python's ssl module, headers HAProxy's spec describes) plus
hypothesis properties: every prefix of a valid input "needs more", never a wrong answer; any
re-fragmentation into TLS records gives the same name; random bytes never crash.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlb import _prelude as P
from support.preludes import V2_FAMILIES, v2_accepted_on_tcp, v2_header

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


@functools.cache
def client_hello(server_name: str | None, *, tls13: bool = True) -> bytes:
    """The first flight a real Python ssl client sends (one ClientHello, usually one record)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if not tls13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def refragment(hello: bytes, sizes: list[int]) -> bytes:
    """Re-split the handshake stream of `hello` into TLS records of the given payload sizes."""
    stream = b""
    off = 0
    while off < len(hello):
        n = struct.unpack("!H", hello[off + 3 : off + 5])[0]
        stream += hello[off + 5 : off + 5 + n]
        off += 5 + n
    out = b""
    i = 0
    k = 0
    while i < len(stream):
        n = max(1, sizes[k % len(sizes)]) if sizes else len(stream)
        out += b"\x16\x03\x01" + struct.pack("!H", len(stream[i : i + n])) + stream[i : i + n]
        i += n
        k += 1
    return out


# ---------------------------------------------------------------------------------------------------
# PROXY v1


@pytest.mark.parametrize(
    "line,src,dst",
    [
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n", ("192.0.2.1", 56324), ("198.51.100.2", 443)),
        (b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n", ("2001:db8::1", 1), ("::1", 65535)),
        (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 0\r\n", ("0.0.0.0", 0), ("255.255.255.255", 0)),
    ],
)
def test_v1_valid(line: bytes, src: tuple, dst: tuple) -> None:
    rc, info = P.parse_proxy(line + b"\x16\x03\x01 client bytes")
    assert rc == len(line)
    assert info["version"] == 1 and info["src"] == src and info["dst"] == dst


def test_v1_unknown_uses_the_real_endpoints() -> None:
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
        rc, info = P.parse_proxy(line + b"x")
        assert rc == len(line) and info["family"] == 0 and info["src"] is None


def test_v1_worst_case_fits_and_one_more_byte_is_oversized() -> None:
    a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {a} {a} 65535 65535\r\n".encode()
    assert len(line) == 104
    assert P.parse_proxy(line)[0] == 104
    line = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(line) == 107 and P.parse_proxy(line)[0] == 107
    assert P.parse_proxy(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n")[0] == -errno.EMSGSIZE
    assert P.parse_proxy(b"PROXY UNKNOWN " + b"x" * 200)[0] == -errno.EMSGSIZE


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF without CR
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",  # two spaces
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # a field missing
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",  # one too many
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",  # family mismatch
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY \r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n",
    ],
)
def test_v1_malformed(line: bytes) -> None:
    assert P.parse_proxy(line)[0] == -errno.EINVAL


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"PROXZ", b"proxy "])
def test_not_a_proxy_header(data: bytes) -> None:
    assert P.parse_proxy(data)[0] == -errno.EBADMSG


# ---------------------------------------------------------------------------------------------------
# PROXY v2


def v2(cmd: int, fam: int, body: bytes) -> bytes:
    return V2_SIG + bytes([0x20 | cmd, fam]) + struct.pack("!H", len(body)) + body


def test_v2_tcp4_tcp6_with_tlvs_skipped() -> None:
    body = socket.inet_aton("10.1.2.3") + socket.inet_aton("10.9.9.9") + struct.pack("!HH", 4000, 443)
    tlvs = b"\x01\x00\x02h2" + b"\xea\x00\x05vpc-1" + b"\x04\x00\x00"  # ALPN, AWS, NOOP (empty)
    hdr = v2(1, 0x11, body + tlvs)
    rc, info = P.parse_proxy(hdr + b"payload")
    assert rc == len(hdr) and info["src"] == ("10.1.2.3", 4000) and info["dst"] == ("10.9.9.9", 443)
    assert info["n_tlvs"] == 3
    body6 = socket.inet_pton(socket.AF_INET6, "2001:db8::7") + socket.inet_pton(socket.AF_INET6, "::1")
    hdr = v2(1, 0x21, body6 + struct.pack("!HH", 1, 2))
    rc, info = P.parse_proxy(hdr)
    assert rc == 52 and info["src"] == ("2001:db8::7", 1) and info["family"] == socket.AF_INET6


def test_v2_local_unspec_and_unix_use_the_real_endpoints() -> None:
    for hdr in (
        v2(0, 0x00, b""),
        v2(0, 0x11, b"\x00" * 12),
        v2(1, 0x00, b"junk"),
        v2(1, 0x31, b"\x00" * 216),
    ):
        rc, info = P.parse_proxy(hdr)
        assert rc == len(hdr) and info["family"] == 0 and info["src"] is None


@pytest.mark.parametrize(
    "hdr",
    [
        V2_SIG + b"\x11\x11\x00\x0c" + b"\x00" * 12,  # version 1 in a v2 header
        V2_SIG + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # command 2
        V2_SIG + b"\x21\x41\x00\x0c" + b"\x00" * 12,  # family 4
        V2_SIG + b"\x21\x13\x00\x0c" + b"\x00" * 12,  # transport 3
        V2_SIG + b"\x21\x11\x00\x0b" + b"\x00" * 11,  # address block too short
        V2_SIG + b"\x21\x21\x00\x0c" + b"\x00" * 12,  # IPv6 in 12 bytes
        V2_SIG + b"\x21\x11\x00\x0e" + b"\x00" * 12 + b"\x01\x00",  # truncated TLV header
        V2_SIG + b"\x21\x11\x00\x10" + b"\x00" * 12 + b"\x01\x00\x09x",  # TLV longer than the header
    ],
)
def test_v2_malformed(hdr: bytes) -> None:
    assert P.parse_proxy(hdr)[0] == -errno.EINVAL


def test_v2_oversized_is_refused_before_it_arrives() -> None:
    body = b"\x00" * 12 + b"\x04" + struct.pack("!H", P.PP_V2_MAX) + b"\x00" * P.PP_V2_MAX
    assert P.parse_proxy(v2(1, 0x11, body)[:40])[0] == -errno.EMSGSIZE
    ok = b"\x00" * 12 + b"\x04" + struct.pack("!H", P.PP_V2_MAX - 16 - 15) + b"\x00" * (P.PP_V2_MAX - 31)
    assert P.parse_proxy(v2(1, 0x11, ok))[0] == P.PP_V2_MAX


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    "src,dst", [(("127.0.0.5", 40000), ("127.0.0.1", 8443)), (("2001:db8::5", 1), ("::1", 65535))]
)
def test_write_then_parse_round_trips(version: int, src: tuple, dst: tuple) -> None:
    hdr = P.write_proxy(version, src, dst)
    rc, info = P.parse_proxy(hdr)
    assert rc == len(hdr) and info["version"] == version and info["src"] == src and info["dst"] == dst
    for n in range(len(hdr)):
        assert P.parse_proxy(hdr[:n])[0] == 0, n  # every prefix needs more, none is wrong


def test_write_unknown() -> None:
    assert P.write_proxy(1) == b"PROXY UNKNOWN\r\n"
    assert P.write_proxy(2) == V2_SIG + b"\x20\x00\x00\x00"


@settings(max_examples=300, deadline=None)
@given(
    st.ip_addresses(),
    st.ip_addresses(),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.sampled_from([1, 2]),
    st.binary(max_size=64),
)
def test_property_round_trip(a, b, sp: int, dp: int, version: int, tail: bytes) -> None:
    if a.version != b.version:
        b = a
    hdr = P.write_proxy(version, (str(a), sp), (str(b), dp))
    rc, info = P.parse_proxy(hdr + tail)
    assert rc == len(hdr)
    assert (ipaddress.ip_address(info["src"][0]), info["src"][1]) == (a, sp)
    assert (ipaddress.ip_address(info["dst"][0]), info["dst"][1]) == (b, dp)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=200).map(lambda b: V2_SIG + b)))
def test_property_random_bytes_never_crash(data: bytes) -> None:
    rc, info = P.parse_proxy(data)
    assert rc <= len(data)
    if rc > 0:
        assert info["header_len"] == rc
        assert P.parse_proxy(data[:rc])[0] == rc  # the header alone parses the same
    assert rc in (0, -errno.EBADMSG, -errno.EINVAL, -errno.EMSGSIZE) or rc > 0


# ---------------------------------------------------------------------------------------------------
# TLS ClientHello server_name


@pytest.mark.parametrize("tls13", [True, False])
def test_sni_of_real_client_hellos(tls13: bool) -> None:
    hello = client_hello("Admin.Example.COM", tls13=tls13)
    assert P.parse_sni(hello) == ("found", "admin.example.com")
    assert P.parse_sni(hello + b"\x17\x03\x03\x00\x05early") == ("found", "admin.example.com")
    assert P.parse_sni(client_hello(None, tls13=tls13)) == ("no_sni", None)


def test_every_prefix_needs_more() -> None:
    hello = client_hello("a.example.com")
    results = {P.parse_sni(hello[:n])[0] for n in range(len(hello))}
    # the name can be complete before the rest of the ClientHello: "found" may come early
    assert results <= {"need_more", "found"}
    sni_end = hello.index(b"a.example.com") + len(b"a.example.com")
    assert P.parse_sni(hello[: sni_end - 1])[0] == "need_more"
    assert P.parse_sni(hello[:sni_end]) == ("found", "a.example.com")


@pytest.mark.parametrize("sizes", [[1], [2, 3], [7], [100], [16384]])
def test_sni_across_records(sizes: list[int]) -> None:
    data = refragment(client_hello("split.example.com"), sizes)
    assert P.parse_sni(data) == ("found", "split.example.com")
    assert {P.parse_sni(data[:n])[0] for n in range(0, len(data), 13)} <= {"need_more", "found"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 600), min_size=1, max_size=8), st.sampled_from(["x.io", "b.example.org"]))
def test_property_any_record_split(sizes: list[int], name: str) -> None:
    assert P.parse_sni(refragment(client_hello(name), sizes)) == ("found", name)


def test_not_tls() -> None:
    for data in (b"GET / HTTP/1.1\r\n", b"\x80\x2e\x01\x03\x01", b"\x16\x02", b"\x16\x03\x09", b"SSH-2.0"):
        assert P.parse_sni(data)[0] == "not_tls", data


def test_malformed_and_too_big() -> None:
    hello = bytearray(client_hello("m.example.com"))
    assert P.parse_sni(b"\x16\x03\x01\x00\x00")[0] == "malformed"  # empty record
    assert P.parse_sni(b"\x16\x03\x01\x40\x01")[0] == "malformed"  # record > 2^14
    assert P.parse_sni(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00")[0] == "malformed"  # server_hello
    bad = bytearray(hello)
    bad[5 + 4 + 34] = 33  # session id length 33
    assert P.parse_sni(bytes(bad))[0] == "malformed"
    # scratch too small for a ClientHello that spans records
    assert P.parse_sni(refragment(bytes(hello), [50]), scratch_cap=64)[0] == "too_big"
    assert P.parse_sni(bytes(hello), name_cap=5)[0] == "too_big"


def test_oversized_client_hello_with_padding_still_names() -> None:
    """A ClientHello over 16 KiB (padding after the SNI) over two records: the name is found."""
    hello = client_hello("big.example.com")
    body = hello[5:]
    # append a padding extension (21) of 17000 bytes and fix the lengths
    pad = struct.pack("!HH", 21, 17000) + b"\x00" * 17000
    hs_len = int.from_bytes(body[1:4], "big") + len(pad)
    ext_off = None
    # walk to the extensions length
    p = 4 + 34
    p += 1 + body[p]
    p += 2 + int.from_bytes(body[p : p + 2], "big")
    p += 1 + body[p]
    ext_off = p
    ext_len = int.from_bytes(body[p : p + 2], "big") + len(pad)
    new = body[:1] + hs_len.to_bytes(3, "big") + body[4:ext_off] + ext_len.to_bytes(2, "big")
    new += body[ext_off + 2 :] + pad
    data = refragment(b"".join([b"\x16\x03\x01" + struct.pack("!H", len(new)) + new]), [16384])
    assert len(data) > 16384
    assert P.parse_sni(data) == ("found", "big.example.com")
    assert P.parse_sni(data[:16384]) == ("found", "big.example.com")


@settings(max_examples=1500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=400),
        st.binary(max_size=400).map(lambda b: b"\x16\x03\x01" + b),
        st.integers(1, 2000).map(lambda n: client_hello("f.example.com")[:n]),  # real, truncated
    )
)
def test_property_random_tls_bytes_never_crash(data) -> None:
    rc = P.parse_sni(bytes(data))
    assert rc[0] in P.SNI_RESULTS.values()


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255))
def test_property_flipped_byte(pos: int, val: int) -> None:
    hello = bytearray(HELLO)
    hello[pos % len(hello)] = val
    res, name = P.parse_sni(bytes(hello))
    assert res in P.SNI_RESULTS.values()
    if res == "found":
        assert name and name.isascii() and name == name.lower()


HELLO = client_hello("flip.example.com")


# ---------------------------------------------------------------------------------------------------
# issue 24, item 9: every family/transport byte of a v2 header, on a stream (TCP) listener


@pytest.mark.parametrize("command", [0, 1], ids=["LOCAL", "PROXY"])
def test_v2_every_family_transport_byte(command: int) -> None:
    """All 256 values of byte 14, for LOCAL and PROXY: accepted exactly as the spec says for a TCP
    listener (PROXY: UNSPEC, TCP4, TCP6, UNIX_STREAM; UDP4 0x12, UDP6, UNIX_DGRAM and every undefined
    value are malformed; LOCAL ignores the byte).  Refused headers are refused from their first 16
    bytes, before the body arrives."""
    wrong = []
    for fam in range(256):
        hdr = v2_header(command, fam)
        rc, info = P.parse_proxy(hdr + b"data")
        want = v2_accepted_on_tcp(command, fam)
        if want:
            ok = rc == len(hdr) and (
                info["family"] == {0x11: socket.AF_INET, 0x21: socket.AF_INET6}.get(fam, 0)
                if command
                else info["family"] == 0
            )
        else:
            ok = rc == -errno.EINVAL and P.parse_proxy(hdr[:16])[0] == -errno.EINVAL
        if not ok:
            wrong.append(f"{V2_FAMILIES.get(fam, hex(fam))}: rc {rc}, want {'accept' if want else 'EINVAL'}")
    assert not wrong, wrong


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 1), st.integers(0, 255), st.binary(max_size=260), st.binary(max_size=32))
def test_property_v2_family_byte_decides(command: int, fam: int, body: bytes, tail: bytes) -> None:
    """Any v2 header: a PROXY one whose family byte does not fit a TCP listener is never accepted,
    whatever its body; an accepted one is exactly its announced length."""
    hdr = v2_header(command, fam, body)
    rc, info = P.parse_proxy(hdr + tail)
    if not v2_accepted_on_tcp(command, fam):
        assert rc == -errno.EINVAL
    elif command == 0:
        assert rc == len(hdr) and info["family"] == 0  # LOCAL: the body is skipped whole
    else:
        assert rc in (len(hdr), -errno.EINVAL)  # a short address block or bad TLVs are malformed
