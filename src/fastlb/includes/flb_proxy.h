/* flb_proxy.h - PROXY protocol v1 (text) and v2 (binary): a parser and a writer.
 *
 * Pure C over caller-owned buffers: no allocation, no I/O, no global state.  The data plane
 * (core/prelude.pxi) and the libFuzzer harness (tests/fuzz/fuzz_proxy.c) compile this same file;
 * _prelude.pyx wraps it for the unit tests.  Specification: HAProxy's doc/proxy-protocol.txt.
 *
 * Contract of flb_proxy_parse(buf, len, out):
 *   > 0  a complete, valid header of that many bytes starts buf; *out describes it.  Bytes after it
 *        are the client's and are not looked at.
 *   0    every byte so far is a valid prefix of a header: read more and call again with the
 *        whole buffer (the parser keeps no state between calls).
 *   < 0  a negative errno, and the connection must be dropped:
 *          -EBADMSG   not a PROXY header at all (neither signature)
 *          -EINVAL    malformed (bad token, address, port, version, command, family, TLV bounds;
 *                     v2 PROXY: a family/transport byte other than 0x00, 0x11, 0x21, 0x31 - a
 *                     datagram or unspecified transport does not fit a stream listener)
 *          -EMSGSIZE  oversized (v1 longer than FLB_PP_V1_MAX, v2 longer than FLB_PP_V2_MAX)
 *   It reads only buf[0 .. len) (never past it, whatever the header claims) and writes only *out.
 *
 * Addresses: out->family is AF_INET or AF_INET6 when the header carries a TCP/UDP address the
 * receiver should use; 0 for v1 UNKNOWN, v2 LOCAL, v2 UNSPEC or AF_UNIX (use the real endpoints).
 * Addresses are in network order, ports in host order.
 */
#ifndef FLB_PROXY_H
#define FLB_PROXY_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/socket.h>

#define FLB_PP_V1_MAX   107          /* the spec's worst case, CRLF included */
#define FLB_PP_V2_MAX   4096         /* 16-byte fixed part + address block + TLVs; ours, documented */
#define FLB_PP_V2_HDR   16
#define FLB_PP_WRITE_MAX 108         /* room flb_proxy_write() ever needs (v1 worst case) */

typedef struct {
    uint8_t  version;                /* 1 or 2 */
    uint8_t  command;                /* 1 PROXY, 0 LOCAL (v2 only; v1 is always PROXY) */
    uint8_t  family;                 /* AF_INET, AF_INET6, or 0: use the real endpoints */
    uint8_t  transport;              /* v2 low nibble: 0 UNSPEC, 1 STREAM, 2 DGRAM; v1: 1 */
    uint16_t src_port;               /* host order */
    uint16_t dst_port;
    uint8_t  src_addr[16];           /* network order; IPv4 uses the first 4 bytes */
    uint8_t  dst_addr[16];
    uint16_t n_tlvs;                 /* v2 TLVs seen (and skipped) */
    uint16_t header_len;             /* the value returned */
} flb_proxy_result;

static const uint8_t FLB_PP_V2_SIG[12] = {
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A
};

/* 1 if buf[0 .. n) is a prefix of sig[0 .. siglen) (or sig a prefix of buf), else 0. */
static int flb_pp_prefix(const uint8_t *buf, size_t n, const uint8_t *sig, size_t siglen)
{
    return memcmp(buf, sig, n < siglen ? n : siglen) == 0;
}

/* Parse a decimal port of 1..5 digits, value 0..65535, in s[0 .. n).  Returns 0 or -EINVAL. */
static int flb_pp_port(const char *s, size_t n, uint16_t *out)
{
    uint32_t v = 0;
    size_t i;
    if (n == 0 || n > 5)
        return -EINVAL;
    if (n > 1 && s[0] == '0')
        return -EINVAL;              /* no leading zeros: one spelling per value */
    for (i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -EINVAL;
        v = v * 10 + (uint32_t)(s[i] - '0');
    }
    if (v > 65535)
        return -EINVAL;
    *out = (uint16_t)v;
    return 0;
}

/* Parse an address literal of `family` in s[0 .. n) into out (4 or 16 bytes).  0 or -EINVAL. */
static int flb_pp_addr(int family, const char *s, size_t n, uint8_t *out)
{
    char tmp[48];                    /* the longest IPv6 literal is 45 characters */
    if (n == 0 || n >= sizeof(tmp))
        return -EINVAL;
    memcpy(tmp, s, n);
    tmp[n] = '\0';
    return inet_pton(family, tmp, out) == 1 ? 0 : -EINVAL;
}

