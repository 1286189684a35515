"""QualityController and StreamScheduler: pure decisions, literal times."""

from __future__ import annotations

import pytest

from shared.control.quality import QualityController, ViewerFeedback, classify_connection
from shared.control.scheduler import NodeInfo, StreamScheduler
from shared.errors import ResourceError
from shared.models import ConnectionQuality, QualityPreset, StreamQuality


def feedback(viewer: str, loss: float, rtt: float = 10.0) -> ViewerFeedback:
    return ViewerFeedback(viewer_id=viewer, rtt_ms=rtt, loss_rate=loss)


def test_clean_network_keeps_the_ceiling() -> None:
    controller = QualityController(1_500_000, now=0.0)
    for second in range(1, 10):
        assert controller.update([feedback("a", 0.0)], now=float(second)) is None


def test_heavy_loss_backs_off_then_recovers_to_the_ceiling() -> None:
    controller = QualityController(1_000_000, now=0.0)
    targets = [controller.update([feedback("a", 0.3)], now=float(t)) for t in range(1, 6)]
    applied = [t for t in targets if t is not None]
    assert applied and applied == sorted(applied, reverse=True)
    assert applied[-1] < 600_000
    now, last = 5.0, applied[-1]
    for _ in range(60):
        now += 1.0
        target = controller.update([feedback("a", 0.0)], now=now)
        if target is not None:
            assert target > last
            last = target
    assert last == 1_000_000


def test_target_is_the_worst_viewer_and_never_below_the_floor() -> None:
    controller = QualityController(1_000_000, now=0.0)
    target = None
    for t in range(1, 40):
        target = (
            controller.update([feedback("good", 0.0), feedback("bad", 0.5)], now=float(t)) or target
        )
    assert target == 100_000  # 10% floor
    controller.remove_viewer("bad")
    assert controller.update([feedback("good", 0.0)], now=41.0) is not None


def test_ceiling_change_applies_at_once() -> None:
    controller = QualityController(1_000_000, now=0.0)
    controller.set_ceiling(400_000)
    assert controller.update([feedback("a", 0.0)], now=1.0) == 400_000


@pytest.mark.parametrize(
    ("loss", "rtt", "connected", "expected"),
    [
        (0.0, 5, True, ConnectionQuality.EXCELLENT),
        (0.02, 100, True, ConnectionQuality.GOOD),
        (0.05, 300, True, ConnectionQuality.FAIR),
        (0.2, 30, True, ConnectionQuality.POOR),
        (0.0, 5, False, ConnectionQuality.DISCONNECTED),
    ],
)
def test_classify_connection(
    loss: float, rtt: float, connected: bool, expected: ConnectionQuality
) -> None:
    item = ViewerFeedback(viewer_id="v", rtt_ms=rtt, loss_rate=loss, connected=connected)
    assert classify_connection(item) == expected


def test_scheduler_places_by_pixel_rate_and_refuses_when_full() -> None:
    scheduler = StreamScheduler(max_streams=8)
    nodes = [NodeInfo(node_id="n1", cpus=3), NodeInfo(node_id="n2", cpus=1)]
    medium = StreamQuality.from_preset(QualityPreset.MEDIUM)  # 27.6 Mpx/s
    ultra = StreamQuality.from_preset(QualityPreset.ULTRA)  # 124 Mpx/s
    high = StreamQuality.from_preset(QualityPreset.HIGH)  # 62 Mpx/s
    assert scheduler.place("a", medium, nodes, prefer="n2") == "n2"
    assert scheduler.place("b", high, nodes, prefer="n2") == "n1"  # n2 has 32 Mpx/s left
    with pytest.raises(ResourceError, match="no node has capacity"):
        scheduler.place("c", ultra, nodes)
    scheduler.release("a")
    scheduler.release("b")
    assert scheduler.place("c", ultra, nodes) == "n1"
    assert scheduler.node_of("c") == "n1"


def test_scheduler_stream_limit_and_dead_nodes() -> None:
    scheduler = StreamScheduler(max_streams=1)
    low = StreamQuality.from_preset(QualityPreset.LOW)
    with pytest.raises(ResourceError):
        scheduler.place("a", low, [NodeInfo(node_id="dead", cpus=8, alive=False)])
    scheduler.place("a", low, [NodeInfo(node_id="n", cpus=8)])
    with pytest.raises(ResourceError, match="limit is 1"):
        scheduler.place("b", low, [NodeInfo(node_id="n", cpus=8)])


