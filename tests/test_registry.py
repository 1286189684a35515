"""ViewerRegistry: viewers reconciled against the connections shards report, literal times."""

from __future__ import annotations

import msgspec
import pytest

from shared.control.registry import (
    AnonymousConnected,
    AnonymousDisconnected,
    ConnectionReport,
    RegistryEvent,
    ShardCount,
    TicketExpired,
    ViewerConnected,
    ViewerDisconnected,
    ViewerReconnecting,
    ViewerRecord,
    ViewerRegistry,
    ViewerState,
)
from shared.errors import ConfigError, StreamNotFoundError, StreamStateError

P = ViewerState


def conn(peer: str, viewer: str | None = None, sent: int = 0, skipped: int = 0) -> ConnectionReport:
    return ConnectionReport(
        peer_id=peer, viewer_id=viewer, bytes_sent=sent, skipped_to_keyframe=skipped
    )


def viewer(registry: ViewerRegistry, viewer_id: str) -> ViewerRecord:
    record = registry.get(viewer_id)
    assert record is not None, f"{viewer_id} is not registered"
    return record


def state(registry: ViewerRegistry, viewer_id: str) -> ViewerState:
    return viewer(registry, viewer_id).state


# -- the viewer's life -----------------------------------------------------------------------


def test_pending_connected_disconnected() -> None:
    registry = ViewerRegistry()
    record = registry.register("v1", "alice", "s1", now=10.0)
    assert (record.state, record.shard_id, record.registered_at) == (P.PENDING, "s1", 10.0)
    assert registry.per_shard()["s1"] == ShardCount(shard_id="s1", pending=1)
    assert registry.stream_viewers() == 1

    events = registry.reconcile("s1", [conn("10.0.0.2:5000", "v1", sent=1200)], now=11.0)
    assert events == [
        ViewerConnected(
            at=11.0, viewer_id="v1", shard_id="s1", peer_id="10.0.0.2:5000", previous=P.PENDING
        )
    ]
    record = viewer(registry, "v1")
    assert (record.state, record.connected_at, record.connection_peer, record.bytes_sent) == (
        P.CONNECTED,
        11.0,
        "10.0.0.2:5000",
        1200,
    )
    assert registry.per_shard()["s1"].connected == 1

    # The same connection again: counters move, nothing happened.
    assert registry.reconcile("s1", [conn("10.0.0.2:5000", "v1", sent=5000)], now=12.0) == []
    record = viewer(registry, "v1")
    assert record.bytes_sent == 5000 and record.connected_at == 11.0

    events = registry.reconcile("s1", [], now=13.0)
    assert events == [
        ViewerDisconnected(at=13.0, viewer_id="v1", shard_id="s1", peer_id="10.0.0.2:5000")
    ]
    assert state(registry, "v1") is P.DISCONNECTED
    # A disconnected viewer holds no seat but is still listed, with its counters.
    assert registry.per_shard()["s1"].viewers == 0
    assert registry.stream_viewers() == 0
    record = viewer(registry, "v1")
    assert record.bytes_sent == 5000


def test_reconnection_on_the_same_shard_carries_counters_over() -> None:
    registry = ViewerRegistry()
    registry.register("v1", "alice", "s1", now=0.0)
    registry.reconcile("s1", [conn("a:1", "v1", sent=1000, skipped=2)], now=1.0)
    registry.reconcile("s1", [], now=2.0)
    events = registry.reconcile("s1", [conn("a:2", "v1", sent=300, skipped=1)], now=3.0)
    assert events == [
        ViewerConnected(
            at=3.0, viewer_id="v1", shard_id="s1", peer_id="a:2", previous=P.DISCONNECTED
        )
    ]
    record = viewer(registry, "v1")
    assert (record.bytes_sent, record.skipped_to_keyframe, record.connected_at) == (1300, 3, 3.0)
    # Later reports of the new connection add to the carried totals, not to each other.
    registry.reconcile("s1", [conn("a:2", "v1", sent=800, skipped=4)], now=4.0)
    record = viewer(registry, "v1")
    assert (record.bytes_sent, record.skipped_to_keyframe) == (1800, 6)