/* v1: "PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n" or "PROXY UNKNOWN[ anything]\r\n". */
static int flb_pp_parse_v1(const uint8_t *buf, size_t len, flb_proxy_result *out)
{
    static const char sig[] = "PROXY ";
    const char *s = (const char *)buf;
    const char *tok[5];
    size_t tlen[5];
    size_t end, i, pos, limit = len < FLB_PP_V1_MAX ? len : FLB_PP_V1_MAX;
    int family, ntok = 0;

    /* find the LF within the first FLB_PP_V1_MAX bytes; any CR must be its predecessor */
    for (end = 0; end < limit; end++) {
        if (buf[end] == '\n')
            break;
        if (buf[end] == '\r' && end + 1 < len && buf[end + 1] != '\n')
            return -EINVAL;
        if (buf[end] == 0)
            return -EINVAL;          /* v1 is text */
    }
    if (end == limit)
        return len >= FLB_PP_V1_MAX ? -EMSGSIZE : 0;
    if (end < 7 || buf[end - 1] != '\r')
        return -EINVAL;
    end -= 1;                        /* s[0 .. end) is the line without CRLF */
    if (memcmp(s, sig, 6) != 0)
        return -EBADMSG;

    memset(out, 0, sizeof(*out));
    out->version = 1;
    out->command = 1;
    out->transport = 1;
    out->header_len = (uint16_t)(end + 2);

    pos = 6;
    if (end - pos >= 7 && memcmp(s + pos, "UNKNOWN", 7) == 0 && (end - pos == 7 || s[pos + 7] == ' '))
        return (int)(end + 2);       /* the receiver ignores the rest of the line */
    if (end - pos < 4 || memcmp(s + pos, "TCP", 3) != 0)
        return -EINVAL;
    if (s[pos + 3] == '4')
        family = AF_INET;
    else if (s[pos + 3] == '6')
        family = AF_INET6;
    else
        return -EINVAL;
    pos += 4;
    /* exactly four fields, each preceded by exactly one space */
    while (pos < end) {
        if (s[pos] != ' ' || ntok == 4)
            return -EINVAL;
        pos++;
        i = pos;
        while (i < end && s[i] != ' ')
            i++;
        if (i == pos)
            return -EINVAL;
        tok[ntok] = s + pos;
        tlen[ntok] = i - pos;
        ntok++;
        pos = i;
    }
    if (ntok != 4)
        return -EINVAL;
    if (flb_pp_addr(family, tok[0], tlen[0], out->src_addr) < 0
            || flb_pp_addr(family, tok[1], tlen[1], out->dst_addr) < 0
            || flb_pp_port(tok[2], tlen[2], &out->src_port) < 0
            || flb_pp_port(tok[3], tlen[3], &out->dst_port) < 0)
        return -EINVAL;
    out->family = (uint8_t)family;
    return (int)(end + 2);
}

/* v2: 12-byte signature, ver_cmd, fam, 16-bit big-endian length, address block, TLVs. */
static int flb_pp_parse_v2(const uint8_t *buf, size_t len, flb_proxy_result *out)
{
    size_t body, total, need = 0, off;
    uint8_t ver_cmd, fam, af, tp;
    uint16_t tlvs = 0;

    if (len < FLB_PP_V2_HDR)
        return 0;
    ver_cmd = buf[12];
    fam = buf[13];
    body = ((size_t)buf[14] << 8) | buf[15];
    total = FLB_PP_V2_HDR + body;
    if ((ver_cmd & 0xF0) != 0x20)
        return -EINVAL;
    if ((ver_cmd & 0x0F) > 1)
        return -EINVAL;              /* only LOCAL (0) and PROXY (1) exist */
    af = fam >> 4;
    tp = fam & 0x0F;
    /* The spec's family/transport byte: 0x00 UNSPEC, 0x11 TCP4, 0x12 UDP4, 0x21 TCP6, 0x22 UDP6,
     * 0x31 UNIX_STREAM, 0x32 UNIX_DGRAM; every other value "must be rejected as invalid".  This
     * parser serves stream listeners: a PROXY header announcing a datagram transport (0x12, 0x22,
     * 0x32) describes a connection that cannot be this one, so it is malformed here too.  LOCAL
     * "discards the protocol block including the family, which is ignored": any byte, body skipped. */
    if ((ver_cmd & 0x0F) == 1 && fam != 0x00 && fam != 0x11 && fam != 0x21 && fam != 0x31)
        return -EINVAL;
    if ((ver_cmd & 0x0F) == 0)
        af = 0;
    if (total > FLB_PP_V2_MAX)
        return -EMSGSIZE;
    if (len < total)
        return 0;

    memset(out, 0, sizeof(*out));
    out->version = 2;
    out->command = ver_cmd & 0x0F;
    out->transport = tp;
    out->header_len = (uint16_t)total;
    if (af == 1)
        need = 12;
    else if (af == 2)
        need = 36;
    else if (af == 3)
        need = 216;
    if (body < need)
        return -EINVAL;              /* the address block does not fit the length */
    if (out->command == 1 && (af == 1 || af == 2)) {
        const uint8_t *a = buf + FLB_PP_V2_HDR;
        size_t alen = af == 1 ? 4 : 16;
        memcpy(out->src_addr, a, alen);
        memcpy(out->dst_addr, a + alen, alen);
        out->src_port = (uint16_t)((a[2 * alen] << 8) | a[2 * alen + 1]);
        out->dst_port = (uint16_t)((a[2 * alen + 2] << 8) | a[2 * alen + 3]);
        out->family = af == 1 ? AF_INET : AF_INET6;
    }
    /* TLVs: type (1), length (2, big endian), value; each must fit inside the header.  A LOCAL or
     * UNSPEC header's body is ignored whole (the spec: the receiver skips it). */
    off = out->command == 1 && af != 0 ? FLB_PP_V2_HDR + need : total;
    while (off < total) {
        size_t vlen;
        if (total - off < 3)
            return -EINVAL;
        vlen = ((size_t)buf[off + 1] << 8) | buf[off + 2];
        if (vlen > total - off - 3)
            return -EINVAL;
        off += 3 + vlen;
        tlvs++;
    }
    out->n_tlvs = tlvs;
    return (int)total;
}