# -- the quality actor's rounds: per-rung targets from the shards' viewers ----------------------


class FakeLadderEncoder:
    """What the quality actor calls on its encoder: the ladder, and each rung's bitrate."""

    def __init__(self, rates: list[int]) -> None:
        from shared.media.scaler import Rung

        self.rungs = [
            Rung(index=i, width=640 >> i, height=360 >> i, framerate=30, bitrate=rate)
            for i, rate in enumerate(rates)
        ]
        self.set: list[tuple[int, int]] = []
        self.paused: list[tuple[int, bool]] = []

    async def ladder(self) -> list[object]:
        return list(self.rungs)

    async def set_bitrate(self, bitrate: int, rung: int = 0) -> int:
        self.set.append((rung, bitrate))
        return bitrate

    async def set_paused(self, rung: int, paused: bool) -> bool:
        self.paused.append((rung, paused))
        return paused


def shard(peers: list[tuple[int, int]]) -> object:
    from actors.stages.sender import PeerStatus, SenderStats

    return SenderStats(
        pid=1,
        viewer_id="shard-1",
        url="",
        peers=[
            PeerStatus(
                peer_id=f"p{i}",
                address="127.0.0.1:1",
                connected_at=0.0,
                rung=rung,
                rung_wanted=rung,
                estimate_bps=estimate,
            )
            for i, (rung, estimate) in enumerate(peers)
        ],
        frames_sent=0,
        frames_missed=0,
        packets_sent=0,
        bytes_sent=0,
        keyframe_requests=0,
    )


def test_after_an_overload_of_thirty_viewers_the_stream_returns_to_its_quality() -> None:
    """The old bug: one shared target, stuck at ~300 kbps once the viewers had gone."""
    import asyncio
    from typing import Any, cast

    from actors.stages.quality import QualityActor

    async def main() -> list[tuple[int, int]]:
        encoder = FakeLadderEncoder([2_000_000, 600_000])
        actor = QualityActor("s", cast(Any, encoder), 2_000_000)
        await actor._plan()
        overloaded = shard([(0, 300_000)] * 30)
        await actor.apply([cast(Any, overloaded)], now=1.0)
        assert encoder.set[-1] == (0, 1_000_000)  # rung 0 at its floor, not lower
        await actor.apply([cast(Any, shard([]))], now=2.0)  # everyone left
        assert encoder.set[-1] == (0, 2_000_000)
        return encoder.set

    assert asyncio.run(main()) == [(0, 1_000_000), (0, 2_000_000)]


def test_each_rung_follows_its_own_viewers_and_the_lowest_may_go_lower() -> None:
    import asyncio
    from typing import Any, cast

    from actors.stages.quality import QualityActor

    async def main() -> dict[int, int]:
        encoder = FakeLadderEncoder([2_000_000, 600_000])
        actor = QualityActor("s", cast(Any, encoder), 2_000_000)
        await actor._plan()
        # Good viewers on the top rung, one poor one on the low rung: the top keeps its rate.
        stats = shard([(0, 3_000_000), (0, 2_500_000), (1, 200_000)])
        targets = await actor.apply([cast(Any, stats)], now=1.0)
        assert [t.viewers for t in targets] == [2, 1]
        return dict(encoder.set)

    assert asyncio.run(main()) == {1: 200_000}  # the lowest rung's floor is 10 %, not 50 %


def test_a_rung_nobody_watches_is_paused_and_resumed_for_a_viewer_going_to_it() -> None:
    import asyncio
    from typing import Any, cast

    from actors.stages.quality import QualityActor

    async def main() -> list[tuple[int, bool]]:
        encoder = FakeLadderEncoder([2_000_000, 600_000])
        actor = QualityActor("s", cast(Any, encoder), 2_000_000)
        await actor._plan()
        await actor.apply([cast(Any, shard([(0, 3_000_000)]))], now=1.0)
        assert encoder.paused == [(1, True)]  # rung 0 always runs
        going = cast(Any, shard([(0, 800_000)]))
        going.peers[0].rung_wanted = 1  # on its way down, waiting for rung 1's IDR
        await actor.apply([going], now=2.0)
        return encoder.paused

    assert asyncio.run(main()) == [(1, True), (1, False)]


