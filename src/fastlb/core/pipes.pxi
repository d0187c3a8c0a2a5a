# core/pipes.pxi - the per-worker pipe pool.  A connection takes a pipe for a direction only while
# data is in flight and gives it back once drained (as HAProxy does), so an idle connection costs
# only its two sockets.  A pipe that still holds bytes is never pooled: it is closed.

#
# Every pipe's real capacity is known (F_GETPIPE_SZ when it is created): an unprivileged user over
# fs.pipe-user-pages-soft gets 8 KiB (or 4 KiB) pipes instead of 64 KiB, and nothing may assume
# more than the pipe at hand holds.

cdef enum:
    PIPE_POOL_MAX = 512     # idle pipes kept per worker; more are closed
    PIPE_POOL_MIN = 16
    PIPE_DEFAULT_SIZE = 65536
    PIPE_DEFAULT_PAGES = 16


cdef int64_t read_small_int(const char *path) noexcept nogil:
    """The non-negative decimal integer at the start of file `path`, or -1 (unreadable, not a number)."""
    cdef char buf[32]
    cdef int fd = open(path, O_RDONLY | O_CLOEXEC)
    cdef ssize_t n
    cdef int64_t v = 0
    cdef int i
    if fd < 0:
        return -1
    n = read(fd, buf, sizeof(buf) - 1)
    close_fd(fd)
    if n <= 0 or buf[0] < 48 or buf[0] > 57:
        return -1
    for i in range(n):
        if buf[i] < 48 or buf[i] > 57:
            break
        v = v * 10 + (buf[i] - 48)
    return v


cdef int pipes_pool_cap() noexcept nogil:
    """How many idle pipes this worker may keep: PIPE_POOL_MAX for root (not subject to the per-user
    pipe budget), else its share of fs.pipe-user-pages-soft (split between the workers, half of it
    for pooled pipes, the rest for pipes in use), at least PIPE_POOL_MIN."""
    cdef int64_t soft, share
    cdef uint32_t nw = W.hdr.n_workers if W.hdr.n_workers > 0 else 1
    if geteuid() == 0:
        return PIPE_POOL_MAX
    soft = read_small_int("/proc/sys/fs/pipe-user-pages-soft")
    if soft <= 0:
        return PIPE_POOL_MAX            # 0 = no soft limit
    share = soft // PIPE_DEFAULT_PAGES // nw // 2
    if share < PIPE_POOL_MIN:
        return PIPE_POOL_MIN
    return <int>(share if share < PIPE_POOL_MAX else PIPE_POOL_MAX)


cdef int pipes_init() noexcept nogil:
    """Allocate the pool (its size from pipes_pool_cap(), published as worker.pipe_pool_cap).
    Returns 0 or -ENOMEM."""
    W.pool_cap = pipes_pool_cap()
    W.pool_fds = <int *>malloc(sizeof(int) * 2 * W.pool_cap)
    W.pool_caps = <uint32_t *>malloc(sizeof(uint32_t) * W.pool_cap)
    if W.pool_fds == NULL or W.pool_caps == NULL:
        return -ENOMEM
    W.n_pooled = 0
    W.pipe_size = 0
    W.pipes_in_use = 0
    W.me.pipe_pool_cap = <uint32_t>W.pool_cap
    return 0


cdef int pipe_get(Pipe *p) noexcept nogil:
    """Give p a pipe: from the pool, or a new one, with its capacity in p.cap.  Returns 0 or
    -errno (EMFILE, ENFILE).  A new pipe smaller than the default is counted (worker.pipes_small)
    and the smallest size seen is published (worker.pipe_size) for the control process to log."""
    cdef int fds[2]
    cdef int sz
    if W.n_pooled > 0:
        W.n_pooled -= 1
        p.rfd = W.pool_fds[2 * W.n_pooled]
        p.wfd = W.pool_fds[2 * W.n_pooled + 1]
        p.cap = W.pool_caps[W.n_pooled]
    else:
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
            return -errno
        p.rfd = fds[0]
        p.wfd = fds[1]
        sz = fcntl(fds[0], F_GETPIPE_SZ)
        if sz <= 0:
            sz = 4096                   # cannot tell: assume the smallest a pipe can be
        p.cap = <uint32_t>sz
        if sz < PIPE_DEFAULT_SIZE:
            W.me.pipes_small += 1
        if W.pipe_size == 0 or sz < W.pipe_size:
            W.pipe_size = sz
            W.me.pipe_size = <uint32_t>sz
    p.bytes = 0
    W.pipes_in_use += 1
    return 0


cdef void pipe_put(Pipe *p) noexcept nogil:
    """Release p's pipe: back to the pool when empty and there is room, else closed."""
    if p.rfd < 0:
        return
    if p.bytes == 0 and W.n_pooled < W.pool_cap:
        W.pool_fds[2 * W.n_pooled] = p.rfd
        W.pool_fds[2 * W.n_pooled + 1] = p.wfd
        W.pool_caps[W.n_pooled] = p.cap
        W.n_pooled += 1
    else:
        close_fd(p.rfd)
        close_fd(p.wfd)
    p.rfd = -1
    p.wfd = -1
    p.bytes = 0
    W.pipes_in_use -= 1


cdef inline bint fds_short() noexcept nogil:
    """Would one more connection leave too few descriptors for the pipes of those we have?"""
    return (W.active + 1) * 2 + (W.pipes_in_use + W.n_pooled) * 2 + FD_RESERVE + W.n_listeners >= W.nofile


cdef void conn_starve(Conn *c) noexcept nogil:
    """No descriptor for a pipe: park c (its data stays in the socket) and retry it every loop turn."""
    cdef int32_t pos
    if c.flags & F_STARVED or W.n_starved >= W.n_conns:
        return
    c.flags |= F_STARVED
    pos = (W.starved_head + W.n_starved) % W.n_conns
    W.starved[pos] = <int32_t>(c - W.conns)
    W.starved_gen[pos] = c.gen
    W.n_starved += 1


cdef void pipes_release_pool() noexcept nogil:
    """Close every pooled pipe (EMFILE relief and exit)."""
    cdef int i
    for i in range(W.n_pooled):
        close_fd(W.pool_fds[2 * i])
        close_fd(W.pool_fds[2 * i + 1])
    W.n_pooled = 0
