/* fuzz_proxy.c - libFuzzer harness for flb_proxy_parse() and flb_proxy_write() (includes/flb_proxy.h).
 *
 * Every input is parsed as-is (ASan/UBSan catch any read outside it: libFuzzer hands us a buffer of
 * exactly `size` bytes) and, when it parses, checked against the contract: the length is within the
 * input, every prefix of the header "needs more", and the written form of the parsed addresses parses
 * back to the same addresses.  Build and run: scripts/fuzz.
 */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "flb_proxy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    flb_proxy_result r, r2;
    uint8_t out[FLB_PP_WRITE_MAX];
    uint8_t *copy;
    int rc, rc2, w, v;
    size_t n;

    rc = flb_proxy_parse(data, size, &r);
    if (rc < 0) {
        if (rc != -EBADMSG && rc != -EINVAL && rc != -EMSGSIZE)
            abort();
        return 0;
    }
    if (rc == 0)
        return 0;
    if ((size_t)rc > size || r.header_len != rc)
        abort();
    if (r.version == 1 && rc > FLB_PP_V1_MAX)
        abort();
    if (r.version == 2 && rc > FLB_PP_V2_MAX)
        abort();
    /* the header alone, in a buffer of exactly its size, parses the same */
    copy = malloc((size_t)rc);
    memcpy(copy, data, (size_t)rc);
    if (flb_proxy_parse(copy, (size_t)rc, &r2) != rc)
        abort();
    /* any strict prefix of a v2 header, or of a v1 line, needs more (or is already wrong earlier) */
    for (n = 0; n < (size_t)rc; n += 1 + (size_t)rc / 16) {
        rc2 = flb_proxy_parse(copy, n, &r2);
        if (rc2 > 0)
            abort();
    }
    free(copy);
    /* write what we read, in both versions, and read it back */
    for (v = 1; v <= 2; v++) {
        w = flb_proxy_write(v, &r, out, sizeof(out));
        if (w < 0 || w > FLB_PP_WRITE_MAX)
            abort();
        rc2 = flb_proxy_parse(out, (size_t)w, &r2);
        if (rc2 != w || r2.family != r.family)
            abort();
        if (r.family != 0 && (memcmp(r.src_addr, r2.src_addr, 16) != 0
                              || memcmp(r.dst_addr, r2.dst_addr, 16) != 0
                              || r.src_port != r2.src_port || r.dst_port != r2.dst_port))
            abort();
    }
    return 0;
}
