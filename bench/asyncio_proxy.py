"""A plain asyncio TCP proxy: the load balancer a Python user writes by hand (the benchmark's baseline).

Round robin over the backends of each listener, bytes copied both ways, a half-close passed on with
write_eof(), both sockets closed when either side is done or fails.  No uvloop, no tuning beyond a
listen backlog: this is the "obvious" program, so the comparison says what fastlb buys over it.

    .venv/bin/python bench/asyncio_proxy.py --route 127.0.0.1:8000=127.0.0.1:9001,127.0.0.1:9002 [--workers 2]

With --workers N > 1 the parent forks N children that each listen with SO_REUSEPORT (what a Python user
does to use more than one core) and stays to stop them on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import resource
import signal
import sys

CHUNK = 65536


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def parse_route(text: str) -> tuple[tuple[str, int], list[tuple[str, int]]]:
    listen, sep, backends = text.partition("=")
    if not sep or not backends:
        raise argparse.ArgumentTypeError(f"{text!r} is not LISTEN=BACKEND[,BACKEND...]")
    return parse_hostport(listen), [parse_hostport(b) for b in backends.split(",")]


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy reader to writer until EOF, then half-close the writer; a reset ends the copy quietly."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()  # the peer is gone: drop the other side too, the other pump then ends


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass


def make_handler(backends: list[tuple[str, int]]):
    ring = itertools.cycle(backends)

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        host, port = next(ring)
        try:
            b_reader, b_writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
        except (OSError, TimeoutError):
            c_writer.transport.abort()
            return
        try:
            await asyncio.gather(pump(c_reader, b_writer), pump(b_reader, c_writer))
        finally:
            await asyncio.gather(close(b_writer), close(c_writer))

    return handle


async def serve(routes, reuse_port: bool) -> None:
    servers = [
        await asyncio.start_server(make_handler(backends), host, port, backlog=1024, reuse_port=reuse_port)
        for (host, port), backends in routes
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--route", type=parse_route, action="append", required=True, help="LISTEN=BACKEND[,BACKEND...]"
    )
    ap.add_argument("--workers", type=int, default=1, help="processes (SO_REUSEPORT when > 1)")
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.workers <= 1:
        asyncio.run(serve(args.route, reuse_port=False))
        return 0
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                asyncio.run(serve(args.route, reuse_port=True))
            finally:
                os._exit(0)
        children.append(pid)

    def forward(signum, _frame):
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        _, st = os.waitpid(child, 0)
        status |= os.waitstatus_to_exitcode(st) != 0
    return status


if __name__ == "__main__":
    sys.exit(main())