def test_a_new_connection_replacing_the_old_one_within_a_report_is_reported() -> None:
    registry = ViewerRegistry()
    registry.register("v1", "alice", "s1", now=0.0)
    registry.reconcile("s1", [conn("a:1", "v1", sent=1000)], now=1.0)
    events = registry.reconcile("s1", [conn("a:2", "v1", sent=10)], now=2.0)
    assert events == [
        ViewerConnected(at=2.0, viewer_id="v1", shard_id="s1", peer_id="a:2", previous=P.CONNECTED)
    ]
    record = viewer(registry, "v1")
    assert record.bytes_sent == 1010 and record.connected_at == 2.0


def test_skips_to_keyframe_come_from_the_reports() -> None:
    registry = ViewerRegistry()
    registry.register("slow", "bob", "s1", now=0.0)
    registry.register("fast", "carol", "s1", now=0.0)
    registry.reconcile(
        "s1", [conn("b:1", "slow", skipped=3), conn("c:1", "fast", skipped=0)], now=1.0
    )
    slow, fast = viewer(registry, "slow"), viewer(registry, "fast")
    assert (slow.skipped_to_keyframe, fast.skipped_to_keyframe) == (3, 0)


# -- ticket expiry ---------------------------------------------------------------------------


def test_an_unused_ticket_expires_after_its_ttl_and_not_before() -> None:
    registry = ViewerRegistry(ticket_ttl_s=60.0)
    registry.register("v1", "alice", "s1", now=100.0)
    registry.register("v2", "bob", "s1", now=110.0)
    assert registry.next_deadline() == 160.0
    assert registry.expire(now=159.9) == []
    assert registry.expire(now=160.0) == [
        TicketExpired(at=160.0, viewer_id="v1", shard_id="s1", state=P.PENDING)
    ]
    assert registry.get("v1") is None
    assert registry.next_deadline() == 170.0
    registry.reconcile("s1", [conn("b:1", "v2")], now=165.0)
    # A connected viewer's ticket no longer expires.
    assert registry.next_deadline() is None
    assert registry.expire(now=1000.0) == []
    assert state(registry, "v2") is P.CONNECTED


def test_a_report_expires_its_own_shards_overdue_tickets_only() -> None:
    registry = ViewerRegistry(ticket_ttl_s=60.0)
    registry.register("on_s1", "alice", "s1", now=0.0)
    registry.register("on_s2", "bob", "s2", now=0.0)
    events = registry.reconcile("s1", [], now=60.0)
    assert events == [TicketExpired(at=60.0, viewer_id="on_s1", shard_id="s1", state=P.PENDING)]
    assert state(registry, "on_s2") is P.PENDING
    # A connection in the same report that is past the ttl still connects: it was used.
    registry.register("late", "carol", "s2", now=10.0)
    events = registry.reconcile("s2", [conn("c:1", "late")], now=75.0)
    assert events == [
        ViewerConnected(
            at=75.0, viewer_id="late", shard_id="s2", peer_id="c:1", previous=P.PENDING
        ),
        TicketExpired(at=75.0, viewer_id="on_s2", shard_id="s2", state=P.PENDING),
    ]


def test_move_gives_a_pending_viewer_a_fresh_ticket() -> None:
    registry = ViewerRegistry(ticket_ttl_s=60.0)
    registry.register("v1", "alice", "s1", now=0.0)
    moved = registry.move("v1", "s2", now=50.0)
    assert (moved.state, moved.shard_id, moved.state_since) == (P.PENDING, "s2", 50.0)
    assert registry.next_deadline() == 110.0
    assert registry.per_shard()["s1"].viewers == 0
    assert registry.per_shard()["s2"].pending == 1


# -- shard loss ------------------------------------------------------------------------------


