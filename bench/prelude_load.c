/* prelude_load.c - load generator and backend for bench/prelude.py (one connection per request).
 *
 *   prelude_load server PORT EXPECT
 *       accept on 127.0.0.1:PORT; per connection read until EXPECT bytes came (a PROXY header in front
 *       only makes that sooner), answer "ok\n", close.  Runs until killed.
 *   prelude_load client PORT CONCURRENCY SECONDS PAYLOAD_FILE
 *       keep CONCURRENCY connections to 127.0.0.1:PORT in flight for SECONDS: connect, send the
 *       payload, read to EOF (expects "ok\n"), close, start the next.  Prints one JSON line:
 *       {"done": N, "errors": E, "seconds": S}.
 * One epoll loop each, non-blocking sockets, no threads.  Build: cc -O2 -o prelude_load prelude_load.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXEV 256

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct sockaddr_in loopback(int port)
{
    struct sockaddr_in a;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static int server(int port, long expect)
{
    struct sockaddr_in a = loopback(port);
    struct epoll_event ev, evs[MAXEV];
    long *got = calloc(1 << 20, sizeof(long));
    int one = 1, ep, ls, i, n, fd;
    char buf[65536];
    ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(ls, 4096) < 0) {
        perror("listen");
        return 1;
    }
    ep = epoll_create1(0);
    ev.events = EPOLLIN;
    ev.data.fd = ls;
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    for (;;) {
        n = epoll_wait(ep, evs, MAXEV, -1);
        for (i = 0; i < n; i++) {
            fd = evs[i].data.fd;
            if (fd == ls) {
                int c;
                while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (c >= (1 << 20)) { close(c); continue; }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    got[c] = 0;
                    ev.events = EPOLLIN | EPOLLRDHUP;
                    ev.data.fd = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                }
                continue;
            }
            for (;;) {
                ssize_t m = recv(fd, buf, sizeof(buf), 0);
                if (m > 0) {
                    got[fd] += m;
                    if (got[fd] >= expect) {
                        (void)!write(fd, "ok\n", 3);
                        close(fd);
                        break;
                    }
                    continue;
                }
                if (m < 0 && errno == EAGAIN)
                    break;
                close(fd);          /* EOF or error before the whole payload */
                break;
            }
        }
    }
}

static int start_one(int ep, struct sockaddr_in *a)
{
    struct epoll_event ev;
    int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(fd, (struct sockaddr *)a, sizeof(*a)) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    ev.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP;
    ev.data.u64 = (uint64_t)fd;     /* high bit: payload sent */
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return fd;
}

static int client(int port, int conc, double seconds, const char *path)
{
    struct sockaddr_in a = loopback(port);
    struct epoll_event ev, evs[MAXEV];
    char payload[65536], buf[4096];
    long done = 0, errors = 0;
    int ep, i, n, live = 0;
    unsigned char *sent = calloc(1 << 20, 1), *okay = calloc(1 << 20, 1);
    FILE *f = fopen(path, "rb");
    size_t plen;
    double t0, end;
    if (f == NULL) {
        perror(path);
        return 1;
    }
    plen = fread(payload, 1, sizeof(payload), f);
    fclose(f);
    ep = epoll_create1(0);
    t0 = now();
    end = t0 + seconds;
    for (i = 0; i < conc; i++)
        if (start_one(ep, &a) >= 0)
            live++;
    while (live > 0) {
        int stop = now() >= end;
        n = epoll_wait(ep, evs, MAXEV, 100);
        for (i = 0; i < n; i++) {
            int fd = (int)evs[i].data.u64, finished = 0;
            if (!sent[fd] && (evs[i].events & EPOLLOUT)) {
                if (send(fd, payload, plen, MSG_NOSIGNAL) != (ssize_t)plen) {
                    errors++;
                    finished = 1;
                } else {
                    sent[fd] = 1;
                    ev.events = EPOLLIN | EPOLLRDHUP;
                    ev.data.u64 = (uint64_t)fd;
                    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
                }
            }
            if (!finished && sent[fd] && (evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
                for (;;) {
                    ssize_t m = recv(fd, buf, sizeof(buf), 0);
                    if (m > 0) {
                        if (m >= 2 && buf[0] == 'o' && buf[1] == 'k')
                            okay[fd] = 1;
                        continue;
                    }
                    if (m < 0 && errno == EAGAIN)
                        break;
                    if (m == 0 && okay[fd])
                        done++;
                    else
                        errors++;
                    finished = 1;
                    break;
                }
            }
            if (finished) {
                close(fd);
                sent[fd] = okay[fd] = 0;
                live--;
                if (!stop && start_one(ep, &a) >= 0)
                    live++;
            }
        }
        if (stop && now() > end + 5)
            break;                  /* stragglers: give up on them */
    }
    printf("{\"done\": %ld, \"errors\": %ld, \"seconds\": %.6f}\n", done, errors, now() - t0);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "server") == 0)
        return server(atoi(argv[2]), atol(argv[3]));
    if (argc == 6 && strcmp(argv[1], "client") == 0)
        return client(atoi(argv[2]), atoi(argv[3]), atof(argv[4]), argv[5]);
    fprintf(stderr, "usage: prelude_load server PORT EXPECT | client PORT CONC SECONDS PAYLOAD\n");
    return 2;
}
