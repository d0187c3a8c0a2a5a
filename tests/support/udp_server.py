"""A UDP server process for the end-to-end tests (stdlib only), run by support.udp.UdpServers.

`python udp_server.py SPEC_JSON`, where
SPEC_JSON = {"servers": [{"name": "a", "mode": "echo", "host": "127.0.0.1", "port": 0}, ...]}.
One selectors loop serves every socket.

Modes:
  echo    send every datagram back unchanged to its sender
  tag     send back b"NAME " + the datagram (tells which backend answered)
  double  send every datagram back twice (for udp_responses)
  silent  count, never answer

Control: one command a line on stdin, one JSON line on stdout.
  stats -> {"received": {name: datagrams}, "peers": {name: distinct sender ports}}
  burst NAME N -> {"sent": N}: send N copies of NAME's last datagram to its last sender, at once
  EOF on stdin exits.
The first stdout line, once every socket is bound: {"ports": {name: port}}.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import sys

MODES = {"echo", "tag", "double", "silent"}


# ================================================================================ server side


def serve(spec: dict) -> None:
    sel = selectors.DefaultSelector()
    received: dict[str, int] = {}
    peers: dict[str, set] = {}
    ports = {}
    socks: dict[str, socket.socket] = {}
    last: dict[str, tuple[bytes, tuple]] = {}  # name -> (datagram, sender)
    for srv in spec["servers"]:
        host = srv.get("host", "127.0.0.1")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((host, srv.get("port", 0)))
        s.setblocking(False)
        ports[srv["name"]] = s.getsockname()[1]
        socks[srv["name"]] = s
        received[srv["name"]] = 0
        peers[srv["name"]] = set()
        sel.register(s, selectors.EVENT_READ, srv)
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    print(json.dumps({"ports": ports}), flush=True)
    while True:
        for key, _ in sel.select():
            srv = key.data
            if srv is None:
                line = sys.stdin.readline()
                if not line:
                    return
                cmd = line.split()
                if cmd == ["stats"]:
                    out = {"received": received, "peers": {k: len(v) for k, v in peers.items()}}
                    print(json.dumps(out), flush=True)
                elif len(cmd) == 3 and cmd[0] == "burst":
                    data, addr = last[cmd[1]]
                    for _ in range(int(cmd[2])):
                        socks[cmd[1]].sendto(data, addr)
                    print(json.dumps({"sent": int(cmd[2])}), flush=True)
                continue
            sock = key.fileobj
            for _ in range(256):
                try:
                    data, addr = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                name, mode = srv["name"], srv["mode"]
                received[name] += 1
                peers[name].add(addr[1])
                last[name] = (data, addr)
                reply = b"" if mode == "silent" else data if mode != "tag" else name.encode() + b" " + data
                for _ in range(2 if mode == "double" else 1 if mode != "silent" else 0):
                    with contextlib.suppress(OSError):
                        sock.sendto(reply, addr)


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
