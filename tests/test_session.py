"""The stream session's state table (shared.control.session), event by event."""

from __future__ import annotations

import pytest

from shared.control.session import StreamEvent, StreamLifecycle, StreamOperation
from shared.errors import StreamStateError
from shared.models import (
    ErrorInfo,
    QualityPreset,
    StreamQuality,
    StreamSession,
    StreamState,
    StreamStats,
    StreamType,
    TestPatternSource,
)

S, E, Op = StreamState, StreamEvent, StreamOperation
DIED = ErrorInfo(kind="ActorDiedError", message="the encoder died")
LATER = ErrorInfo(kind="RuntimeError", message="a consequence")


def session(state: StreamState = S.STARTING) -> StreamSession:
    return StreamSession(
        session_id="s1",
        stream_type=StreamType.CAMERA,
        source=TestPatternSource(),
        viewers=[],
        quality=StreamQuality.from_preset(QualityPreset.LOW),
        state=state,
        stats=StreamStats(),
        created_at=1.0,
    )


def lifecycle_in(state: StreamState) -> tuple[StreamLifecycle, StreamSession]:
    """A lifecycle driven into ``state`` by legal events only."""
    record = session()
    lifecycle = StreamLifecycle(record)
    path = {
        S.STARTING: [],
        S.ACTIVE: [E.STARTED],
        S.ERROR: [E.STARTED, E.FAILED],
        S.STOPPING: [E.STARTED, E.STOP],
        S.STOPPED: [E.STARTED, E.STOP, E.STOPPED],
    }[state]
    for event in path:
        if event is E.FAILED:
            lifecycle.fail(DIED)
        else:
            lifecycle.handle(event)
    assert record.state is state
    return lifecycle, record


def test_a_clean_life_goes_starting_active_stopping_stopped() -> None:
    record = session()
    lifecycle = StreamLifecycle(record)
    seen = []
    for event in (E.STARTED, E.STOP, E.STOPPED):
        seen.append((lifecycle.handle(event), record.state))
    assert seen == [(S.ACTIVE, S.ACTIVE), (S.STOPPING, S.STOPPING), (S.STOPPED, S.STOPPED)]
    assert record.error is None


def test_a_failure_while_active_is_kept_through_the_stop() -> None:
    lifecycle, record = lifecycle_in(S.ACTIVE)
    assert lifecycle.fail(DIED) is True
    assert record.state is S.ERROR and record.error == DIED
    assert lifecycle.fail(LATER) is False  # the first failure is the one reported
    assert record.error == DIED
    assert lifecycle.handle(E.STOP) is S.STOPPING
    assert lifecycle.handle(E.STOPPED) is S.ERROR  # the final session still says why
    assert record.error == DIED


def test_a_failure_noticed_while_stopping_ends_the_stream_in_error() -> None:
    lifecycle, record = lifecycle_in(S.STOPPING)
    assert lifecycle.fail(DIED) is True
    assert record.state is S.STOPPING  # the teardown goes on
    assert lifecycle.handle(E.STOPPED) is S.ERROR and record.error == DIED


def test_a_failed_start_is_an_error() -> None:
    lifecycle, record = lifecycle_in(S.STARTING)
    assert lifecycle.fail(DIED) is True and record.state is S.ERROR


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (S.STARTING, E.STOP),
        (S.STARTING, E.STOPPED),
        (S.ACTIVE, E.STARTED),
        (S.ACTIVE, E.STOPPED),
        (S.ERROR, E.STARTED),
        (S.ERROR, E.STOPPED),
        (S.STOPPING, E.STARTED),
        (S.STOPPING, E.STOP),
        (S.STOPPED, E.STARTED),
        (S.STOPPED, E.STOP),
        (S.STOPPED, E.STOPPED),
        (S.STOPPED, E.FAILED),
    ],
)
def test_an_event_the_table_lacks_raises_and_changes_nothing(
    state: StreamState, event: StreamEvent
) -> None:
    lifecycle, record = lifecycle_in(state)
    error = record.error
    with pytest.raises(StreamStateError, match=repr(event.value)):
        if event is E.FAILED:
            lifecycle.fail(LATER)
        else:
            lifecycle.handle(event)
    assert record.state is state and record.error == error


def test_a_stream_that_ended_in_error_takes_no_more_events() -> None:
    lifecycle, record = lifecycle_in(S.ERROR)
    lifecycle.handle(E.STOP)
    assert lifecycle.handle(E.STOPPED) is S.ERROR
    for event in (E.STOP, E.STARTED):
        with pytest.raises(StreamStateError, match="after it stopped"):
            lifecycle.handle(event)
    with pytest.raises(StreamStateError, match="after it stopped"):
        lifecycle.fail(LATER)
    assert record.state is S.ERROR and record.error == DIED
    assert not lifecycle.running and not lifecycle.allows(Op.REMOVE_VIEWER)


def test_failed_goes_through_fail_with_its_error_info() -> None:
    lifecycle, _ = lifecycle_in(S.ACTIVE)
    with pytest.raises(StreamStateError, match="ErrorInfo"):
        lifecycle.handle(E.FAILED)


def test_a_lifecycle_begins_at_starting() -> None:
    with pytest.raises(StreamStateError, match="begins at starting"):
        StreamLifecycle(session(S.ACTIVE))


@pytest.mark.parametrize(
    ("state", "running"),
    [
        (S.STARTING, False),
        (S.ACTIVE, True),
        (S.ERROR, True),
        (S.STOPPING, False),
        (S.STOPPED, False),
    ],
)
def test_only_a_running_stream_has_its_actors_polled(state: StreamState, running: bool) -> None:
    lifecycle, _ = lifecycle_in(state)
    assert lifecycle.running is running


def test_an_active_stream_allows_every_change() -> None:
    lifecycle, _ = lifecycle_in(S.ACTIVE)
    for operation in StreamOperation:
        assert lifecycle.allows(operation)
        lifecycle.check(operation)  # does not raise


def test_a_failed_stream_only_lets_viewers_go() -> None:
    lifecycle, _ = lifecycle_in(S.ERROR)
    assert lifecycle.allows(Op.REMOVE_VIEWER)
    for operation in set(StreamOperation) - {Op.REMOVE_VIEWER}:
        assert not lifecycle.allows(operation)
    with pytest.raises(
        StreamStateError,
        match=r"cannot add a viewer: stream s1 failed \(ActorDiedError: the encoder died\)",
    ):
        lifecycle.check(Op.ADD_VIEWER)


@pytest.mark.parametrize(
    ("state", "why"),
    [(S.STARTING, "is still starting"), (S.STOPPING, "is stopping"), (S.STOPPED, "has stopped")],
)
def test_a_stream_starting_or_stopping_changes_nothing(state: StreamState, why: str) -> None:
    lifecycle, _ = lifecycle_in(state)
    for operation in StreamOperation:
        assert not lifecycle.allows(operation)
        with pytest.raises(StreamStateError, match=f"cannot {operation.value}: stream s1 {why}"):
            lifecycle.check(operation)
