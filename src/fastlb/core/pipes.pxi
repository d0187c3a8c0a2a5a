# core/pipes.pxi - the per-worker pipe pool.  A connection takes a pipe for a direction only while
# data is in flight and gives it back once drained (as HAProxy does), so an idle connection costs
# only its two sockets.  A pipe that still holds bytes is never pooled: it is closed.

cdef enum:
    PIPE_POOL_MAX = 512     # idle pipes kept per worker; more are closed


cdef int pipes_init() noexcept nogil:
    W.pool_cap = PIPE_POOL_MAX
    W.pool_fds = <int *>malloc(sizeof(int) * 2 * W.pool_cap)
    if W.pool_fds == NULL:
        return -ENOMEM
    W.n_pooled = 0
    W.pipe_size = 0
    W.pipes_in_use = 0
    return 0


cdef int pipe_get(Pipe *p) noexcept nogil:
    """Give p a pipe: from the pool, or a new one.  Returns 0 or -errno (EMFILE, ENFILE)."""
    cdef int fds[2]
    if W.n_pooled > 0:
        W.n_pooled -= 1
        p.rfd = W.pool_fds[2 * W.n_pooled]
        p.wfd = W.pool_fds[2 * W.n_pooled + 1]
    else:
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
            return -errno
        p.rfd = fds[0]
        p.wfd = fds[1]
        if W.pipe_size == 0:
            W.pipe_size = fcntl(fds[0], F_GETPIPE_SZ)
            if W.pipe_size <= 0:
                W.pipe_size = 65536
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