def test_shard_lost_then_reconnect_on_another_shard() -> None:
    registry = ViewerRegistry(ticket_ttl_s=60.0)
    for viewer_id in ("v1", "v2"):
        registry.register(viewer_id, viewer_id, "s1", now=0.0)
    registry.register("v3", "v3", "s2", now=0.0)
    registry.reconcile("s1", [conn("a:1", "v1", sent=900), conn("b:1", "v2")], now=1.0)
    registry.reconcile("s2", [conn("c:1", "v3")], now=1.0)

    events = registry.shard_lost("s1", now=5.0)
    assert events == [
        ViewerReconnecting(at=5.0, viewer_id="v1", lost_shard_id="s1", previous=P.CONNECTED),
        ViewerReconnecting(at=5.0, viewer_id="v2", lost_shard_id="s1", previous=P.CONNECTED),
    ]
    assert registry.count(P.RECONNECTING) == 2
    assert "s1" not in registry.per_shard()
    # They still hold seats on the stream: they are coming back.
    assert registry.stream_viewers() == 3
    assert registry.shard_lost("s1", now=6.0) == []

    # A report that was in flight from the dead shard brings no one back.
    assert registry.reconcile("s1", [conn("a:1", "v1")], now=6.0) == []
    assert state(registry, "v1") is P.RECONNECTING

    # The supervisor gives v1 a ticket for s2; it connects there.
    registry.move("v1", "s2", now=7.0)
    assert registry.per_shard()["s2"] == ShardCount(shard_id="s2", reconnecting=1, connected=1)
    events = registry.reconcile("s2", [conn("c:1", "v3"), conn("a:9", "v1", sent=100)], now=8.0)
    assert events == [
        ViewerConnected(
            at=8.0, viewer_id="v1", shard_id="s2", peer_id="a:9", previous=P.RECONNECTING
        )
    ]
    record = viewer(registry, "v1")
    assert (record.shard_id, record.bytes_sent) == ("s2", 1000)

    # v2 never came back: its reconnection expires ttl after the loss.
    assert registry.next_deadline() == 65.0
    assert registry.expire(now=65.0) == [
        TicketExpired(at=65.0, viewer_id="v2", shard_id=None, state=P.RECONNECTING)
    ]
    assert registry.stream_viewers() == 2


def test_a_viewer_without_a_new_ticket_is_adopted_by_the_survivor_it_reaches() -> None:
    registry = ViewerRegistry()
    registry.register("v1", "alice", "s1", now=0.0)
    registry.reconcile("s1", [conn("a:1", "v1")], now=1.0)
    registry.shard_lost("s1", now=2.0)
    events = registry.reconcile("s2", [conn("a:2", "v1")], now=3.0)
    assert events == [
        ViewerConnected(
            at=3.0, viewer_id="v1", shard_id="s2", peer_id="a:2", previous=P.RECONNECTING
        )
    ]
    assert registry.anonymous() == []


def test_a_viewer_already_disconnected_is_not_called_back_by_a_shard_loss() -> None:
    registry = ViewerRegistry()
    registry.register("gone", "alice", "s1", now=0.0)
    registry.register("here", "bob", "s1", now=0.0)
    registry.reconcile("s1", [conn("a:1", "gone"), conn("b:1", "here")], now=1.0)
    registry.reconcile("s1", [conn("b:1", "here")], now=2.0)
    events = registry.shard_lost("s1", now=3.0)
    assert events == [
        ViewerReconnecting(at=3.0, viewer_id="here", lost_shard_id="s1", previous=P.CONNECTED)
    ]
    assert state(registry, "gone") is P.DISCONNECTED
    assert registry.stream_viewers() == 1


def test_a_ticketed_viewer_on_the_wrong_shard_does_not_leave_its_own() -> None:
    registry = ViewerRegistry()
    registry.register("v1", "alice", "s1", now=0.0)
    registry.reconcile("s1", [conn("a:1", "v1")], now=1.0)
    # s2 reports a connection claiming v1 (a stale or copied ticket): v1 stays on s1.
    registry.reconcile("s2", [conn("z:9", "v1")], now=2.0)
    v1 = viewer(registry, "v1")
    assert (v1.shard_id, v1.connection_peer) == ("s1", "a:1")
    assert registry.reconcile("s1", [conn("a:1", "v1")], now=3.0) == []


def test_a_lost_shard_takes_no_new_tickets() -> None:
    registry = ViewerRegistry()
    registry.register("v1", "alice", "s2", now=0.0)
    registry.shard_lost("s1", now=1.0)
    with pytest.raises(StreamStateError, match="shard s1 was lost"):
        registry.register("v2", "bob", "s1", now=2.0)
    with pytest.raises(StreamStateError, match="shard s1 was lost"):
        registry.move("v1", "s1", now=2.0)


# -- anonymous connections -------------------------------------------------------------------


