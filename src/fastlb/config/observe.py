"""Configuration of what fastlb shows of itself: the access log ([global] access_log*)."""

from __future__ import annotations

from fastlb.config.values import _quote, _Table

ACCESS_LOG_KEYS = ("access_log", "access_log_format", "access_log_buffer")
ACCESS_LOG_FORMATS = ("json", "text")
MAX_LOG_BUFFER = 1 << 20  # records per worker ring (128 bytes each)


def parse_access_log(t: _Table) -> tuple[str, str, int]:
    """(destination: "off" | "stdout" | an absolute path, format, records per worker ring)."""
    dest = t.get_str("access_log", "off")
    if dest not in ("off", "stdout") and not dest.startswith("/"):
        raise t.error("access_log", f'{_quote(dest)}: use "off", "stdout" or an absolute file path')
    fmt = t.get_choice("access_log_format", "json", ACCESS_LOG_FORMATS)
    buf = t.get_int("access_log_buffer", 16384, 64, MAX_LOG_BUFFER)
    if buf & (buf - 1):
        raise t.error("access_log_buffer", f"{buf} is not a power of two (e.g. 4096, 16384, 65536)")
    return dest, fmt, buf