static int flb_proxy_parse(const uint8_t *buf, size_t len, flb_proxy_result *out)
{
    if (len == 0)
        return 0;
    if (buf[0] == 'P')
        return flb_pp_prefix(buf, len, (const uint8_t *)"PROXY ", 6)
               ? (len < 6 ? 0 : flb_pp_parse_v1(buf, len, out)) : -EBADMSG;
    if (buf[0] == 0x0D) {
        if (!flb_pp_prefix(buf, len, FLB_PP_V2_SIG, sizeof(FLB_PP_V2_SIG)))
            return -EBADMSG;
        return len < sizeof(FLB_PP_V2_SIG) ? 0 : flb_pp_parse_v2(buf, len, out);
    }
    return -EBADMSG;
}

/* Write a PROXY header announcing hdr's addresses (family AF_INET/AF_INET6, or 0 for "UNKNOWN" /
 * v2 LOCAL) into out[0 .. cap).  version 1 = text, 2 = binary (no TLVs).  Returns the bytes
 * written (at most FLB_PP_WRITE_MAX), or -ENOSPC when cap is too small, -EINVAL for a bad
 * version or family.  Writes only out. */
static int flb_proxy_write(int version, const flb_proxy_result *hdr, uint8_t *out, size_t cap)
{
    size_t alen, n;
    if (hdr->family != 0 && hdr->family != AF_INET && hdr->family != AF_INET6)
        return -EINVAL;
    if (version == 1) {
        char src[INET6_ADDRSTRLEN], dst[INET6_ADDRSTRLEN], line[FLB_PP_WRITE_MAX + 8];
        int k;
        if (hdr->family == 0) {
            k = 15;
            memcpy(line, "PROXY UNKNOWN\r\n", 15);
        } else {
            if (inet_ntop(hdr->family, hdr->src_addr, src, sizeof(src)) == NULL
                    || inet_ntop(hdr->family, hdr->dst_addr, dst, sizeof(dst)) == NULL)
                return -EINVAL;
            /* the spec's worst case is 104 bytes of text plus CRLF: line cannot overflow */
            k = snprintf(line, sizeof(line), "PROXY TCP%c %s %s %u %u\r\n",
                         hdr->family == AF_INET ? '4' : '6', src, dst,
                         (unsigned)hdr->src_port, (unsigned)hdr->dst_port);
            if (k < 0 || (size_t)k >= sizeof(line))
                return -EINVAL;
        }
        if ((size_t)k > cap)
            return -ENOSPC;
        memcpy(out, line, (size_t)k);
        return k;
    }
    if (version != 2)
        return -EINVAL;
    alen = hdr->family == AF_INET ? 4 : hdr->family == AF_INET6 ? 16 : 0;
    n = FLB_PP_V2_HDR + (alen ? 2 * alen + 4 : 0);
    if (n > cap)
        return -ENOSPC;
    memcpy(out, FLB_PP_V2_SIG, sizeof(FLB_PP_V2_SIG));
    if (alen == 0) {
        out[12] = 0x20;              /* v2, LOCAL */
        out[13] = 0x00;              /* UNSPEC */
        out[14] = 0;
        out[15] = 0;
        return (int)n;
    }
    out[12] = 0x21;                  /* v2, PROXY */
    out[13] = hdr->family == AF_INET ? 0x11 : 0x21;  /* TCP over IPv4 / IPv6 */
    out[14] = (uint8_t)((n - FLB_PP_V2_HDR) >> 8);
    out[15] = (uint8_t)(n - FLB_PP_V2_HDR);
    memcpy(out + 16, hdr->src_addr, alen);
    memcpy(out + 16 + alen, hdr->dst_addr, alen);
    out[16 + 2 * alen] = (uint8_t)(hdr->src_port >> 8);
    out[17 + 2 * alen] = (uint8_t)hdr->src_port;
    out[18 + 2 * alen] = (uint8_t)(hdr->dst_port >> 8);
    out[19 + 2 * alen] = (uint8_t)hdr->dst_port;
    return (int)n;
}

#endif
