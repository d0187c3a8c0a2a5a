/* flb_tls.h - find the server_name (SNI) in a TLS ClientHello without terminating TLS.
 *
 * Pure C over caller-owned buffers: no allocation, no I/O, no global state; compiled into the data
 * plane (core/prelude.pxi), into the libFuzzer harness (tests/fuzz/fuzz_sni.c) and into
 * _prelude.pyx for the unit tests.  References: RFC 8446 §5.1 (records), §4.1.2 (ClientHello),
 * RFC 6066 §3 (server_name).
 *
 * Contract of flb_sni_parse(buf, len, scratch, scratch_cap, name, name_cap, name_len):
 *   buf[0 .. len) is what the client sent so far.  The ClientHello handshake message may be split
 *   over several TLS records (each <= 16384 bytes) and over any number of reads: call again with the
 *   whole, longer buffer (no state is kept).  A message split over several records is reassembled
 *   in scratch[0 .. scratch_cap); one that fits one record is read in place.
 *   Returns
 *     FLB_SNI_FOUND (1)       name[0 .. *name_len) holds the host_name, lowercased, NUL-terminated
 *                             (name_cap must be >= 2; names are printable ASCII, <= name_cap - 1)
 *     FLB_SNI_NEED_MORE (0)   a valid prefix: the name may still come
 *     FLB_SNI_NOT_TLS         the bytes are not a TLS handshake record (plain HTTP, SSLv2, ...)
 *     FLB_SNI_NO_SNI          a ClientHello without a server_name host_name
 *     FLB_SNI_MALFORMED       a TLS handshake whose lengths or fields are inconsistent
 *     FLB_SNI_TOO_BIG         the bytes needed do not fit scratch_cap, or the name is too long
 *   The search stops at the server_name extension: the rest of the ClientHello is not needed.
 *   It reads only buf[0 .. len) and writes only scratch, name and *name_len.
 */
#ifndef FLB_TLS_H
#define FLB_TLS_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define FLB_SNI_FOUND       1
#define FLB_SNI_NEED_MORE   0
#define FLB_SNI_NOT_TLS     (-EPROTONOSUPPORT)
#define FLB_SNI_NO_SNI      (-ENOENT)
#define FLB_SNI_MALFORMED   (-EINVAL)
#define FLB_SNI_TOO_BIG     (-EMSGSIZE)

#define FLB_TLS_RECORD_MAX  16384       /* TLSPlaintext.length bound (2^14) */
#define FLB_SNI_NAME_MAX    255         /* a DNS name's length bound */

/* Parse the ClientHello body h[0 .. avail) of a message whose full length (header included) is
 * `total`.  Same returns as flb_sni_parse. */
static int flb_sni_hello(const uint8_t *h, size_t avail, size_t total, char *name, size_t name_cap,
                         size_t *name_len)
{
    size_t p = 4, k, ext_end;
/* the next k bytes: beyond the message -> malformed; beyond what we have -> need more */
#define FLB_SNI_NEED(k) do { if (p + (k) > total) return FLB_SNI_MALFORMED; \
                             if (p + (k) > avail) return FLB_SNI_NEED_MORE; } while (0)
    FLB_SNI_NEED(2 + 32 + 1);                        /* legacy_version, random, session id length */
    p += 34;
    k = h[p];
    if (k > 32)
        return FLB_SNI_MALFORMED;
    p += 1;
    FLB_SNI_NEED(k + 2);                             /* session id, cipher suites length */
    p += k;
    k = ((size_t)h[p] << 8) | h[p + 1];
    if (k < 2 || (k & 1))
        return FLB_SNI_MALFORMED;
    p += 2;
    FLB_SNI_NEED(k + 1);                             /* cipher suites, compression length */
    p += k;
    k = h[p];
    if (k < 1)
        return FLB_SNI_MALFORMED;
    p += 1;
    FLB_SNI_NEED(k);
    p += k;
    if (p == total)
        return FLB_SNI_NO_SNI;                       /* no extensions at all (TLS 1.2 allows it) */
    FLB_SNI_NEED(2);
    k = ((size_t)h[p] << 8) | h[p + 1];
    p += 2;
    ext_end = p + k;
    if (ext_end > total)
        return FLB_SNI_MALFORMED;
    while (p < ext_end) {
        size_t type, elen, e_end, list_end;
        if (p + 4 > ext_end)
            return FLB_SNI_MALFORMED;
        FLB_SNI_NEED(4);
        type = ((size_t)h[p] << 8) | h[p + 1];
        elen = ((size_t)h[p + 2] << 8) | h[p + 3];
        p += 4;
        e_end = p + elen;
        if (e_end > ext_end)
            return FLB_SNI_MALFORMED;
        if (type != 0) {                             /* not server_name: skip, even unread */
            p = e_end;
            continue;
        }
        FLB_SNI_NEED(elen);
        if (elen < 2)
            return FLB_SNI_MALFORMED;
        list_end = p + 2 + (((size_t)h[p] << 8) | h[p + 1]);
        if (list_end != e_end)
            return FLB_SNI_MALFORMED;
        p += 2;
        while (p < list_end) {
            size_t nlen, i;
            uint8_t ntype;
            if (p + 3 > list_end)
                return FLB_SNI_MALFORMED;
            ntype = h[p];
            nlen = ((size_t)h[p + 1] << 8) | h[p + 2];
            p += 3;
            if (p + nlen > list_end)
                return FLB_SNI_MALFORMED;
            if (ntype != 0) {                        /* only host_name (0) is defined */
                p += nlen;
                continue;
            }
            if (nlen == 0)
                return FLB_SNI_MALFORMED;
            if (nlen > FLB_SNI_NAME_MAX || nlen + 1 > name_cap)
                return FLB_SNI_TOO_BIG;
            for (i = 0; i < nlen; i++) {
                uint8_t ch = h[p + i];
                if (ch < 0x21 || ch > 0x7E)
                    return FLB_SNI_MALFORMED;
                name[i] = (char)(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch);
            }
            name[nlen] = '\0';
            *name_len = nlen;
            return FLB_SNI_FOUND;
        }
        return FLB_SNI_NO_SNI;                       /* a server_name list without a host_name */
    }
