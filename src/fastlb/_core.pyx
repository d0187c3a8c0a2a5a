# cython: language_level=3
# _core.pyx - the fastlb data plane: one nogil epoll loop per worker process.
#
# Everything below run_worker() is C over flat structs: no Python object is created or touched per
# connection or per event.  The loop lives in the include-only topic files under core/:
#   core/state.pxi   worker state, connection slab, named connection states and flags
#   core/pipes.pxi   the per-worker pipe pool (an idle connection holds no pipe)
#   core/timers.pxi  the timer wheel (connect and idle timeouts)
#   core/lb.pxi      backend selection: lb_pick() over the shared-memory tables
#   core/accesslog.pxi  the access log's producer: one record per ended connection into a ring
#   core/routes.pxi  routes and splits: route_select() picks a connection's route and pool
#   core/conn.pxi    the per-connection state machine: connect, retry, splice both ways, close
#   core/prelude.pxi PROXY protocol accept/send and the TLS SNI peek, before route_select()
#   core/orphan.pxi  watching the control process (pidfd); orphan mode and orphan_timeout
#   core/flush.pxi   a side errors or resets: early-close retry, or forward its last bytes, then reset
#   core/deadlines.pxi shutdown/drain deadlines reset (counted); half_close_timeout
#   core/udp.pxi     UDP listeners: flow table, recvmmsg/sendmmsg batches, flow expiry
#   core/loop.pxi    accept, event dispatch, signals, the loop itself
# Errors inside are negative errno values, counted in shared memory; never exceptions.

from libc.errno cimport (
    EAGAIN, ECONNABORTED, ECONNREFUSED, EHOSTDOWN, EHOSTUNREACH, EINPROGRESS, EINTR, EINVAL, EIO, EMFILE,
    EMSGSIZE, ENETUNREACH, ENFILE, ENOBUFS, ENOMEM, ENONET, ENOSYS, EPROTO, ETIMEDOUT, errno,
)
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset, strlen

from flb_atomic cimport *
from flb_hash cimport FLB_SEED_KEY, FLB_SEED_SPLIT, flb_hash64
from flb_prelude cimport *
from linux cimport *
from shm_layout cimport *

include "core/state.pxi"
include "core/pipes.pxi"
include "core/timers.pxi"
include "core/lb.pxi"
include "core/accesslog.pxi"
include "core/routes.pxi"
include "core/conn.pxi"
include "core/reload.pxi"
include "core/prelude.pxi"
include "core/orphan.pxi"
include "core/flush.pxi"
include "core/deadlines.pxi"
include "core/udp.pxi"
include "core/loop.pxi"


def map_region(int fd, size_t size):
    """Map the shared region from its memfd (a worker exec'd into a fresh interpreter gets the fd,
    not the mapping); return its address for run_worker().  The mapping lives until exit."""
    cdef void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    if base == MAP_FAILED:
        raise OSError(errno, "mmap of the shared region failed")
    return <uintptr_t>base


def run_worker(
    uintptr_t region_addr, int index, list listen_fds, double shutdown_timeout,
    double orphan_timeout=300.0, int control_pid=0,
):
    """Run worker `index` on the mapped region at `region_addr` until it is told to stop.

    listen_fds[i] is this worker's own (SO_REUSEPORT, non-blocking) listening socket for listener i.
    control_pid: the control process, watched through a pidfd (0: none); when it dies the worker
    keeps serving and drains `orphan_timeout` seconds later (see core/orphan.pxi).
    Blocks (without the GIL) until SIGTERM/SIGINT (or orphan_timeout) and the drain that follows;
    returns 0, or a negative errno if the loop could not be set up.
    """
    cdef int n = len(listen_fds)
    cdef int *fds = <int *>malloc(sizeof(int) * (n if n > 0 else 1))
    cdef int i, rc
    cdef uint32_t shutdown_ms = <uint32_t>(shutdown_timeout * 1000.0)
    cdef uint64_t orphan_ms = <uint64_t>(orphan_timeout * 1000.0)
    if fds == NULL:
        raise MemoryError()
    for i in range(n):
        fds[i] = listen_fds[i]
    with nogil:
        rc = worker_main(<char *>region_addr, index, fds, n, shutdown_ms, orphan_ms, control_pid)
    free(fds)
    return rc


def orphan_expired():
    """Did the last run_worker() end because orphan_timeout passed (its control process died and
    no new fastlb took over)?  fastlb.worker then withdraws the announced routes."""
    return bool(ORPH_expired)


def pick_benchmark(uintptr_t region_addr, int pool, long iterations):
    """Call lb_pick() `iterations` times on `pool` from C (no Python per pick); return ns per pick.

    For bench/: it uses a private worker state over the same region, so it measures exactly the
    code the workers run.
    """
    cdef double ns
    with nogil:
        ns = lb_bench(<char *>region_addr, pool, iterations)
    if ns < 0:
        raise MemoryError()
    return ns


def route_probe(uintptr_t region_addr, int listener, bytes peer, bytes sni=b"", long iterations=1):
    """Route one client from C exactly as a worker would: route_select() on `listener` for the
    sockaddr bytes `peer` and server name `sni` (b"": none), from a private worker state.  The
    region must not be in use by workers of this process.  Returns (route index or None, pool
    index or None, ns per call) - for tests of the matching rules and for bench/."""
    cdef int64_t us
    cdef uint32_t route = FLB_NONE, pool = FLB_NONE
    cdef const uint8_t *p = peer
    cdef const char *s = sni
    cdef uint32_t plen = len(peer), slen = len(sni)
    with nogil:
        us = route_bench(<char *>region_addr, listener, p, plen, s, slen, iterations, &route, &pool)
    if us == -ENOMEM:
        raise MemoryError()
    if us < 0:
        raise ValueError("listener index out of range or peer longer than a sockaddr_in6")
    return (
        None if route == FLB_NONE else route,
        None if pool == FLB_NONE else pool,
        us * 1000.0 / (iterations if iterations > 0 else 1),
    )