def test_connections_that_name_no_ticket_are_counted_as_anonymous() -> None:
    registry = ViewerRegistry()
    registry.register("v1", "alice", "s1", now=0.0)
    events = registry.reconcile(
        "s1",
        [conn("a:1", "v1"), conn("x:1", None, sent=50), conn("x:2", "forged")],
        now=1.0,
    )
    assert events == [
        ViewerConnected(at=1.0, viewer_id="v1", shard_id="s1", peer_id="a:1", previous=P.PENDING),
        AnonymousConnected(at=1.0, shard_id="s1", peer_id="x:1", claimed_viewer_id=None),
        AnonymousConnected(at=1.0, shard_id="s1", peer_id="x:2", claimed_viewer_id="forged"),
    ]
    assert registry.per_shard()["s1"] == ShardCount(shard_id="s1", connected=1, anonymous=2)
    assert registry.stream_viewers() == 3
    assert registry.count() == 1  # anonymous connections are not registered viewers
    assert registry.get("forged") is None

    # Still there next time: no new events, the first-seen time is kept.
    assert (
        registry.reconcile("s1", [conn("a:1", "v1"), conn("x:1"), conn("x:2", "forged")], 2.0) == []
    )
    assert [c.since for c in registry.anonymous("s1")] == [1.0, 1.0]

    events = registry.reconcile("s1", [conn("a:1", "v1"), conn("x:2", "forged")], now=3.0)
    assert events == [AnonymousDisconnected(at=3.0, shard_id="s1", peer_id="x:1")]
    assert registry.per_shard()["s1"].anonymous == 1


def test_a_ticket_for_another_shard_or_a_second_connection_is_anonymous() -> None:
    registry = ViewerRegistry()
    registry.register("v1", "alice", "s1", now=0.0)
    registry.register("v2", "bob", "s2", now=0.0)
    registry.reconcile("s1", [conn("a:1", "v1")], now=1.0)
    # v1 opens a second connection, listed first; v2 shows up on s1 with a ticket for s2.
    events = registry.reconcile(
        "s1", [conn("a:2", "v1"), conn("a:1", "v1"), conn("b:1", "v2")], 2.0
    )
    assert events == [
        AnonymousConnected(at=2.0, shard_id="s1", peer_id="a:2", claimed_viewer_id="v1"),
        AnonymousConnected(at=2.0, shard_id="s1", peer_id="b:1", claimed_viewer_id="v2"),
    ]
    v1, v2 = viewer(registry, "v1"), viewer(registry, "v2")
    assert v1.connection_peer == "a:1"
    assert (v2.state, v2.shard_id) == (P.PENDING, "s2")
    assert registry.per_shard()["s1"] == ShardCount(shard_id="s1", connected=1, anonymous=2)


def test_moving_a_connected_viewer_leaves_its_old_connection_anonymous() -> None:
    registry = ViewerRegistry()
    registry.register("v1", "alice", "s1", now=0.0)
    registry.reconcile("s1", [conn("a:1", "v1")], now=1.0)
    moved = registry.move("v1", "s2", now=2.0)
    assert moved.state is P.RECONNECTING
    # Its old connection lingers until the supervisor closes it: counted, but not as v1.
    events = registry.reconcile("s1", [conn("a:1", "v1")], now=3.0)
    assert events == [
        AnonymousConnected(at=3.0, shard_id="s1", peer_id="a:1", claimed_viewer_id="v1")
    ]
    assert state(registry, "v1") is P.RECONNECTING
    # Moving a connected viewer to the shard it is on changes nothing.
    registry.reconcile("s2", [conn("a:2", "v1")], now=4.0)
    assert registry.move("v1", "s2", now=5.0).state is P.CONNECTED


def test_a_lost_shards_anonymous_connections_go_with_it() -> None:
    registry = ViewerRegistry()
    registry.reconcile("s1", [conn("x:1")], now=1.0)
    assert registry.stream_viewers() == 1
    assert registry.shard_lost("s1", now=2.0) == [
        AnonymousDisconnected(at=2.0, shard_id="s1", peer_id="x:1")
    ]
    assert registry.stream_viewers() == 0


# -- shards, counts and idle time ------------------------------------------------------------


