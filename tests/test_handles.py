"""Typed actor handles and the supervisor's viewer removal, without Ray.

The handles are the real classes; only the Ray actor handle inside them is a stand-in with the
same ``method.remote(...)`` shape, whose calls return awaitables as Ray's ObjectRefs are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

import pytest
import ray

from actors.handles import EncoderHandle, QualityHandle, SenderHandle
from actors.shards import ShardPool
from actors.stages.encoder import EncoderActor
from actors.stages.recorder import RecorderActor
from actors.stages.sender import SenderActor
from shared.errors import ConfigError
from shared.models import QualityPreset, StreamQuality
from shared.roq.tls import generate_self_signed

IDENTITY = generate_self_signed("127.0.0.1")


class _Ref:
    """Stands in for an ObjectRef: awaitable, and nothing to clean up if nobody awaits it."""

    def __init__(self, result: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        self._result = result

    def __await__(self) -> Generator[Any, None, Any]:
        return self._result().__await__()


class FakeActor:
    """A Ray actor handle's stand-in: ``actor.method.remote(*args)`` logs ``name.method(args)``
    and returns an awaitable that raises ``fails[method]``, never ends (``hangs``) or returns
    ``returns[method]``."""

    def __init__(
        self,
        name: str,
        log: list[str],
        *,
        fails: dict[str, BaseException] | None = None,
        returns: dict[str, Any] | None = None,
        hangs: set[str] | None = None,
    ) -> None:
        self.name, self.log = name, log
        self.fails, self.returns, self.hangs = fails or {}, returns or {}, hangs or set()

    def __getattr__(self, method: str) -> Any:
        actor = self

        class Method:
            @staticmethod
            def remote(*args: Any) -> Awaitable[Any]:
                actor.log.append(f"{actor.name}.{method}{args}")
                return _Ref(lambda: actor._result(method))

        return Method()

    async def _result(self, method: str) -> Any:
        if method in self.hangs:
            await asyncio.Event().wait()
        if method in self.fails:
            raise self.fails[method]
        return self.returns.get(method)


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Who ``Handle.kill`` killed (``ray.kill`` on a stand-in would refuse it)."""
    killed: list[str] = []

    def kill(actor: FakeActor, *, no_restart: bool) -> None:
        assert no_restart
        killed.append(actor.name)

    monkeypatch.setattr(ray, "kill", kill)
    return killed


QUALITY = StreamQuality.from_preset(QualityPreset.LOW)


def test_a_control_call_returns_what_the_actor_returned() -> None:
    log: list[str] = []
    encoder = EncoderHandle(FakeActor("encoder", log, returns={"configure": QUALITY}))
    assert asyncio.run(encoder.configure(QUALITY)) == QUALITY
    assert log == [f"encoder.configure({QUALITY!r},)"]


def test_a_remote_error_is_the_actors_own_error_not_rays_wrapper() -> None:
    remote = ray.exceptions.RayTaskError(
        "configure", "Traceback ...", ConfigError("resolution 1281x720 is impossible")
    ).as_instanceof_cause()
    encoder = EncoderHandle(FakeActor("encoder", [], fails={"configure": remote}))
    with pytest.raises(ConfigError, match="1281x720") as caught:
        asyncio.run(encoder.configure(QUALITY))
    assert type(caught.value) is ConfigError  # the cause itself, not RayTaskError(ConfigError)


def test_a_control_call_past_its_deadline_is_a_timeout() -> None:
    sender = SenderHandle(FakeActor("sender", [], hangs={"stats"}), timeout=0.05)
    with pytest.raises(TimeoutError):
        asyncio.run(sender.stats())


def test_a_keyframe_request_is_sent_without_waiting() -> None:
    log: list[str] = []
    encoder = EncoderHandle(FakeActor("encoder", log, hangs={"request_keyframe"}))
    encoder.request_keyframe()  # returns although the actor never answers
    encoder.request_keyframe(None)
    assert log == ["encoder.request_keyframe(0,)", "encoder.request_keyframe(None,)"]


def test_no_actor_takes_a_call_per_frame() -> None:
    # Frames and packets are announced by the segments' doorbells; a per-frame Ray call
    # coming back would put an actor task on every frame again.
    for actor_class in (EncoderActor, SenderActor, RecorderActor):
        for method in ("frame_ready", "packets_ready", "subscribe"):
            assert not hasattr(actor_class, method), f"{actor_class.__name__}.{method}"


# --- removing a viewer -------------------------------------------------------------------------


def stop_shard(quality: FakeActor | None, sender: FakeActor) -> None:
    pool = ShardPool(
        session_id="s1",
        node_id="n",
        host="127.0.0.1",
        identity=IDENTITY,
        video_ring=None,
        encoder=None,
        quality=QualityHandle(quality) if quality else None,
    )
    asyncio.run(pool._stop_handle("shard-1", SenderHandle(sender)))


def test_stopping_a_shard_takes_it_out_of_quality_stops_and_kills_it(kills: list[str]) -> None:
    log: list[str] = []
    stop_shard(FakeActor("quality", log), FakeActor("sender", log))
    assert log == ["quality.remove_sender('shard-1',)", "sender.stop()"]
    assert kills == ["sender"]


def test_a_failed_step_is_logged_and_the_other_steps_still_run(
    kills: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    log: list[str] = []
    quality = FakeActor("quality", log, fails={"remove_sender": ConfigError("quality gone")})
    with caplog.at_level(logging.WARNING, logger="actors.shards"):
        stop_shard(quality, FakeActor("sender", log))
    assert log == [
        "quality.remove_sender('shard-1',)",
        "sender.stop()",  # attempted although the step before failed
    ]
    assert kills == ["sender"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["stream s1: shard-1 out of quality: quality gone"]


def test_a_shard_that_will_not_stop_is_killed_anyway(
    kills: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    sender = FakeActor("sender", [], fails={"stop": ray.exceptions.ActorDiedError()})
    with caplog.at_level(logging.WARNING, logger="actors.shards"):
        stop_shard(None, sender)  # an audio-only stream: no quality actor
    assert kills == ["sender"]
    assert [r.getMessage().split(":")[1] for r in caplog.records] == [" could not stop shard-1"]


def test_spawn_refuses_a_handle_of_another_actor_class() -> None:
    from actors.placement import spawn
    from actors.stages.capture import CaptureActor

    with pytest.raises(TypeError, match="SenderHandle wraps SenderActor"):
        spawn(CaptureActor, SenderHandle, name="kz-x-sender", node_id="n")
