"""Writing ``multipart/related`` answers (RFC 2387, PS3.18 8.6.1.2) part by part, never the whole body at once."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator

_SMALL = 65536  # bodies below this are sent in one chunk with their part's head


def new_boundary() -> str:
    """A boundary no part can contain by chance (random, 32 hex digits)."""
    return f"medarchive-{secrets.token_hex(16)}"


def content_type(part_type: str, boundary: str, *, transfer_syntax: str | None = None) -> str:
    """The ``Content-Type`` of the whole answer: ``type`` is the parts' media type (quoted, as PS3.18 shows it)."""
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return value + (f"; transfer-syntax={transfer_syntax}" if transfer_syntax else "")


def part_head(boundary: str, part_content_type: str, *, first: bool, location: str | None = None) -> bytes:
    """The delimiter and headers that open one part (the CRLF before a delimiter belongs to it, RFC 2046 5.1.1)."""
    lines = [("" if first else "\r\n") + f"--{boundary}", f"Content-Type: {part_content_type}"]
    if location:
        lines.append(f"Content-Location: {location}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def closing(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode("ascii")


def stream_parts(parts: Iterable[tuple[str, bytes]], boundary: str) -> Iterator[bytes]:
    """Each ``(content type, body)`` as one part, in turn; the closing delimiter once the parts are done.

    An empty sequence still writes a well-formed (empty) multipart body.
    """
    first = True
    for part_type, body in parts:
        head = part_head(boundary, part_type, first=first)
        if len(body) < _SMALL:
            yield head + body
        else:  # a large body goes out as its own chunk: no concatenated copy
            yield head
            yield body
        first = False
    if first:
        yield f"--{boundary}--\r\n".encode("ascii")
    else:
        yield closing(boundary)
