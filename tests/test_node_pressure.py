"""NodePressure on a fake clock: the node's streams shed lowest priority first, get their work
back last, and a new stream that nothing below it can make room for is refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shared.control.pressure import NodePressure, PressureAction, PressureDecision
from shared.errors import ConfigError, ResourceError

#: CPU points each of a stream's steps saves in the model node: the frame rate, rung 0, rung 1.
STEP_COST = (6.0, 10.0, 4.0)


def model_cpu(node: NodePressure, streams: list[str], background: float) -> float:
    """A background load plus each stream's encoder work, less what its steps in force save."""
    cpu = background
    for stream in streams:
        level = node.state(stream).level if stream in node else 0
        cpu += sum(STEP_COST) - sum(STEP_COST[:level])
    return min(cpu, 100.0)


def drive(
    node: NodePressure,
    streams: list[str],
    background: Callable[[float], float],
    start: float,
    end: float,
    *,
    late: Callable[[float], int] = lambda t: 0,
) -> list[PressureDecision]:
    decisions = []
    now = start
    while now <= end:
        cpu = model_cpu(node, streams, background(now))
        decision = node.on_sample(cpu, now, late_frames=late(now))
        if decision is not None:
            decisions.append(decision)
        now += 1.0
    return decisions


def node_of(*streams: tuple[str, int]) -> NodePressure:
    node = NodePressure()
    for stream, priority in streams:
        node.add_stream(stream, priority=priority, framerate=30, rungs=3)
    return node


def test_the_lowest_priority_sheds_everything_before_a_higher_one_sheds_anything() -> None:
    node = node_of(("main", 10), ("lobby", 0), ("backstage", 5))
    streams = ["main", "lobby", "backstage"]
    # A background load that pins the node: every step of every stream is shed in the end.
    shed = drive(node, streams, lambda t: 95.0, 0.0, 60.0)
    assert [d.stream for d in shed] == ["lobby"] * 3 + ["backstage"] * 3 + ["main"] * 3
    assert [d.action for d in shed[:3]] == [
        PressureAction.LOWER_FRAMERATE,
        PressureAction.RETIRE_RUNG,
        PressureAction.RETIRE_RUNG,
    ]
    assert shed[0].reason.endswith("frame rate 30 -> 15 fps (priority 0, below 2 other stream(s))")
    assert (shed[2].framerate, shed[2].retired_rungs, shed[2].level) == (15, (0, 1), 3)
    assert node.saturated
    # The load goes: the highest priority gets its work back first, the lowest last.
    restored = drive(node, streams, lambda t: 0.0, 61.0, 600.0)
    assert [d.stream for d in restored] == ["main"] * 3 + ["backstage"] * 3 + ["lobby"] * 3
    assert [d.action for d in restored[:3]] == [
        PressureAction.RESTORE_RUNG,
        PressureAction.RESTORE_RUNG,
        PressureAction.RESTORE_FRAMERATE,
    ]
    assert node.level == 0


def test_only_as_much_as_the_pressure_needs_and_only_from_below() -> None:
    node = node_of(("main", 10), ("lobby", 0))
    # 60 + 2 * 20 = 100 % wanted: two of the lobby's steps (16 points) bring it under 85 %.
    shed = drive(node, ["main", "lobby"], lambda t: 60.0, 0.0, 120.0)
    assert [d.stream for d in shed] == ["lobby", "lobby"]
    assert node.state("main").level == 0


def test_late_frames_shed_the_lowest_priority_at_once() -> None:
    node = node_of(("main", 10), ("lobby", 0))
    # The CPU is not high, but frames come out late (the main stream's, say): the lobby gives
    # way first, one step per settle time.
    shed = drive(node, ["main", "lobby"], lambda t: 0.0, 0.0, 8.0, late=lambda t: 3)
    assert [(d.stream, d.at) for d in shed] == [("lobby", 0.0), ("lobby", 3.0), ("lobby", 6.0)]
    assert shed[0].reason.startswith("3 frames came out late")


