"""The remote admin API: the control socket's operations as HTTP JSON, served by the control process.

    GET  /v1/status                     -> {"ok": true, "status": {...}}
    GET  /v1/rollout-status[?name=N]    -> {"ok": true, "rollouts": [...]}
    POST /v1/<command>   body: {...}    -> the control socket's reply for {"cmd": <command>, ...body}
    GET  /metrics                       -> Prometheus text, when the metrics collector is available

Every request is validated exactly like a control-socket request (fastlb.control.server), so the
two can never disagree.  Errors are JSON `{"ok": false, "error": "..."}` with an HTTP status:
400 bad request or refused operation, 401 missing/wrong token, 403 a cross-site browser request,
404 unknown path or command, 405 wrong method, 408 body too slow, 413 body too large, 415 a body
that is not application/json.

What it trusts (docs/security.md): it never gives more than the 0600 control socket gives its owner.
- With `admin_token_file` every request needs `Authorization: Bearer <token>`; the file must be
  the service's (or root's) and closed to group and others, else the API is not started.
- Without a token (loopback only; the config requires one elsewhere) the API is read-only: the GETs
  above answer, every POST is 401, and a Host that is not a loopback address or `localhost` is
  refused (a DNS-rebinding page would otherwise read the status).
- A browser's cross-site request (Sec-Fetch-Site cross-site/same-site, or an Origin that is not this
  API's own) is refused, and a POST body must be `Content-Type: application/json`: a form or a
  text/plain fetch() from any web page can never change state.
- Gate commands (`check`, run through /bin/sh) are never taken from a request body (400):
  commands come from the config file's [rollouts.NAME] tables and from the control socket only.
- Slow clients: a connection's first request head must arrive within admin_header_timeout, idle
  kept-alive connections close after admin_keepalive_timeout, at most admin_max_connections are
  open (fastlb.fleet.http_guard).  TLS with `admin_tls_cert` / `admin_tls_key`.  aiohttp parses HTTP.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import socket
import ssl
from typing import Any

from aiohttp import web

from fastlb.config.fleet import read_admin_token
from fastlb.config.model import AdminConfig
from fastlb.control import MAX_REQUEST
from fastlb.control.server import ControlTarget, handle_request
from fastlb.fleet.http_guard import GuardedServer, HttpLimits

log = logging.getLogger("fastlb")

BODY_TIMEOUT = 5.0  # seconds a client gets to send its request body


read_token = read_admin_token  # the token file's first line; its owner and mode are checked
_LOOPBACK_NAMES = ("localhost", "localhost.")


def _host_is_loopback(host_header: str) -> bool:
    """Is the Host header's name a loopback address or localhost (not a name a page chose)?"""
    host = host_header.strip()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cross_site(request: web.Request) -> str | None:
    """Why this looks like a browser's cross-site request (None: it does not)."""
    site = request.headers.get("Sec-Fetch-Site", "").lower()
    if site in ("cross-site", "same-site"):
        return f"Sec-Fetch-Site: {site}"
    origin = request.headers.get("Origin")
    if origin is not None:
        own = f"{request.scheme}://{request.headers.get('Host', '')}".lower()
        if origin.strip().lower() != own:
            return f"Origin: {origin[:80]}"
    return None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"ok": False, "error": message}, status=status)


