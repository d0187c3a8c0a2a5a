/* fuzz_sni.c - libFuzzer harness for flb_sni_parse() (includes/flb_tls.h).
 *
 * Each input is parsed whole and at a few prefixes, with the data plane's scratch size and with a
 * tiny one (so the "reassembly does not fit" path runs too).  Contract checks: only the documented
 * results; a found name is non-empty, NUL-terminated, lowercase printable ASCII; a longer buffer never
 * names another server.  Build and run: scripts/fuzz.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "flb_tls.h"

static uint8_t scratch[16384];

static int check(const uint8_t *data, size_t size, size_t cap, char *name, size_t *nlen)
{
    size_t i;
    int rc = flb_sni_parse(data, size, scratch, cap, name, 256, nlen);
    switch (rc) {
    case FLB_SNI_FOUND:
        if (*nlen == 0 || *nlen > FLB_SNI_NAME_MAX || name[*nlen] != '\0')
            abort();
        for (i = 0; i < *nlen; i++)
            if (name[i] < 0x21 || name[i] > 0x7E || (name[i] >= 'A' && name[i] <= 'Z'))
                abort();
        break;
    case FLB_SNI_NEED_MORE: case FLB_SNI_NOT_TLS: case FLB_SNI_NO_SNI:
    case FLB_SNI_MALFORMED: case FLB_SNI_TOO_BIG:
        break;
    default:
        abort();
    }
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char name[256], name2[256];
    size_t nlen = 0, nlen2 = 0, cut;
    int rc, rc2;
    rc = check(data, size, sizeof(scratch), name, &nlen);
    check(data, size, 64, name2, &nlen2);
    if (size > 0) {
        cut = size / 2;
        rc2 = check(data, cut, sizeof(scratch), name2, &nlen2);
        /* a prefix that already named the server: the whole input names the same server, or is
         * found broken further on (the data plane stops at the first answer, so it sees the prefix's) */
        if (rc2 == FLB_SNI_FOUND && rc == FLB_SNI_FOUND && (nlen != nlen2 || memcmp(name, name2, nlen) != 0))
            abort();
        if (rc2 == FLB_SNI_FOUND && rc != FLB_SNI_FOUND && rc != FLB_SNI_MALFORMED && rc != FLB_SNI_TOO_BIG)
            abort();
    }
    return 0;
}
