# flb_prelude.pxd - Cython view of the pure-C prelude parsers: flb_proxy.h (PROXY protocol v1/v2
# parse + write) and flb_tls.h (TLS ClientHello server_name).  The contracts are in those headers.
from libc.stdint cimport uint8_t, uint16_t


cdef extern from "flb_proxy.h" nogil:
    enum:
        FLB_PP_V1_MAX
        FLB_PP_V2_MAX
        FLB_PP_WRITE_MAX

    ctypedef struct flb_proxy_result:
        uint8_t version
        uint8_t command
        uint8_t family
        uint8_t transport
        uint16_t src_port
        uint16_t dst_port
        uint8_t src_addr[16]
        uint8_t dst_addr[16]
        uint16_t n_tlvs
        uint16_t header_len

    int flb_proxy_parse(const uint8_t *buf, size_t len, flb_proxy_result *out)
    int flb_proxy_write(int version, const flb_proxy_result *hdr, uint8_t *out, size_t cap)


cdef extern from "flb_tls.h" nogil:
    enum:
        FLB_SNI_FOUND
        FLB_SNI_NEED_MORE
        FLB_SNI_NOT_TLS
        FLB_SNI_NO_SNI
        FLB_SNI_MALFORMED
        FLB_SNI_TOO_BIG
        FLB_TLS_RECORD_MAX
        FLB_SNI_NAME_MAX

    int flb_sni_parse(const uint8_t *buf, size_t len, uint8_t *scratch, size_t scratch_cap,
                      char *name, size_t name_cap, size_t *name_len)


cdef extern from "<sys/socket.h>" nogil:
    enum:
        MSG_PEEK


cdef extern from "<arpa/inet.h>" nogil:
    uint16_t htons(uint16_t v)
    uint16_t ntohs(uint16_t v)