class AdminServer:
    """The admin HTTP API of one control process."""

    def __init__(
        self, target: ControlTarget, config: AdminConfig, inherited: socket.socket | None = None
    ) -> None:
        self.target = target
        self.config = config
        self.token: str | None = None
        self._runner: web.AppRunner | None = None
        self._server: GuardedServer | None = None
        self.port: int | None = None
        self._inherited = inherited  # a predecessor's listening socket for this address (takeover)
        self._sock: socket.socket | None = None
        self._handing_over = False  # taken over: answer what was accepted, with Connection: close

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST, middlewares=[self._guard])
        app.router.add_get("/v1/status", self._status)
        app.router.add_get("/v1/rollout-status", self._rollout_status)
        app.router.add_post("/v1/{cmd}", self._command)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> None:
        """Bind and serve; a failure (address in use, unreadable token or certificate) is logged and
        leaves the load balancer running without the admin API."""
        cfg = self.config
        try:
            if cfg.token_file is not None:
                self.token = read_token(cfg.token_file)
            ctx = None
            if cfg.tls_cert is not None and cfg.tls_key is not None:
                ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            self._runner = web.AppRunner(
                self._app(), access_log=None, handle_signals=False, keepalive_timeout=cfg.keepalive_timeout
            )
            await self._runner.setup()
            if self._inherited is not None:  # a takeover: serve the same socket (its queue too)
                self._sock, self._inherited = self._inherited, None
            else:
                self._sock = _bind(cfg)
            self.port = self._sock.getsockname()[1]
            limits = HttpLimits(cfg.header_timeout, cfg.max_connections)
            self._server = GuardedServer(self._sock, self._runner.server, limits, "admin API", ctx)
            self._server.start()
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.error("admin API on %s not started: %s", cfg.bind, exc)
            await self.stop()
            return
        log.info(
            "admin API on %s://%s (token %s)",
            "https" if ctx else "http",
            cfg.bind,
            "required" if self.token else "none: read-only, changes are refused",
        )

    def service_sockets(self) -> list[dict[str, Any]]:
        """This API's listening socket as a handover table entry (worker -1), while it serves."""
        if self._runner is None or self._sock is None:
            return []
        return [
            {"name": "admin", "bind": f"admin/{self.config.bind}", "worker": -1, "fd": self._sock.fileno()}
        ]

    async def hand_over(self, grace: float) -> None:
        """Taken over (the successor serves the same socket from now on): stop accepting, answer
        every request already accepted (Connection: close) and close idle keep-alive connections,
        waiting up to grace seconds for requests still on their way, then stop.  aiohttp's own
        shutdown would close an accepted connection whose request has not been read yet: that
        client would get no answer at all."""
        runner = self._runner
        if runner is None:
            return
        from fastlb.runtime.handover import stop_accepting

        self._handing_over = True
        await stop_accepting(self._server)  # the successor holds its own copy of the socket
        server = runner.server
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while server is not None and server.connections and loop.time() < deadline:
            for conn in list(server.connections):
                # served at least once, nothing in progress or queued: an idle keep-alive connection
                if (
                    getattr(conn, "_request_count", 0) > 0
                    and not getattr(conn, "_request_in_progress", True)
                    and not getattr(conn, "_messages", True)
                ):
                    conn.close()
            await asyncio.sleep(0.02)
        await self.stop()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for s in (self._sock, self._inherited):
            if s is not None:
                s.close()
        self._sock = self._inherited = None

    # --- request handling ----------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        why = _cross_site(request)
        if why is not None:
            return _error(403, f"cross-site browser requests are refused ({why})")
        if self.token is not None:
            given = request.headers.get("Authorization", "")
            if not given.startswith("Bearer ") or not hmac.compare_digest(
                given[7:].strip().encode(), self.token.encode()
            ):
                return _error(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        elif request.method == "POST":
            return _error(
                401,
                "this admin API is read-only: it has no admin_token_file, so it refuses every change "
                "(use the control socket, or configure a token)",
            )
        elif not _host_is_loopback(request.headers.get("Host", "")):
            return _error(403, "a token-less admin API answers only Host: a loopback address or localhost")
        if request.method == "POST" and (request.content_length or request.body_exists):
            if request.content_type != "application/json":
                return _error(415, "a request body must be Content-Type: application/json")
        try:
            response = await handler(request)
            if self._handing_over:  # taken over: this is the connection's last answer here
                response.force_close()
            return response
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"request body over {MAX_REQUEST} bytes")
        except web.HTTPNotFound:
            return _error(404, f"no such path {request.path!r} (GET /v1/status, POST /v1/COMMAND)")
        except web.HTTPMethodNotAllowed as exc:
            return _error(
                405, f"{request.method} not allowed here (allowed: {', '.join(exc.allowed_methods)})"
            )

    def _reply(self, req: dict[str, Any]) -> web.Response:
        reply = handle_request(self.target, json.dumps(req).encode(), remote=True)
        if reply.get("ok"):
            poke = getattr(self.target, "poke", None)  # let the control process act on the change now
            if callable(poke):
                poke()
            return web.json_response(reply)
        status = 404 if str(reply.get("error", "")).startswith("unknown command") else 400
        return web.json_response(reply, status=status)

    async def _status(self, request: web.Request) -> web.Response:
        return self._reply({"cmd": "status"})

    async def _rollout_status(self, request: web.Request) -> web.Response:
        name = request.query.get("name")
        return self._reply({"cmd": "rollout-status", **({"name": name} if name else {})})

    async def _command(self, request: web.Request) -> web.Response:
        cmd = request.match_info["cmd"]
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                body = await request.read()
        except TimeoutError:
            return _error(408, f"request body not received within {BODY_TIMEOUT:g}s")
        if body.strip():
            try:
                data = json.loads(body)
            except (ValueError, RecursionError):
                return _error(400, "request body is not JSON (a JSON object)")
            if not isinstance(data, dict):
                return _error(400, "request body must be a JSON object")
        else:
            data = {}
        if "cmd" in data and data["cmd"] != cmd:
            return _error(400, f"body says cmd {data['cmd']!r} but the path says {cmd!r}")
        return self._reply({**data, "cmd": cmd})

    async def _metrics(self, request: web.Request) -> web.Response:
        render = getattr(self.target, "metrics_text", None)
        page = render() if callable(render) else None
        if page is None:
            return _error(404, "metrics are not enabled ([global] metrics)")
        body, content_type = page
        return web.Response(body=body, headers={"Content-Type": content_type})


def _bind(cfg: AdminConfig) -> socket.socket:
    """The admin API's listening socket (raises OSError)."""
    addr = cfg.bind
    s = socket.socket(addr.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if addr.family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(addr.sockaddr())
        s.listen(512)
    except BaseException:
        s.close()
        raise
    return s
