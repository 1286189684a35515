"""ViewerRegistry: the viewers of one stream, as the connections that really exist say.

Theory of operation
===================

A viewer enters the registry when the supervisor hands it a ticket for a shard
(:meth:`ViewerRegistry.register`): it is PENDING, holding a seat on that shard.  From then on
the registry believes the shards, not the tickets: each shard reports its live connections
periodically (a list of :class:`ConnectionReport`), and :meth:`ViewerRegistry.reconcile` makes
the registry agree with that list, returning what changed as events the supervisor logs or acts
on.  Time is passed in; nothing here reads a clock or does I/O.

States and what moves a viewer between them::

    state          cause                                       new state      event
    -------------  ------------------------------------------  -------------  ------------------
    (none)         register (a ticket is issued)               PENDING        -
    PENDING        its connection is in its shard's report     CONNECTED      ViewerConnected
    CONNECTED      its connection is missing from the report   DISCONNECTED   ViewerDisconnected
    DISCONNECTED   it is in its shard's report again           CONNECTED      ViewerConnected
    any but DISC.  shard_lost (its shard died)                 RECONNECTING   ViewerReconnecting
    RECONNECTING   its connection is in its new shard's report CONNECTED      ViewerConnected
    PENDING        move (a new ticket, for another shard)      PENDING        -
    others         move                                        RECONNECTING   -
    PENDING,       no connection within ticket_ttl_s of the    (removed)      TicketExpired
    RECONNECTING   ticket (or of the loss)

A connection belongs to a viewer when its hello named the viewer's id *and* it is on the shard
the viewer's ticket names (or the viewer lost its shard and holds no new ticket yet, so it may
turn up on any survivor).  Every other connection is *anonymous*: no ticket named, an unknown
or expired id, an old ticket for another shard, a second connection of the same viewer.  The
registry tracks anonymous connections per shard from the reports alone, so that its counts,
and the balancer's decisions built on them, match the connections that exist.

Seats: :meth:`ViewerRegistry.per_shard` counts, for each shard, its PENDING tickets, the
RECONNECTING viewers holding a ticket for it, its CONNECTED viewers and its anonymous
connections: what ``ShardLoad.viewers`` should be.  It also says since when a shard has had
none (``idle_since``), which is what ``ShardLoad.idle_since`` needs.  DISCONNECTED viewers hold
no seat; they stay in the registry (their counters visible in ViewerStatus) until the
supervisor removes them.

Reports from a shard given up for lost (:meth:`ViewerRegistry.shard_lost`) are ignored: a report
still in flight from a killed shard must not bring its viewers back.

Counters (bytes sent, skips to a keyframe when the viewer's queue overflowed) are totals over
all of a viewer's connections: a shard reports each connection's own, and a new connection
starts from zero.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence

import msgspec

from shared.errors import ConfigError, StreamNotFoundError, StreamStateError

__all__ = [
    "AnonymousConnected",
    "AnonymousConnection",
    "AnonymousDisconnected",
    "ConnectionReport",
    "RegistryEvent",
    "ShardCount",
    "TicketExpired",
    "ViewerConnected",
    "ViewerDisconnected",
    "ViewerReconnecting",
    "ViewerRecord",
    "ViewerRegistry",
    "ViewerState",
]


class ViewerState(enum.StrEnum):
    PENDING = "pending"  # holds a ticket, has not connected
    CONNECTED = "connected"  # its connection is in its shard's latest report
    DISCONNECTED = "disconnected"  # its connection went away
    RECONNECTING = "reconnecting"  # its shard died (or it was moved); it needs to connect anew


#: States that hold a seat on their shard (and count against the stream's limit).
_SEATED = frozenset({ViewerState.PENDING, ViewerState.CONNECTED, ViewerState.RECONNECTING})
#: States that expire when no connection comes within the ticket's time to live.
_WAITING = frozenset({ViewerState.PENDING, ViewerState.RECONNECTING})


class ConnectionReport(msgspec.Struct, frozen=True, kw_only=True):
    """One live connection on a shard, as the shard reports it."""

    #: The connection's peer as the shard knows it (its address, ``host:port``); unique among
    #: the shard's connections.
    peer_id: str
    #: The viewer id the connection's hello named, or None if it named none.
    viewer_id: str | None = None
    #: Bytes sent on this connection since it opened.
    bytes_sent: int = 0
    #: Times this connection's queue overflowed and it skipped ahead to the next keyframe.
    skipped_to_keyframe: int = 0

    def __post_init__(self) -> None:
        if not self.peer_id:
            raise ConfigError("a connection report needs the connection's peer id")
        if self.viewer_id == "":
            raise ConfigError(
                f"connection {self.peer_id}: an empty viewer id (use None for no ticket)"
            )
        if self.bytes_sent < 0 or self.skipped_to_keyframe < 0:
            raise ConfigError(f"connection {self.peer_id}: counters cannot be negative")


class ViewerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What the registry knows of one viewer."""

    viewer_id: str
    #: Who the viewer is (the design's PeerId), given when its ticket was issued.
    peer_id: str
    state: ViewerState
    #: The shard its ticket names; None while RECONNECTING after its shard was lost.
    shard_id: str | None
    registered_at: float
    #: When the viewer entered its state (for PENDING and RECONNECTING: when the ticket was
    #: issued or the shard lost; the ticket expires ``ticket_ttl_s`` later).
    state_since: float
    #: When its current (or last) connection was first reported.
    connected_at: float | None = None
    #: That connection's peer, as its shard reports it.
    connection_peer: str | None = None
    bytes_sent: int = 0
    skipped_to_keyframe: int = 0


