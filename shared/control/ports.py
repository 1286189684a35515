"""ListenPorts: which stream serves each fixed listen port.

A stream's senders can share one fixed port: each shard sets SO_REUSEPORT and the kernel spreads
new viewers over them.  Two streams must never share one, though: their shards would join the
same SO_REUSEPORT group and the kernel would hand one stream's viewers to the other's senders.
So a fixed port belongs to one stream from its first sender's reservation until its last
sender is released.  Port 0 (any free port) is never shared and needs no reservation.
Streams that do share a port (``serve --config`` with one ``listen`` for several) do it
through one process that owns the port (``actors.port_listeners``), which reserves it here
for all of them.
"""

from __future__ import annotations

from shared.errors import NetworkError

__all__ = ["ListenPorts"]


class ListenPorts:
    def __init__(self) -> None:
        #: port -> (the stream serving it, how many of its senders listen there)
        self._owners: dict[int, tuple[str, int]] = {}

    def reserve(self, session_id: str, port: int) -> None:
        """Count one more sender of ``session_id`` on ``port``; NetworkError if another
        stream serves it.  Reserve before the sender opens, so two streams asking at once
        cannot both pass the check."""
        if port == 0:
            return
        owner, senders = self._owners.get(port, (session_id, 0))
        if owner != session_id:
            raise NetworkError(f"port {port} is already serving stream {owner}")
        self._owners[port] = (session_id, senders + 1)

    def release(self, session_id: str, port: int) -> None:
        """One sender of ``session_id`` on ``port`` is gone (or never opened)."""
        owner, senders = self._owners.get(port, ("", 0))
        if owner != session_id:
            return
        if senders <= 1:
            del self._owners[port]
        else:
            self._owners[port] = (session_id, senders - 1)

    def release_stream(self, session_id: str) -> None:
        """The stream stopped: every port it served is free."""
        for port, (owner, _) in list(self._owners.items()):
            if owner == session_id:
                del self._owners[port]

    def owner(self, port: int) -> str | None:
        owner = self._owners.get(port)
        return owner[0] if owner else None