class FakePressuredEncoder(FakeLadderEncoder):
    """Also records the reconfigurations (the top rung's frame rate)."""

    def __init__(self, rates: list[int]) -> None:
        super().__init__(rates)
        self.framerates: list[int] = []

    async def configure(self, quality: object) -> object:
        self.framerates.append(quality.framerate)  # type: ignore[attr-defined]
        return quality


class FakeShard:
    def __init__(self) -> None:
        self.floors: list[int] = []
        self.rates: list[list[int]] = []

    async def set_rung_floor(self, floor: int) -> None:
        self.floors.append(floor)

    async def set_rung_rates(self, rates: list[int]) -> None:
        self.rates.append(rates)


def test_cpu_pressure_halves_the_frame_rate_then_retires_the_top_rung_and_restores_both() -> None:
    """The quality actor applies the node's pressure steps for its stream (the policy's timing
    is tested with literal times in test_pressure.py and test_node_pressure.py): frame rate
    first, then rung 0 retired (paused in the encoder, every shard's viewers capped at rung 1),
    undone in reverse as the CPU falls."""
    import asyncio
    from typing import Any, cast

    from actors.stages.quality import QualityActor
    from shared.control.pressure import NodePressure

    async def main() -> None:
        encoder = FakePressuredEncoder([2_000_000, 600_000])
        shard_a, shard_b = FakeShard(), FakeShard()
        actor = QualityActor("s", cast(Any, encoder), 2_000_000)
        await actor._plan()
        actor.add_sender("a", cast(Any, shard_a))
        actor.add_sender("b", cast(Any, shard_b))
        node = NodePressure()
        node.add_stream("s", priority=0, framerate=30, rungs=2)

        async def sample(cpu: float, now: float) -> None:
            decision = node.on_sample(cpu, now)
            if decision is not None:
                await actor.apply_pressure(decision)
                await actor.apply_pressure(decision)  # again: nothing more is sent

        t = 1000.0
        for _ in range(40):  # the node pinned at 97 % for 20 s
            t += 0.5
            await sample(97.0, t)
        assert encoder.framerates == [15]
        assert shard_a.floors == shard_b.floors == [1]
        assert encoder.paused.count((0, True)) == 1
        level, reason = actor.pressure()
        assert level == 2 and "CPU" in reason
        # A targets round resumes neither the retired rung nor pauses the one its viewers
        # are moving to.
        before = len(encoder.paused)
        await actor.apply([cast(Any, shard([(0, 3_000_000)]))], now=t)
        assert (0, False) not in encoder.paused[before:]
        assert (1, True) not in encoder.paused[before:]
        # The load goes away: rung 0 comes back first, then the frame rate.
        for _ in range(600):
            t += 0.5
            await sample(20.0, t)
        assert shard_a.floors == shard_b.floors == [1, 0]
        assert encoder.paused[-1] == (0, False)
        assert encoder.framerates == [15, 30]
        assert actor.pressure()[0] == 0

    asyncio.run(main())


def test_a_restarted_encoder_is_told_the_targets_pauses_and_frame_rate_again() -> None:
    """After an encoder restart the new process runs its configured ladder: the controller
    sends it the lowered frame rate, the retired and paused rungs and every rung's target."""
    import asyncio
    from typing import Any, cast

    from actors.stages.quality import QualityActor
    from shared.control.pressure import NodePressure

    async def main() -> None:
        old = FakePressuredEncoder([2_000_000, 600_000, 200_000])
        actor = QualityActor("s", cast(Any, old), 2_000_000)
        await actor._plan()
        shard_a = FakeShard()
        actor.add_sender("a", cast(Any, shard_a))
        node = NodePressure()
        node.add_stream("s", priority=0, framerate=30, rungs=3)
        for step in range(6):  # pinned: the frame rate halved, then rung 0 retired
            decision = node.on_sample(99.0, float(step))
            if decision is not None:
                await actor.apply_pressure(decision)
        assert node.state("s").retired_rungs == (0,)
        # Viewers on rung 1 at 500 kbps: its target trims; rung 2 unwatched, paused.
        await actor.apply([cast(Any, shard([(1, 500_000)]))], now=10.0)
        trimmed = {rung: bps for rung, bps in old.set}
        assert 1 in trimmed and (2, True) in old.paused
        restarted = FakePressuredEncoder([2_000_000, 600_000, 200_000])
        actor._encoder = cast(Any, restarted)  # the same handle, a new process behind it
        await actor.reapply()
        assert restarted.framerates == [15]
        assert {(0, True), (2, True)} <= set(restarted.paused)
        assert (1, True) not in restarted.paused
        assert dict(restarted.set) == {t.rung: t.target_bps for t in actor.targets()}
        assert dict(restarted.set)[1] == trimmed[1]
        assert shard_a.floors[-1] == 1

    asyncio.run(main())