class AnonymousConnection(msgspec.Struct, frozen=True, kw_only=True):
    """A live connection that belongs to no registered viewer on its shard."""

    shard_id: str
    peer_id: str
    #: The viewer id its hello named, if any (unknown, expired, or ticketed elsewhere).
    claimed_viewer_id: str | None
    since: float
    bytes_sent: int = 0


class ShardCount(msgspec.Struct, frozen=True, kw_only=True):
    """The seats taken on one shard."""

    shard_id: str
    pending: int = 0
    #: RECONNECTING viewers holding a ticket for this shard.
    reconnecting: int = 0
    connected: int = 0
    anonymous: int = 0
    #: Since when the shard has had no seat taken; None while it has some.
    idle_since: float | None = None

    @property
    def viewers(self) -> int:
        """Seats taken: what ``ShardLoad.viewers`` is."""
        return self.pending + self.reconnecting + self.connected + self.anonymous

    @property
    def live(self) -> int:
        """Connections it serves now (tickets not yet used and viewers away left out): what
        ``ShardLoad.live`` is."""
        return self.connected + self.anonymous


class RegistryEvent(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Base of what :class:`ViewerRegistry` reports; ``at`` is the ``now`` that saw it."""

    at: float


class ViewerConnected(RegistryEvent, frozen=True, kw_only=True):
    viewer_id: str
    shard_id: str
    peer_id: str
    #: PENDING for a first connection; CONNECTED when a new connection replaced the last one.
    previous: ViewerState


class ViewerDisconnected(RegistryEvent, frozen=True, kw_only=True):
    viewer_id: str
    shard_id: str
    peer_id: str | None


class ViewerReconnecting(RegistryEvent, frozen=True, kw_only=True):
    viewer_id: str
    lost_shard_id: str
    previous: ViewerState


class TicketExpired(RegistryEvent, frozen=True, kw_only=True):
    """No connection came in time; the viewer was removed."""

    viewer_id: str
    shard_id: str | None
    state: ViewerState


class AnonymousConnected(RegistryEvent, frozen=True, kw_only=True):
    shard_id: str
    peer_id: str
    claimed_viewer_id: str | None


class AnonymousDisconnected(RegistryEvent, frozen=True, kw_only=True):
    shard_id: str
    peer_id: str


class ViewerRegistry:
    """The viewers of one stream, reconciled against the connections its shards report."""

    def __init__(self, *, ticket_ttl_s: float = 60.0) -> None:
        if not (ticket_ttl_s > 0 and math.isfinite(ticket_ttl_s)):
            raise ConfigError(f"ticket_ttl_s {ticket_ttl_s} must be a positive number of seconds")
        self._ttl = float(ticket_ttl_s)
        self._viewers: dict[str, ViewerRecord] = {}
        #: Counter totals from a viewer's earlier connections.
        self._carried: dict[str, tuple[int, int]] = {}
        self._anonymous: dict[str, dict[str, AnonymousConnection]] = {}
        #: Live shards and since when each has had no seat taken.
        self._shards: dict[str, float | None] = {}
        self._lost: set[str] = set()

    @property
    def ticket_ttl_s(self) -> float:
        return self._ttl

    # -- shards ---------------------------------------------------------------------------

    def add_shard(self, shard_id: str, now: float) -> None:
        """A shard started: it is known (and idle) before its first report or ticket."""
        self._check_shard(shard_id)
        self._shards.setdefault(shard_id, None)
        self._refresh_idle(now)

    def shard_lost(self, shard_id: str, now: float) -> list[RegistryEvent]:
        """A shard died or was stopped: its viewers become RECONNECTING (with no shard until
        :meth:`move` gives them a new ticket), its anonymous connections are gone, and its
        later reports are ignored.  Losing a shard twice is harmless."""
        if not shard_id:
            raise ConfigError("a shard needs a non-empty id")
        if shard_id in self._lost:
            return []
        self._lost.add(shard_id)
        self._shards.pop(shard_id, None)
        events: list[RegistryEvent] = []
        for record in list(self._viewers.values()):
            if record.shard_id != shard_id or record.state not in _SEATED:
                continue
            self._viewers[record.viewer_id] = msgspec.structs.replace(
                record,
                state=ViewerState.RECONNECTING,
                shard_id=None,
                state_since=now,
                connection_peer=None,
            )
            events.append(
                ViewerReconnecting(
                    at=now,
                    viewer_id=record.viewer_id,
                    lost_shard_id=shard_id,
                    previous=record.state,
                )
            )
        for peer_id in self._anonymous.pop(shard_id, {}):
            events.append(AnonymousDisconnected(at=now, shard_id=shard_id, peer_id=peer_id))
        return events

    def per_shard(self) -> dict[str, ShardCount]:
        """Seats taken on every live shard, by kind, with since when it has been idle."""
        counts: dict[str, dict[str, int]] = {shard: {} for shard in self._shards}
        for record in self._viewers.values():
            if record.shard_id in counts and record.state in _SEATED:
                bucket = counts[record.shard_id]
                bucket[record.state.value] = bucket.get(record.state.value, 0) + 1
        return {
            shard: ShardCount(
                shard_id=shard,
                pending=bucket.get(ViewerState.PENDING.value, 0),
                reconnecting=bucket.get(ViewerState.RECONNECTING.value, 0),
                connected=bucket.get(ViewerState.CONNECTED.value, 0),
                anonymous=len(self._anonymous.get(shard, {})),
                idle_since=self._shards[shard],
            )
            for shard, bucket in counts.items()
        }

    # -- viewers --------------------------------------------------------------------------

    def register(self, viewer_id: str, peer_id: str, shard_id: str, now: float) -> ViewerRecord:
        """A ticket for ``shard_id`` was issued to a new viewer: it is PENDING."""
        if not viewer_id:
            raise ConfigError("a viewer needs a non-empty id")
        self._check_shard(shard_id)
        existing = self._viewers.get(viewer_id)
        if existing is not None:
            raise StreamStateError(
                f"viewer {viewer_id} is already registered ({existing.state} on "
                f"{existing.shard_id or 'no shard'}); use move() to give it a new ticket"
            )
        record = ViewerRecord(
            viewer_id=viewer_id,
            peer_id=peer_id,
            state=ViewerState.PENDING,
            shard_id=shard_id,
            registered_at=now,
            state_since=now,
        )
        self._viewers[viewer_id] = record
        self._shards.setdefault(shard_id, None)
        self._refresh_idle(now)
        return record

    def move(self, viewer_id: str, shard_id: str, now: float) -> ViewerRecord:
        """The viewer got a new ticket, for ``shard_id``: a PENDING viewer stays PENDING (its
        ticket's time to live restarts), any other becomes RECONNECTING until its connection
        shows up there.  Moving a CONNECTED viewer to the shard it is on changes nothing."""
        record = self._require(viewer_id)
        self._check_shard(shard_id)
        if record.state is ViewerState.CONNECTED and record.shard_id == shard_id:
            return record
        state = (
            ViewerState.PENDING if record.state is ViewerState.PENDING else ViewerState.RECONNECTING
        )
        moved = msgspec.structs.replace(
            record, state=state, shard_id=shard_id, state_since=now, connection_peer=None
        )
        self._viewers[viewer_id] = moved
        self._shards.setdefault(shard_id, None)
        self._refresh_idle(now)
        return moved

    def remove(self, viewer_id: str, now: float | None = None) -> ViewerRecord:
        """Forget a viewer (the supervisor closes its connection, if any; until it is gone,
        the shard reports it and it counts as anonymous).  Pass ``now`` so that a shard this
        empties is idle from now; without it, from the next call that passes a time."""
        record = self._require(viewer_id)
        del self._viewers[viewer_id]
        self._carried.pop(viewer_id, None)
        if now is not None:
            self._refresh_idle(now)
        return record

    def get(self, viewer_id: str) -> ViewerRecord | None:
        return self._viewers.get(viewer_id)

    def viewers(self, shard_id: str | None = None) -> list[ViewerRecord]:
        """Every registered viewer in registration order (only ``shard_id``'s, if given)."""
        records = self._viewers.values()
        if shard_id is None:
            return list(records)
        return [r for r in records if r.shard_id == shard_id]

    def anonymous(self, shard_id: str | None = None) -> list[AnonymousConnection]:
        """Live connections that belong to no registered viewer (on ``shard_id``, if given)."""
        if shard_id is not None:
            return list(self._anonymous.get(shard_id, {}).values())
        return [c for shard in self._anonymous.values() for c in shard.values()]

    def count(self, states: ViewerState | Iterable[ViewerState] | None = None) -> int:
        """Registered viewers in ``states`` (all of them if None); anonymous connections are
        not viewers here: see :meth:`stream_viewers`."""
        if states is None:
            return len(self._viewers)
        wanted = {states} if isinstance(states, ViewerState) else set(states)
        return sum(1 for r in self._viewers.values() if r.state in wanted)

    def stream_viewers(self) -> int:
        """Seats the stream has taken: PENDING, CONNECTED and RECONNECTING viewers and
        anonymous connections.  What ``ConnectionBalancer.choose`` takes as stream_viewers."""
        seated = sum(1 for r in self._viewers.values() if r.state in _SEATED)
        return seated + sum(len(shard) for shard in self._anonymous.values())

    # -- reports and time -----------------------------------------------------------------

    def reconcile(
        self, shard_id: str, reports: Sequence[ConnectionReport], now: float
    ) -> list[RegistryEvent]:
        """Make the registry agree with ``shard_id``'s live connections; what changed.

        Also expires the shard's tickets that are past their time to live: the report just
        showed they were not used.  Reports from a lost shard are ignored.
        """
        if not shard_id:
            raise ConfigError("a shard needs a non-empty id")
        if shard_id in self._lost:
            return []
        peers = [r.peer_id for r in reports]
        if len(set(peers)) != len(peers):
            raise ConfigError(f"shard {shard_id} reported the same connection twice: {peers}")
        self._shards.setdefault(shard_id, None)
        events: list[RegistryEvent] = []

        # A viewer reported twice keeps the connection the registry already knows: match that
        # one first, the other becomes anonymous.
        def known_first(report: ConnectionReport) -> int:
            record = self._viewers.get(report.viewer_id) if report.viewer_id else None
            same = (
                record is not None
                and record.state is ViewerState.CONNECTED
                and record.shard_id == shard_id
                and record.connection_peer == report.peer_id
            )
            return 0 if same else 1

        matched: set[str] = set()
        unmatched: list[ConnectionReport] = []
        for report in sorted(reports, key=known_first):
            record = self._viewers.get(report.viewer_id) if report.viewer_id else None
            if (
                record is None
                or record.viewer_id in matched
                or not (
                    record.shard_id == shard_id
                    or (record.shard_id is None and record.state is ViewerState.RECONNECTING)
                )
            ):
                unmatched.append(report)
                continue
            matched.add(record.viewer_id)
            event = self._connect(record, shard_id, report, now)
            if event is not None:
                events.append(event)

        for record in list(self._viewers.values()):
            if (
                record.shard_id == shard_id
                and record.state is ViewerState.CONNECTED
                and record.viewer_id not in matched
            ):
                self._viewers[record.viewer_id] = msgspec.structs.replace(
                    record, state=ViewerState.DISCONNECTED, state_since=now
                )
                events.append(
                    ViewerDisconnected(
                        at=now,
                        viewer_id=record.viewer_id,
                        shard_id=shard_id,
                        peer_id=record.connection_peer,
                    )
                )

        events.extend(self._reconcile_anonymous(shard_id, unmatched, now))
        events.extend(self._expire(now, shard_id))
        self._refresh_idle(now)
        return events

    def expire(self, now: float) -> list[RegistryEvent]:
        """Remove PENDING and RECONNECTING viewers whose ticket outlived ``ticket_ttl_s``;
        the shell calls this at :meth:`next_deadline`."""
        events = self._expire(now, None)
        self._refresh_idle(now)
        return events

    def next_deadline(self) -> float | None:
        """When the next ticket expires (None if no viewer is waiting to connect)."""
        return min(
            (r.state_since + self._ttl for r in self._viewers.values() if r.state in _WAITING),
            default=None,
        )

    # -- internals ------------------------------------------------------------------------

    def _require(self, viewer_id: str) -> ViewerRecord:
        record = self._viewers.get(viewer_id)
        if record is None:
            raise StreamNotFoundError(f"no viewer {viewer_id} in this stream")
        return record

    def _check_shard(self, shard_id: str) -> None:
        if not shard_id:
            raise ConfigError("a shard needs a non-empty id")
        if shard_id in self._lost:
            raise StreamStateError(f"shard {shard_id} was lost; choose another shard")

    def _connect(
        self, record: ViewerRecord, shard_id: str, report: ConnectionReport, now: float
    ) -> ViewerConnected | None:
        same_connection = (
            record.state is ViewerState.CONNECTED
            and record.shard_id == shard_id
            and record.connection_peer == report.peer_id
        )
        if not same_connection:
            # A new connection counts from zero on the shard; earlier ones' totals carry over.
            self._carried[record.viewer_id] = (record.bytes_sent, record.skipped_to_keyframe)
        carried_bytes, carried_skips = self._carried.get(record.viewer_id, (0, 0))
        self._viewers[record.viewer_id] = msgspec.structs.replace(
            record,
            state=ViewerState.CONNECTED,
            shard_id=shard_id,
            state_since=record.state_since if same_connection else now,
            connected_at=record.connected_at if same_connection else now,
            connection_peer=report.peer_id,
            bytes_sent=carried_bytes + report.bytes_sent,
            skipped_to_keyframe=carried_skips + report.skipped_to_keyframe,
        )
        if same_connection:
            return None
        return ViewerConnected(
            at=now,
            viewer_id=record.viewer_id,
            shard_id=shard_id,
            peer_id=report.peer_id,
            previous=record.state,
        )

    def _reconcile_anonymous(
        self, shard_id: str, reports: list[ConnectionReport], now: float
    ) -> list[RegistryEvent]:
        before = self._anonymous.get(shard_id, {})
        after: dict[str, AnonymousConnection] = {}
        events: list[RegistryEvent] = []
        for report in reports:
            known = before.get(report.peer_id)
            after[report.peer_id] = AnonymousConnection(
                shard_id=shard_id,
                peer_id=report.peer_id,
                claimed_viewer_id=report.viewer_id,
                since=known.since if known is not None else now,
                bytes_sent=report.bytes_sent,
            )
            if known is None:
                events.append(
                    AnonymousConnected(
                        at=now,
                        shard_id=shard_id,
                        peer_id=report.peer_id,
                        claimed_viewer_id=report.viewer_id,
                    )
                )
        for peer_id in before:
            if peer_id not in after:
                events.append(AnonymousDisconnected(at=now, shard_id=shard_id, peer_id=peer_id))
        if after:
            self._anonymous[shard_id] = after
        else:
            self._anonymous.pop(shard_id, None)
        return events

    def _expire(self, now: float, shard_id: str | None) -> list[RegistryEvent]:
        """Expire waiting viewers past their ticket's time to live: every one, or only those
        holding a ticket for ``shard_id``."""
        events: list[RegistryEvent] = []
        for record in list(self._viewers.values()):
            if record.state not in _WAITING or now < record.state_since + self._ttl:
                continue
            if shard_id is not None and record.shard_id != shard_id:
                continue
            del self._viewers[record.viewer_id]
            self._carried.pop(record.viewer_id, None)
            events.append(
                TicketExpired(
                    at=now,
                    viewer_id=record.viewer_id,
                    shard_id=record.shard_id,
                    state=record.state,
                )
            )
        return events

    def _refresh_idle(self, now: float) -> None:
        counts = self.per_shard()
        for shard, count in counts.items():
            if count.viewers > 0:
                self._shards[shard] = None
            elif self._shards[shard] is None:
                self._shards[shard] = now
