"""Stream URLs: where a viewer connects and which certificate it must see.

``roq://HOST:PORT/SESSION?fp=sha256:HEX``: the QUIC endpoint, the stream's session id, and the
SHA-256 fingerprint of the sender's certificate that the viewer pins.  ``alt=HOST:PORT,...``
names other endpoints serving the same stream with the same certificate (shards on other
nodes): a viewer whose connection drops tries them in turn, so losing a node moves its viewers
to the survivors instead of leaving them retrying an address that is gone.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable, Mapping, Sequence

import msgspec

from shared.errors import ConfigError

__all__ = ["ADVERTISE_ENV", "StreamUrl", "advertised_host"]

SCHEME = "roq"
#: The address viewers reach this node at, when it is not the one it binds (a NAT, a
#: Kubernetes Service, a public IP in front of a private one) — MediaMTX's and LiveKit's
#: "advertised address".  Set per node, in the environment its Ray workers inherit.
ADVERTISE_ENV = "KIZUNA_ADVERTISE_HOST"
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def advertised_host(
    bind_host: str, node_ip: Callable[[], str], env: Mapping[str, str] = os.environ
) -> str:
    """The host a viewer URL names for a server bound to ``bind_host``.

    The node's advertised address if it has one; else the bind host, unless that is a
    wildcard (which no viewer can connect to): then the node's own IP (``node_ip()``, Ray's
    idea of this node's address).
    """
    advertised = env.get(ADVERTISE_ENV, "").strip()
    if advertised:
        return advertised
    return node_ip() if bind_host in _WILDCARDS else bind_host


class StreamUrl(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int
    session_id: str
    fingerprint: str | None = None
    #: The viewer ticket this URL was issued for: the viewer sends it as its RTCP CNAME, which
    #: ties its connection to the server's viewer registry.
    viewer: str | None = None
    #: Other endpoints serving the stream with the same certificate, tried after this one.
    alternates: tuple[tuple[str, int], ...] = ()

    def with_viewer(self, viewer: str) -> StreamUrl:
        return msgspec.structs.replace(self, viewer=viewer)

    def with_alternates(self, alternates: Sequence[tuple[str, int]]) -> StreamUrl:
        return msgspec.structs.replace(self, alternates=tuple(alternates))

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """Where to connect, in order: this URL's endpoint, then its alternates."""
        return [(self.host, self.port), *self.alternates]

    def __str__(self) -> str:
        host = _bracketed(self.host)
        alternates = ",".join(f"{_bracketed(h)}:{p}" for h, p in self.alternates)
        params = {"fp": self.fingerprint, "viewer": self.viewer, "alt": alternates}
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v}, safe=":[],")
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
        alternates = tuple(
            _endpoint(item, url) for item in query.get("alt", [""])[0].split(",") if item
        )
        return cls(
            host=parts.hostname,
            port=port,
            session_id=parts.path.strip("/"),
            fingerprint=fingerprint,
            viewer=viewer,
            alternates=alternates,
        )


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _endpoint(text: str, url: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6HOST]:PORT`` of an ``alt=`` list."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"stream URL {url!r}: alt entries must be HOST:PORT, not {text!r}")
    return host, int(port)