def encoder_stats(rungs: list[tuple[int, float | None, bool]]) -> object:
    """The encoder's stats with each rung's (bitrate produced, average QP, paused)."""
    from actors.stages.encoder import EncoderStats, RungStats

    figures = [
        RungStats(
            index=i,
            width=640 >> i,
            height=360 >> i,
            framerate=30,
            codec="libx264",
            hardware=False,
            target_bitrate=0,
            encoder_bitrate=0,
            bitrate=bitrate,
            fps=30.0,
            frames_encoded=300,
            keyframes=5,
            encode_ms=4.0,
            hardware_fallbacks=0,
            reconfigurations=0,
            paused=paused,
            qp=qp,
            ring=f"video{i}",
        )
        for i, (bitrate, qp, paused) in enumerate(rungs)
    ]
    return EncoderStats(
        pid=1,
        frames_encoded=300,
        keyframes=5,
        frames_dropped=0,
        fps=30.0,
        average_fps=30.0,
        bitrate=figures[0].bitrate,
        target_bitrate=0,
        encode_ms=4.0,
        rungs=figures,
    )


def test_the_complexity_signal_is_each_running_rungs_bitrate_and_qp() -> None:
    from typing import Any, cast

    from actors.stages.quality import rung_complexity
    from shared.control.rung_targets import RungComplexity

    stats = encoder_stats([(1_200_000, 14.5, False), (0, None, False), (90_000, 20.0, True)])
    # Rung 1 has no frames in the window yet, rung 2 is paused: neither says anything.
    assert rung_complexity(cast(Any, stats).rungs) == [
        RungComplexity(rung=0, produced_bps=1_200_000, qp=14.5)
    ]


def test_a_content_aware_actor_lowers_a_still_rung_and_restores_it_when_it_moves() -> None:
    """The actor's rounds with literal times: the encoder's signal in, the rung's encoder
    target out (the core's rules: test_rung_targets.py; a real encoder: test_rung_content.py)."""
    import asyncio
    from typing import Any, cast

    from actors.stages.quality import QualityActor, rung_complexity

    sent = FakeShard()

    async def main() -> list[tuple[int, int]]:
        encoder = FakeLadderEncoder([2_000_000, 600_000])
        actor = QualityActor("s", cast(Any, encoder), 2_000_000, content_aware=True)
        await actor._plan()
        actor.add_sender("shard-1", cast(Any, sent))
        viewers = [cast(Any, shard([(0, 5_000_000)]))]
        # A still picture: the whole 2 Mbps at QP 9, i.e. 1 Mbps would code it at QP 15 and
        # 0.7 Mbps at the reference QP 18.  Rung 1 paused (nobody on it).
        still = rung_complexity(cast(Any, encoder_stats([(2_000_000, 9.0, False)])).rungs)
        for second in range(1, 5):
            await actor.apply(viewers, now=float(second), complexity=still)
        assert encoder.set == [(0, 1_000_000)]  # 0.7 Mbps, but not under the rung's floor
        # Motion: at 1 Mbps the encoder is at QP 24 (the rate would need 2 Mbps).  At once.
        moving = rung_complexity(cast(Any, encoder_stats([(1_000_000, 24.0, False)])).rungs)
        await actor.apply(viewers, now=5.0, complexity=moving)
        return encoder.set

    assert asyncio.run(main()) == [(0, 1_000_000), (0, 2_000_000)]
    # The shard's viewers were given each rung's need as it moved (once per change): the
    # configured rates, the still picture's lowered need, the configured rate again.
    assert sent.rates == [
        [2_000_000, 600_000],
        [1_000_000, 600_000],
        [2_000_000, 600_000],
    ]
