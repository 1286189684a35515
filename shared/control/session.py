"""The stream session's state machine, written as a table.

Theory of operation
===================

A stream is one ``StreamSession`` (``shared.models``), and its ``state`` says what the stream
is doing and what may be asked of it.  The supervisor (``actors.supervisor``) does the I/O: it
starts the stage actors, polls them, tears them down.  It reports what happened as events to a
:class:`StreamLifecycle`, and that object alone writes ``session.state`` and ``session.error``:
the rules live in the two tables below, not in the supervisor's methods.

The states are the design's ``StreamState``:

- STARTING: the actors are being created, in dependency order.  Nothing can be added to the
  stream yet: there is no encoder to subscribe a viewer or a recording to.
- ACTIVE: every stage is up.  The one state that takes new viewers, a quality change, a source
  switch or a recording.
- ERROR: a stage failed (its actor died, or it reported an error).  What is left keeps running
  until the caller stops the stream, but nothing new is started on it; a viewer can still be
  removed.  The first failure is the one reported: later ones are usually its consequences.
- STOPPING: the supervisor is tearing the actors down, in pipeline order.  A failure noticed
  now (a last stats poll finding an actor dead) is kept, and the stream ends in ERROR.
- STOPPED: every actor and segment is gone.  A stream that had failed ends in ERROR instead, so
  the final session the caller gets back still shows why.
- PAUSED: capture is stopped on request (PAUSE) and the stream's recordings are paused;
  every other actor stays up, so viewers stay connected (their last picture stays on screen)
  and new viewers may join.  RESUME makes it ACTIVE again.  Its actors are still polled.

Events move a stream between states as follows; any (state, event) pair missing from the table
is a bug in the caller and raises :class:`~shared.errors.StreamStateError` without changing
anything (as h11 does with a protocol event its state table does not allow)::

    state      event     new state
    ---------  --------  ---------------------------------------------
    STARTING   STARTED   ACTIVE
    STARTING   FAILED    ERROR      (the supervisor tears down and raises)
    ACTIVE     FAILED    ERROR
    ACTIVE     STOP      STOPPING
    ACTIVE     PAUSE     PAUSED
    PAUSED     RESUME    ACTIVE
    PAUSED     FAILED    ERROR
    PAUSED     STOP      STOPPING
    ERROR      FAILED    ERROR      (the first failure is kept)
    ERROR      STOP      STOPPING
    STOPPING   FAILED    STOPPING   (kept: the stream will end in ERROR)
    STOPPING   STOPPED   STOPPED, or ERROR if the stream had failed

STOPPED ends the lifecycle: a stream that ended in ERROR takes no more events, though a running
stream that failed does.  STOP is never taken twice: the supervisor serialises a stream's start
and stop, and a second stop finds the stream gone.

Reading a stream (its stats, its viewers) is allowed in every state, and its actors are polled
while it is ``running`` (ACTIVE, PAUSED, or ERROR before the stop): not while they are being created or
torn down, when a failed poll would only be the teardown seen from outside.  What each state
lets a caller change is the second table, ``_ALLOWED``.
"""

from __future__ import annotations

import enum
from typing import Final

from shared.errors import StreamStateError
from shared.models import ErrorInfo, StreamSession, StreamState

__all__ = ["StreamEvent", "StreamLifecycle", "StreamOperation"]


class StreamEvent(enum.Enum):
    """What the supervisor reports about a stream."""

    STARTED = "started"  # every stage is up
    FAILED = "failed"  # a stage failed (carries an ErrorInfo)
    STOP = "stop"  # a stop was asked for; teardown begins
    STOPPED = "stopped"  # teardown is done
    PAUSE = "pause"  # capture and recordings paused on request
    RESUME = "resume"  # capture and recordings resumed


class StreamOperation(enum.Enum):
    """Changes a caller can ask of a running stream (the value reads in an error message)."""

    ADD_VIEWER = "add a viewer"
    REMOVE_VIEWER = "remove a viewer"
    SWITCH_SOURCE = "switch the source"
    ADJUST_QUALITY = "adjust the quality"
    RECORD = "start a recording"


_S = StreamState
_E = StreamEvent

