# linux.pxd - declarations of the Linux/libc calls the data plane makes that Cython does not ship.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from posix.types cimport off_t


cdef extern from "<sys/epoll.h>" nogil:
    cdef union epoll_data_t "epoll_data":
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLET


cdef extern from "<fcntl.h>" nogil:
    ssize_t splice(int fd_in, off_t *off_in, int fd_out, off_t *off_out, size_t length, unsigned int flags)
    int pipe2(int pipefd[2], int flags)
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        F_SETPIPE_SZ
        F_GETPIPE_SZ
        O_NONBLOCK
        O_CLOEXEC
        O_RDONLY
    int fcntl(int fd, int cmd, ...)
    int open(const char *path, int flags)


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<linux/sockios.h>" nogil:
    enum:
        SIOCOUTQ            # bytes in a TCP socket's send queue (unsent + unacknowledged)


cdef extern from "<sys/socket.h>" nogil:
    ctypedef uint32_t socklen_t
    ctypedef uint16_t sa_family_t

    cdef struct sockaddr:
        sa_family_t sa_family

    cdef struct sockaddr_storage:
        sa_family_t ss_family

    cdef struct linger:
        int l_onoff
        int l_linger

    int socket(int domain, int type, int protocol)
    int accept4(int sockfd, sockaddr *addr, socklen_t *addrlen, int flags)
    int listen(int sockfd, int backlog)
    int connect(int sockfd, const sockaddr *addr, socklen_t addrlen)
    int shutdown(int sockfd, int how)
    int setsockopt(int sockfd, int level, int optname, const void *optval, socklen_t optlen)
    int getsockopt(int sockfd, int level, int optname, void *optval, socklen_t *optlen)
    int getsockname(int sockfd, sockaddr *addr, socklen_t *addrlen)
    ssize_t recv(int sockfd, void *buf, size_t length, int flags)
    ssize_t send(int sockfd, const void *buf, size_t length, int flags)
    enum:
        AF_INET
        AF_INET6
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SOL_SOCKET
        SO_ERROR
        SO_KEEPALIVE
        SO_LINGER
        SO_REUSEADDR
        SO_REUSEPORT
        SO_RCVBUF
        SO_RCVBUFFORCE
        SO_RXQ_OVFL
        SHUT_WR
        SHUT_RDWR
        MSG_DONTWAIT
        MSG_NOSIGNAL
        MSG_PEEK
        SOCK_DGRAM
        MSG_TRUNC
        MSG_CTRUNC

    # UDP batching (issue 13): recvmmsg/sendmmsg and ancillary data (IP_PKTINFO)
    cdef struct iovec:
        void *iov_base
        size_t iov_len

    cdef struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    cdef struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    int recvmmsg(int sockfd, mmsghdr *msgvec, unsigned int vlen, int flags, void *timeout)
    int sendmmsg(int sockfd, mmsghdr *msgvec, unsigned int vlen, int flags)
    ssize_t sendmsg(int sockfd, const msghdr *msg, int flags)
    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)


cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP
        IPPROTO_IP
        IPPROTO_IPV6
        IP_PKTINFO
        IPV6_PKTINFO
        IPV6_RECVPKTINFO

    cdef struct in_addr:
        uint32_t s_addr

    cdef struct in6_addr:
        uint8_t s6_addr[16]

    cdef struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr

    cdef struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    cdef struct in_pktinfo:
        int ipi_ifindex
        in_addr ipi_spec_dst
        in_addr ipi_addr

    cdef struct in6_pktinfo:
        in6_addr ipi6_addr
        unsigned int ipi6_ifindex


cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY
        TCP_KEEPIDLE
        TCP_KEEPINTVL
        TCP_KEEPCNT
        TCP_USER_TIMEOUT


cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    int sigemptyset(sigset_t *s)
    int sigaddset(sigset_t *s, int signum)
    int sigprocmask(int how, const sigset_t *s, sigset_t *oldset)
    ctypedef void (*sighandler_t)(int)
    sighandler_t signal(int signum, sighandler_t handler)
    sighandler_t SIG_IGN
    sighandler_t SIG_ERR
    enum:
        SIG_BLOCK
        SIG_UNBLOCK
        SIG_SETMASK
        SIGTERM
        SIGINT
        SIGHUP
        SIGPIPE
        SIGUSR1
        SIGUSR2


cdef extern from "<sys/signalfd.h>" nogil:
    cdef struct signalfd_siginfo:
        uint32_t ssi_signo
    int signalfd(int fd, const sigset_t *mask, int flags)
    enum:
        SFD_NONBLOCK
        SFD_CLOEXEC


cdef extern from "<sys/prctl.h>" nogil:
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5)
    enum:
        PR_SET_PDEATHSIG
        PR_SET_NAME


cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    enum:
        PROT_READ
        PROT_WRITE
        MAP_SHARED


cdef extern from "<time.h>" nogil:
    ctypedef int clockid_t
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(clockid_t clk, timespec *tp)
    enum:
        CLOCK_MONOTONIC
        CLOCK_REALTIME
        CLOCK_MONOTONIC_COARSE


cdef extern from "<sys/resource.h>" nogil:
    ctypedef unsigned long rlim_t
    cdef struct rlimit:
        rlim_t rlim_cur
        rlim_t rlim_max
    int getrlimit(int resource, rlimit *rlim)
    int setrlimit(int resource, const rlimit *rlim)
    enum:
        RLIMIT_NOFILE


cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
    int getpid()
    int getppid()
    unsigned int geteuid()


cdef extern from "<sys/syscall.h>" nogil:
    # pidfd_open(2) (Linux 5.3): glibc before 2.36 has no wrapper, so it is called through syscall()
    enum:
        SYS_pidfd_open
    long syscall(long number, ...)
