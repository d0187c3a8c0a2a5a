# core/orphan.pxi - the worker outlives its control process: watch it through a pidfd, keep serving
# with the last published state when it dies, drain orphan_timeout later.
#
# PR_SET_PDEATHSIG and `getppid() == 1` are not used: the first kills the data plane with the control
# process, the second misses a subreaper (the worker is re-parented to it, not to init).  A pidfd
# refers to one process for its whole life and becomes readable when it exits, whoever reaps it.

cdef uint64_t SPECIAL_PARENT = 0xFFFFFFFEULL   # epoll tag of the control process's pidfd

cdef int ORPH_fd = -1                # pidfd of the control process, -1 once it died (or none)
cdef uint64_t ORPH_timeout_ms = 0    # orphan_timeout
cdef uint64_t ORPH_deadline_ms = 0   # when an orphan begins to drain; 0: not orphaned
cdef bint ORPH_expired = 0           # the drain was begun by orphan_timeout (not by a SIGTERM)


cdef int orphan_watch(int control_pid, uint64_t timeout_ms) noexcept nogil:
    """Open a pidfd of control_pid and add it to the worker's epoll set (tag SPECIAL_PARENT).

    Checks afterwards that control_pid is still our parent: if it died before the pidfd was open,
    the pid could name another process.  Returns 0, -ESRCH (the control process is already gone:
    the worker must not start), or -errno of pidfd_open/epoll_ctl.  Without pidfds (ENOSYS) it
    arms PR_SET_PDEATHSIG(SIGTERM) instead: no orphan mode there.  control_pid <= 0: no watch
    (a test build running the loop by itself), returns 0.
    """
    global ORPH_fd, ORPH_timeout_ms, ORPH_deadline_ms
    cdef epoll_event ev
    cdef long fd
    ORPH_timeout_ms = timeout_ms
    ORPH_deadline_ms = 0
    if control_pid <= 0:
        return 0
    fd = syscall(SYS_pidfd_open, control_pid, 0)
    if fd < 0:
        if errno != ENOSYS:
            return -errno
        # Linux < 5.3: no pidfd.  Fall back to the old contract (drain when the control process
        # dies); there is no orphan mode on such kernels.
        if prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0) < 0:
            return -errno
        return -3 if getppid() != control_pid else 0
    if getppid() != control_pid:
        close_fd(<int>fd)
        return -3                       # ESRCH: the control process died before we watched it
    ev.events = EPOLLIN
    ev.data.u64 = TAG_SPECIAL | SPECIAL_PARENT
    if epoll_ctl(W.ep, EPOLL_CTL_ADD, <int>fd, &ev) < 0:
        close_fd(<int>fd)
        return -errno
    ORPH_fd = <int>fd
    W.me.control_pid = <uint32_t>control_pid
    return 0


cdef void orphan_begin() noexcept nogil:
    """The control process's pidfd became readable: it is gone.  Mark it in shared memory, say it
    once on stderr, stop watching, and schedule the drain orphan_timeout from now.  Idempotent."""
    global ORPH_fd, ORPH_deadline_ms
    cdef const char *msg = b"fastlb worker: control process gone; serving with the last published state until a new fastlb takes over or orphan_timeout\n"
    if ORPH_fd < 0:
        return
    epoll_ctl(W.ep, EPOLL_CTL_DEL, ORPH_fd, NULL)
    close_fd(ORPH_fd)
    ORPH_fd = -1
    W.me.orphaned_since_ms = W.now_ms if W.now_ms > 0 else 1
    ORPH_deadline_ms = W.now_ms + ORPH_timeout_ms
    if write(2, msg, strlen(msg)) < 0:
        pass                            # stderr gone too: the mark in shared memory remains


cdef inline void orphan_check(uint32_t shutdown_ms) noexcept nogil:
    """Once per loop turn: an orphan whose orphan_timeout passed drains and exits like on SIGTERM."""
    global ORPH_expired
    if ORPH_deadline_ms != 0 and W.now_ms >= ORPH_deadline_ms and not W.stopping:
        ORPH_expired = 1
        begin_drain(shutdown_ms)


cdef void orphan_close() noexcept nogil:
    """Teardown: close the pidfd if it is still open."""
    global ORPH_fd
    if ORPH_fd >= 0:
        close_fd(ORPH_fd)
        ORPH_fd = -1