#undef FLB_SNI_NEED
    return FLB_SNI_NO_SNI;
}

/* The 24-bit length of the handshake message whose 4-byte header starts h. */
static size_t flb_sni_msglen(const uint8_t *h)
{
    return ((size_t)h[1] << 16) | ((size_t)h[2] << 8) | h[3];
}

/* Check the 5-byte record header at r: handshake (22), major version 3, length 1..2^14.
 * Returns the record's payload length, or 0 when the header is not acceptable. */
static size_t flb_sni_record(const uint8_t *r)
{
    size_t rec = ((size_t)r[3] << 8) | r[4];
    if (r[0] != 22 || r[1] != 3 || rec == 0 || rec > FLB_TLS_RECORD_MAX)
        return 0;
    return rec;
}

static int flb_sni_parse(const uint8_t *buf, size_t len, uint8_t *scratch, size_t scratch_cap,
                         char *name, size_t name_cap, size_t *name_len)
{
    size_t off, rec, take, avail, total;
    const uint8_t *h;
    int full = 0, rc;

    if (name_cap < 2)
        return FLB_SNI_TOO_BIG;
    /* the first bytes decide "TLS or not": handshake record (22), major version 3, minor <= 4 */
    if (len >= 1 && buf[0] != 22)
        return FLB_SNI_NOT_TLS;
    if (len >= 2 && buf[1] != 3)
        return FLB_SNI_NOT_TLS;
    if (len >= 3 && buf[2] > 4)
        return FLB_SNI_NOT_TLS;
    if (len < 5)
        return FLB_SNI_NEED_MORE;
    rec = flb_sni_record(buf);
    if (rec == 0)
        return FLB_SNI_MALFORMED;
    take = len - 5 < rec ? len - 5 : rec;
    if (take < rec || (take >= 4 && 4 + flb_sni_msglen(buf + 5) <= take)) {
        /* the first record holds all we have, or the whole message: read it in place */
        h = buf + 5;
        avail = take;
    } else {
        /* the message goes on in the next records: gather their payloads in scratch */
        avail = 0;
        off = 0;
        while (off + 5 <= len) {
            rec = flb_sni_record(buf + off);
            if (rec == 0)
                return FLB_SNI_MALFORMED;   /* the ClientHello must come first, whole */
            take = len - off - 5 < rec ? len - off - 5 : rec;
            if (avail + take > scratch_cap) {
                take = scratch_cap - avail;
                full = 1;
            }
            memcpy(scratch + avail, buf + off + 5, take);
            avail += take;
            off += 5 + rec;
            if (full || (avail >= 4 && avail >= 4 + flb_sni_msglen(scratch)))
                break;                      /* later records are not the ClientHello's */
        }
        h = scratch;
    }
    if (avail < 4) {
        if (avail >= 1 && h[0] != 1)
            return FLB_SNI_MALFORMED;       /* not a client_hello */
        return full ? FLB_SNI_TOO_BIG : FLB_SNI_NEED_MORE;
    }
    if (h[0] != 1)
        return FLB_SNI_MALFORMED;
    total = 4 + flb_sni_msglen(h);
    if (total < 4 + 38)
        return FLB_SNI_MALFORMED;           /* shorter than its fixed fields */
    rc = flb_sni_hello(h, avail < total ? avail : total, total, name, name_cap, name_len);
    if (rc == FLB_SNI_NEED_MORE && full)
        return FLB_SNI_TOO_BIG;
    return rc;
}

#endif