_TRANSITIONS: Final[dict[StreamState, dict[StreamEvent, StreamState]]] = {
    _S.STARTING: {_E.STARTED: _S.ACTIVE, _E.FAILED: _S.ERROR},
    _S.ACTIVE: {_E.FAILED: _S.ERROR, _E.STOP: _S.STOPPING, _E.PAUSE: _S.PAUSED},
    _S.ERROR: {_E.FAILED: _S.ERROR, _E.STOP: _S.STOPPING},
    _S.STOPPING: {_E.FAILED: _S.STOPPING, _E.STOPPED: _S.STOPPED},
    _S.STOPPED: {},
    _S.PAUSED: {_E.RESUME: _S.ACTIVE, _E.FAILED: _S.ERROR, _E.STOP: _S.STOPPING},
}

#: What each state lets a caller change.  A failed stream only lets viewers go: anything new
#: would be started on a pipeline with a dead stage.
_ALLOWED: Final[dict[StreamState, frozenset[StreamOperation]]] = {
    _S.STARTING: frozenset(),
    _S.ACTIVE: frozenset(StreamOperation),
    _S.ERROR: frozenset({StreamOperation.REMOVE_VIEWER}),
    _S.STOPPING: frozenset(),
    _S.STOPPED: frozenset(),
    # Viewers may come and go (they see the last picture until the stream resumes); what
    # would change the pipeline waits for the resume.
    _S.PAUSED: frozenset({StreamOperation.ADD_VIEWER, StreamOperation.REMOVE_VIEWER}),
}

_WHY_NOT: Final[dict[StreamState, str]] = {
    _S.STARTING: "is still starting",
    _S.STOPPING: "is stopping",
    _S.STOPPED: "has stopped",
    _S.PAUSED: "is paused",
}


class StreamLifecycle:
    """The state of one stream, kept in its ``StreamSession`` and changed only by events."""

    def __init__(self, session: StreamSession) -> None:
        if session.state is not StreamState.STARTING:
            raise StreamStateError(
                f"stream {session.session_id}: a lifecycle begins at starting, not {session.state}"
            )
        self._session = session
        self._finished = False

    @property
    def state(self) -> StreamState:
        return self._session.state

    @property
    def error(self) -> ErrorInfo | None:
        return self._session.error

    @property
    def running(self) -> bool:
        """Every stage was started and the stream is not being stopped: its actors are polled."""
        return not self._finished and self._session.state in (
            StreamState.ACTIVE,
            StreamState.PAUSED,
            StreamState.ERROR,
        )

    def handle(self, event: StreamEvent) -> StreamState:
        """Apply ``event`` (not FAILED: that is :meth:`fail`); the new state."""
        if event is StreamEvent.FAILED:
            raise StreamStateError("a failure needs its ErrorInfo: use fail(error)")
        return self._apply(event)

    def fail(self, error: ErrorInfo) -> bool:
        """Record a stage failure; True if it is the stream's first (the one reported)."""
        first = self._session.error is None
        self._apply(StreamEvent.FAILED)
        if first:
            self._session.error = error
        return first

    def _apply(self, event: StreamEvent) -> StreamState:
        state = self._session.state
        new = None if self._finished else _TRANSITIONS[state].get(event)
        if new is None:
            when = "after it stopped" if self._finished else f"while it is {state}"
            raise StreamStateError(
                f"stream {self._session.session_id}: {event.value!r} cannot happen {when}"
            )
        if new is StreamState.STOPPED:
            self._finished = True
            if self._session.error is not None:
                new = StreamState.ERROR
        self._session.state = new
        return new

    def allows(self, operation: StreamOperation) -> bool:
        return not self._finished and operation in _ALLOWED[self._session.state]

    def check(self, operation: StreamOperation) -> None:
        """Raise StreamStateError, saying why, unless the stream's state allows ``operation``."""
        if self.allows(operation):
            return
        session = self._session
        if self._finished:
            why = "has stopped"
        elif session.state is StreamState.ERROR and session.error is not None:
            why = f"failed ({session.error.kind}: {session.error.message}); stop it"
        else:
            why = _WHY_NOT.get(session.state, f"is {session.state}")
        raise StreamStateError(f"cannot {operation.value}: stream {session.session_id} {why}")
