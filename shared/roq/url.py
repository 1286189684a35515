"""Stream URLs: where a viewer connects and which certificate it must see.

``roq://HOST:PORT/SESSION?fp=sha256:HEX``: the QUIC endpoint, the stream's session id, and the
SHA-256 fingerprint of the sender's certificate that the viewer pins.
"""

from __future__ import annotations

import urllib.parse

import msgspec

from shared.errors import ConfigError

__all__ = ["StreamUrl"]

SCHEME = "roq"


class StreamUrl(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int
    session_id: str
    fingerprint: str | None = None
    #: The viewer ticket this URL was issued for: the viewer sends it as its RTCP CNAME, which
    #: ties its connection to the server's viewer registry.
    viewer: str | None = None

    def with_viewer(self, viewer: str) -> StreamUrl:
        return msgspec.structs.replace(self, viewer=viewer)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        params = {"fp": self.fingerprint, "viewer": self.viewer}
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v}, safe=":")
        return f"{SCHEME}://{host}:{self.port}/{self.session_id}{'?' + query if query else ''}"

    @classmethod
    def parse(cls, url: str) -> StreamUrl:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != SCHEME:
            raise ConfigError(f"stream URL {url!r} must start with {SCHEME}://")
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ConfigError(f"stream URL {url!r} needs a host and a port")
        query = urllib.parse.parse_qs(parts.query)
        fingerprint = query.get("fp", [None])[0]
        viewer = query.get("viewer", [None])[0]
        if viewer is not None and not (0 < len(viewer) <= 64 and viewer.isprintable()):
            raise ConfigError(f"stream URL {url!r}: viewer must be 1 to 64 printable characters")
        if fingerprint is not None and not fingerprint.startswith("sha256:"):
            raise ConfigError(f"stream URL {url!r}: fp must be sha256:HEX")
        return cls(
            host=parts.hostname,
            port=port,
            session_id=parts.path.strip("/"),
            fingerprint=fingerprint,
            viewer=viewer,
        )
