"""A client of the remote admin API with the same methods as fastlb.control.ControlClient, so
every CLI command works against `--admin URL` exactly as against a control socket."""

from __future__ import annotations

import json
import ssl
import urllib.error
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
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ControlError(f"cannot reach fastlb at {self.url}: {reason}") from None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise ControlError(f"garbled reply from {self.url}") from None
        return self._checked(reply)


def read_token_file(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.readline().strip()