def test_equal_priorities_take_turns() -> None:
    node = node_of(("a", 1), ("b", 1))
    shed = drive(node, ["a", "b"], lambda t: 95.0, 0.0, 30.0)
    assert [d.stream for d in shed] == ["a", "b", "a", "b", "a", "b"]


def test_a_stream_added_under_pressure_below_the_others_gives_way_next() -> None:
    node = node_of(("main", 10), ("lobby", 0))
    shed = drive(node, ["main", "lobby"], lambda t: 95.0, 0.0, 11.0)
    assert [d.stream for d in shed] == ["lobby"] * 3 + ["main"]
    node.add_stream("overflow", priority=0, framerate=30, rungs=2)
    shed = drive(node, ["main", "lobby", "overflow"], lambda t: 95.0, 12.0, 30.0)
    assert [d.stream for d in shed][:2] == ["overflow", "overflow"]
    # A stream that stops takes its steps with it: nothing to restore for it.
    node.remove_stream("overflow")
    restored = drive(node, ["main", "lobby"], lambda t: 0.0, 31.0, 600.0)
    assert "overflow" not in {d.stream for d in restored}
    assert node.level == 0


def test_a_new_stream_is_refused_when_nothing_below_it_can_make_room() -> None:
    node = node_of(("main", 10), ("lobby", 0))
    node.admit("new", 5)  # no pressure: anything may start
    drive(node, ["main", "lobby"], lambda t: 95.0, 0.0, 2.0)
    assert node.under_pressure and node.state("lobby").level == 1
    node.admit("new", 5)  # the lobby can still give way
    node.admit("new", 0)  # and take turns with an equal
    with pytest.raises(ResourceError, match="no running stream of priority -1 or lower"):
        node.admit("new", -1)  # below everyone: nobody to push
    drive(node, ["main", "lobby"], lambda t: 95.0, 3.0, 8.0)
    assert node.state("lobby").level == 3
    with pytest.raises(ResourceError) as refused:
        node.admit("new", 5)
    message = str(refused.value)
    assert message.startswith("cannot start stream new: the node's CPU is")
    assert "at or above 85%" in message
    assert "lobby (priority 0) has shed all it can" in message
    node.admit("urgent", 20)  # main (10) still has steps: it gives way to this one
    node.set_paused("main", True)  # paused, it encodes nothing: no room to make
    with pytest.raises(ResourceError, match=r"main \(priority 10\) is paused"):
        node.admit("urgent", 20)


def test_a_paused_stream_is_passed_over_it_has_nothing_to_shed() -> None:
    node = node_of(("main", 10), ("lobby", 0))
    node.set_paused("lobby", True)
    shed = drive(node, ["main"], lambda t: 95.0, 0.0, 5.0)
    assert [d.stream for d in shed] == ["main", "main"]
    node.set_paused("lobby", False)
    shed = drive(node, ["main", "lobby"], lambda t: 95.0, 6.0, 12.0)
    assert [d.stream for d in shed] == ["lobby", "lobby"]


def test_state_says_what_is_in_force_for_a_restarted_actor() -> None:
    node = node_of(("lobby", 0))
    assert node.state("lobby").level == 0 and node.state("lobby").framerate == 30
    drive(node, ["lobby"], lambda t: 95.0, 0.0, 5.0)
    state = node.state("lobby")
    assert (state.level, state.framerate, state.retired_rungs) == (2, 15, (0,))


def test_a_stream_added_twice_or_without_frames_is_refused() -> None:
    node = node_of(("lobby", 0))
    with pytest.raises(ConfigError, match="already"):
        node.add_stream("lobby", priority=0, framerate=30, rungs=3)
    with pytest.raises(ConfigError, match="need a frame rate"):
        node.add_stream("x", priority=0, framerate=0, rungs=3)


# -- the supervisor's shell (actors.node_pressure) ----------------------------------------------


class FakeQuality:
    def __init__(self) -> None:
        self.applied: list[PressureDecision] = []

    async def apply_pressure(self, decision: PressureDecision) -> None:
        self.applied.append(decision)