def test_idle_since_follows_the_seats_on_each_shard() -> None:
    registry = ViewerRegistry(ticket_ttl_s=60.0)
    registry.add_shard("s1", now=0.0)
    assert registry.per_shard()["s1"].idle_since == 0.0
    registry.register("v1", "alice", "s1", now=5.0)
    assert registry.per_shard()["s1"].idle_since is None
    registry.reconcile("s1", [conn("a:1", "v1")], now=6.0)
    assert registry.per_shard()["s1"].idle_since is None
    registry.reconcile("s1", [], now=20.0)
    assert registry.per_shard()["s1"].idle_since == 20.0
    # Staying idle keeps the time it became idle.
    registry.reconcile("s1", [], now=25.0)
    assert registry.per_shard()["s1"].idle_since == 20.0
    # An anonymous connection takes a seat too.
    registry.reconcile("s1", [conn("x:1")], now=26.0)
    assert registry.per_shard()["s1"].idle_since is None
    registry.reconcile("s1", [], now=27.0)
    registry.register("v2", "bob", "s1", now=28.0)
    registry.remove("v2", now=29.0)
    assert registry.per_shard()["s1"].idle_since == 29.0


def test_expiry_makes_a_shard_idle() -> None:
    registry = ViewerRegistry(ticket_ttl_s=10.0)
    registry.register("v1", "alice", "s1", now=0.0)
    registry.expire(now=10.0)
    assert registry.per_shard()["s1"].idle_since == 10.0


def test_count_by_state_and_listing() -> None:
    registry = ViewerRegistry()
    registry.register("v1", "a", "s1", now=0.0)
    registry.register("v2", "b", "s1", now=0.0)
    registry.register("v3", "c", "s2", now=0.0)
    registry.reconcile("s1", [conn("a:1", "v1")], now=1.0)
    assert registry.count() == 3
    assert registry.count(P.PENDING) == 2
    assert registry.count(states=[P.CONNECTED, P.PENDING]) == 3
    assert registry.count(states=[P.DISCONNECTED]) == 0
    assert [r.viewer_id for r in registry.viewers()] == ["v1", "v2", "v3"]
    assert [r.viewer_id for r in registry.viewers("s2")] == ["v3"]


def test_remove_forgets_a_viewer() -> None:
    registry = ViewerRegistry()
    registry.register("v1", "alice", "s1", now=0.0)
    removed = registry.remove("v1")
    assert removed.viewer_id == "v1"
    assert registry.get("v1") is None and registry.count() == 0
    with pytest.raises(StreamNotFoundError, match="no viewer v1"):
        registry.remove("v1")
    with pytest.raises(StreamNotFoundError, match="no viewer v1"):
        registry.move("v1", "s1", now=1.0)
    # Its id can be issued again, starting from nothing.
    assert registry.register("v1", "alice", "s1", now=2.0).bytes_sent == 0


def test_events_cross_process_boundaries_as_tagged_json() -> None:
    event = ViewerConnected(at=1.0, viewer_id="v", shard_id="s", peer_id="p", previous=P.PENDING)
    wire = msgspec.json.encode(event)
    assert b'"type":"ViewerConnected"' in wire
    decoded = msgspec.json.decode(
        wire, type=ViewerConnected | ViewerDisconnected | TicketExpired | ViewerReconnecting
    )
    assert decoded == event and isinstance(decoded, RegistryEvent)


# -- bad input -------------------------------------------------------------------------------


def test_bad_input_is_refused_clearly() -> None:
    for ttl in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="ticket_ttl_s"):
            ViewerRegistry(ticket_ttl_s=ttl)
    registry = ViewerRegistry()
    with pytest.raises(ConfigError, match="non-empty id"):
        registry.register("", "alice", "s1", now=0.0)
    with pytest.raises(ConfigError, match="non-empty id"):
        registry.register("v1", "alice", "", now=0.0)
    registry.register("v1", "alice", "s1", now=0.0)
    with pytest.raises(StreamStateError, match="already registered"):
        registry.register("v1", "alice", "s2", now=1.0)
    with pytest.raises(ConfigError, match="same connection twice"):
        registry.reconcile("s1", [conn("a:1", "v1"), conn("a:1", None)], now=1.0)
    # The rejected report changed nothing.
    assert state(registry, "v1") is P.PENDING
    with pytest.raises(ConfigError, match="counters cannot be negative"):
        conn("a:1", "v1", sent=-1)
    with pytest.raises(ConfigError, match="empty viewer id"):
        conn("a:1", "")
    with pytest.raises(ConfigError, match="peer id"):
        conn("")
