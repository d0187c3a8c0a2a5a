"""A client of the remote admin API with the same methods as fastlb.control.ControlClient, so
every CLI command works against `--admin URL` exactly as against a control socket."""

from __future__ import annotations

import http.client as http_client
import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from fastlb.control import ControlClient, ControlError


class AdminClient(ControlClient):
    """Talks to one fastlb's admin API at `url` (http:// or https://), with an optional bearer token."""

    __slots__ = ("url", "token", "context")

    def __init__(
        self, url: str, token: str | None = None, timeout: float = 10.0, cafile: str | None = None
    ) -> None:
        super().__init__(url, timeout)
        self.url = url.rstrip("/")
        self.token = token
        self.context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        body = {k: v for k, v in req.items() if k != "cmd"}
        cmd = req.get("cmd", "")
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        query_args = {k: v for k, v in body.items() if v is not None}
        if cmd in ("status", "rollout-status") and all(
            k == "name" and isinstance(v, str) for k, v in query_args.items()
        ):
            # read-only: a GET, which an admin API without a token answers too
            query = f"?{urllib.parse.urlencode(query_args)}" if query_args else ""
            http = urllib.request.Request(f"{self.url}/v1/{cmd}{query}", headers=headers, method="GET")
        else:
            http = urllib.request.Request(
                f"{self.url}/v1/{cmd}", data=json.dumps(body).encode(), headers=headers, method="POST"
            )
        try:
            with urllib.request.urlopen(http, timeout=self.timeout, context=self.context) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                message = json.loads(raw).get("error") or f"HTTP {exc.code}"
            except (ValueError, AttributeError):
                message = f"HTTP {exc.code} {exc.reason}"
            raise ControlError(f"{self.url}: {message}") from None
        except (urllib.error.URLError, OSError, http_client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if self.context is None and _looks_like_tls(self.url, exc):
                reason = f"{reason} (it looks like TLS: try https:// instead of http://)"
            raise ControlError(f"cannot reach fastlb at {self.url}: {reason}") from None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise ControlError(f"garbled reply from {self.url}") from None
        return self._checked(reply)


def _looks_like_tls(url: str, exc: BaseException) -> bool:
    """Did a plain-HTTP request fail because a TLS server is listening there?  Such a server reads
    the request as a broken ClientHello and closes the connection ("Remote end closed connection"),
    so when the failure looks like that, try a TLS handshake (no certificate checks: it only asks
    whether TLS answers)."""
    reason = getattr(exc, "reason", exc)
    if not isinstance(reason, ConnectionError | http_client.HTTPException):
        return False
    parts = urllib.parse.urlsplit(url)
    if parts.hostname is None:
        return False
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=3.0) as raw:
            with ctx.wrap_socket(raw, server_hostname=parts.hostname):
                return True
    except (OSError, ValueError):
        return False


def read_token_file(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.readline().strip()