def test_the_shell_applies_each_step_to_its_stream_and_leaves_streams_that_do_not_shed() -> None:
    import asyncio
    from typing import Any, cast

    from actors.node_pressure import StreamPressure
    from shared.models import StreamConfig

    async def main() -> None:
        shell = StreamPressure()
        sheds = StreamConfig(shed_under_pressure=True, priority=0)
        keeps = StreamConfig(shed_under_pressure=False, priority=0)
        shell.add("lobby", sheds, framerate=30, rungs=2)
        shell.add("bench", keeps, framerate=30, rungs=2)
        assert shell.state("bench") is None and shell.state("lobby") is not None
        qualities = {"lobby": FakeQuality(), "bench": FakeQuality()}

        def quality_of(sid: str) -> Any:
            return qualities.get(sid)

        # The encoder skipped frames: late frames shed at once, on the next sample.
        shell.note_encoder("lobby", 10)
        shell.note_encoder("lobby", 14)
        shell.note_encoder("bench", 99)  # not a shedding stream: not counted
        decision = await shell.on_sample(10.0, 0.0, cast(Any, quality_of))
        assert decision is not None and decision.late_frames == 4
        for second in range(1, 30):
            await shell.on_sample(100.0, float(second), cast(Any, quality_of))
        assert [d.stream for d in qualities["lobby"].applied] == ["lobby", "lobby"]
        assert qualities["bench"].applied == []
        # Only a stream that sheds may be refused for pressure.
        shell.admit("other", keeps)
        with pytest.raises(ResourceError, match="cannot start stream other"):
            shell.admit("other", sheds)
        shell.remove("lobby")
        assert shell.state("lobby") is None

    asyncio.run(main())


# -- through the real supervisor ---------------------------------------------------------------


@pytest.mark.ray
def test_the_supervisor_sheds_the_lower_priority_stream_first_and_refuses_one_it_cannot_fit(
    ray_cluster: str,
) -> None:
    """Two streams that shed, priorities 0 and 5, on the session's cluster; thresholds so low
    that the node is under pressure as soon as it is measured.  The priority-0 stream gives
    way first (its quality controller halves its frame rate), then the priority-5 one; a new
    stream of priority 3 is refused, naming the stream below it that has nothing left."""
    import asyncio

    from actors import StreamManager
    from shared.control.pressure import PressureConfig
    from shared.models import Resolution, StreamConfig, StreamQuality
    from tests.conftest import wait_for_no_leaks
    from tests.test_pipeline import eventually

    quality = StreamQuality(resolution=Resolution(160, 96), framerate=30, bitrate=100_000)

    async def main() -> list[str]:
        async with StreamManager.start() as manager:
            sids = []
            for name, priority in (("low", 0), ("high", 5)):
                config = StreamConfig(
                    name=name, quality=quality, priority=priority, shed_under_pressure=True
                )
                sids.append((await manager.start_camera_stream(config)).session_id)
            # One step each (the frame rate); steps 3 s apart, so the order can be seen.
            await manager.set_pressure(
                PressureConfig(enter_percent=1.0, exit_percent=0.5, enter_hold_s=0.5, settle_s=3.0)
            )

            async def levels() -> dict[str, int]:
                return {s.name: s.stats.pressure_level for s in await manager.get_active_streams()}

            first = await eventually(levels, lambda lv: sum(lv.values()) >= 1, "a step")
            assert first == {"low": 1, "high": 0}
            both = await eventually(levels, lambda lv: lv["high"] == 1, "the second step")
            assert both == {"low": 1, "high": 1}
            low = next(s for s in await manager.get_active_streams() if s.name == "low")
            # Its quality controller applied it (the policy's words; a loaded machine may
            # have shed it on the default thresholds already, before the high one started).
            assert "frame rate 30 -> 15 fps" in low.stats.pressure_reason
            with pytest.raises(ResourceError, match=r"low \(priority 0\) has shed all it can"):
                await manager.start_camera_stream(
                    StreamConfig(quality=quality, priority=3, shed_under_pressure=True)
                )
            await manager.set_pressure(None)
            for sid in sids:
                await manager.stop_stream(sid)
            return sids

    for sid in asyncio.run(main()):
        wait_for_no_leaks(sid)
