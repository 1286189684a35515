"""``actors.recovery.until_back``: which of Ray's errors mean "still restarting" (retried) and
which mean "gone for good" (raised at once), with a stand-in actor and no cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
import ray

from actors.recovery import until_back


class Actor:
    """Answers ``__ray_ready__`` with each of ``outcomes`` in turn (an error to raise, or
    None for "ready"), then keeps answering with the last."""

    def __init__(self, outcomes: list[BaseException | Callable[[], Awaitable[None]] | None]):
        self.outcomes = outcomes
        self.calls = 0
        self.__ray_ready__ = self  # what until_back calls: handle.actor.__ray_ready__.remote()

    def remote(self) -> Awaitable[None]:
        outcome = self.outcomes[min(self.calls, len(self.outcomes) - 1)]
        self.calls += 1

        async def answer() -> None:
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome is not None:
                await outcome()

        return answer()


def handle(actor: Actor) -> Any:
    return cast(Any, type("Handle", (), {"actor": actor})())


def restarting() -> BaseException:
    return ray.exceptions.ActorUnavailableError("The actor is restarting", None)


def test_unavailable_while_restarting_is_retried_until_it_is_back() -> None:
    actor = Actor([restarting(), restarting(), restarting(), None])
    asyncio.run(until_back(handle(actor), timeout=30.0))
    assert actor.calls == 4


def test_an_actor_that_will_not_come_back_fails_at_once() -> None:
    actor = Actor([restarting(), ray.exceptions.ActorDiedError(), None])
    with pytest.raises(ray.exceptions.ActorDiedError):
        asyncio.run(until_back(handle(actor), timeout=30.0))
    assert actor.calls == 2  # never asked again


def test_a_restart_that_never_ends_is_a_timeout_with_the_reason() -> None:
    async def hang() -> None:
        await asyncio.Event().wait()

    for outcomes in ([restarting()], [hang]):
        with pytest.raises(TimeoutError, match=r"not back within 0\.3 s"):
            asyncio.run(until_back(handle(Actor(list(outcomes))), timeout=0.3))
