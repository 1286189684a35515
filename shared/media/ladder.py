"""The quality ladder's encode loop, sans-I/O: a pooled frame in, every rung's access units out.

:class:`LadderEncoder` is the one implementation of "encode this frame once per rung": the
encoder actor runs it on frames it reads from the pool, ``tests/test_ladder.py`` runs it with
literal times, and ``perf.bench_ladder`` measures it.  It reads no socket, no shared memory and
no clock that any decision depends on.

Theory of operation
-------------------
A stream has rung 0 (its own quality) and may have rungs below it
(:func:`shared.media.scaler.plan_ladder`); each rung owns an :class:`H264Encoder` and a
:class:`FrameDecimator`.  One source frame (a :class:`FrameRead`: pixels plus two capture
stamps) goes through three steps:

1. :meth:`LadderEncoder.begin` gives the frame its pts and decides what each rung does with it.

   - *pts* is the frame's **monotonic** capture time (``monotonic_us``) since the stream's first
     frame, on the 90 kHz clock of :data:`TIME_BASE` (RFC 6184 §8.2.1).  The wall-clock stamp
     (``capture_us``) is carried through to every access unit untouched, as data: viewers
     measure latency from it.  It must not time anything, since NTP may step it; pts derived
     from it would jump or stall.  pts always rise by at least one tick, so the encoder and the
     muxer never see two frames at one time.  pts belong to the stream, not to a rung's
     encoder, so they run on unchanged when a rung is reconfigured.
   - The scene-cut detector (:class:`SceneCutDetector`) looks at the luma; on a cut every rung
     that takes the frame makes it an IDR, so the rungs' switching points line up.  A slower
     rung that leaves the cut frame out makes its next frame an IDR instead.
   - Each rung's decimator admits the frame or not, by its pts.

2. :meth:`LadderEncoder.encode_rung` scales the picture to the rung once
   (:class:`QualityScaler`) and encodes it.  Rungs share nothing mutable, so a caller may run
   each rung on a worker thread of its own (PyAV releases the GIL), as the actor does.

3. :meth:`LadderEncoder.record` books a rung's output for the stats, on the caller's thread
   (the one that reads :meth:`stats`), and tells the scene-cut detector of rung 0's IDRs, which
   count toward the spacing of forced ones.

:meth:`LadderEncoder.encode` does the three in order on the calling thread.

Control: keyframe requests (per rung), bitrate changes (applied in place within the GOP, up to
the encoder's ceiling), reconfiguration of rung 0 (size, frame rate, ceiling, codec: a new
encoder session at the next frame, an IDR) and hardware acceleration are handed to the rung's
:class:`H264Encoder`, which applies them at its next frame and falls back to libx264 by itself
when a hardware session fails.  A rung must not be changed while :meth:`encode_rung` runs for
it: the caller serialises control calls with its frames (the actor holds one lock across a
frame).  :meth:`request_keyframe` is the exception; it only counts a request.

Time: ``now`` (seconds on the monotonic clock) is passed in and feeds only the stats windows.
The ladder has no timer of its own (nothing happens between frames), so unlike the protocol
cores it has no next deadline to report: its shell runs it when a frame arrives.
The clocks read here are cost meters around the work in :meth:`encode_rung` (this thread's CPU
time and a performance counter), whose readings go into the stats and nowhere else.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Final

import msgspec

from shared.errors import ConfigError, EncodingError
from shared.media.codec import (
    TIME_BASE,
    EncodedFrame,
    EncoderConfig,
    H264Encoder,
    SessionOpener,
    open_session,
)
from shared.media.hwaccel import SOFTWARE_ENCODER
from shared.media.rate_control import SceneCutDetector
from shared.media.scaler import FrameDecimator, LadderPlan, QualityScaler, Rung, plan_ladder
from shared.models import PixelFormat, QualityPreset, StreamQuality
from shared.pool.frame_pool import FrameRead

__all__ = [
    "STATS_WINDOW_S",
    "LadderEncoder",
    "LadderFrame",
    "LadderOutput",
    "LadderStats",
    "RungEncodeStats",
    "RungOutput",
]

logger = logging.getLogger(__name__)

#: The window the stats' fps and bitrate are measured over.
STATS_WINDOW_S: Final = 2.0
_US_PER_S: Final = 1_000_000


@dataclasses.dataclass(frozen=True, slots=True)
class LadderFrame:
    """A source frame the ladder took: its pts and what each rung does with it.

    (A dataclass: it holds the frame's numpy pixels, which msgspec cannot.)
    """

    source: FrameRead
    #: Stream time on the 90 kHz clock, from the frame's monotonic capture time.
    pts: int
    #: The picture is a scene cut (every rung that takes it makes it an IDR).
    scene_cut: bool
    #: The rungs that encode this frame, rung 0 first.
    rungs: tuple[int, ...]
    #: The rungs among them that must make it an IDR (a cut, now or on a frame they skipped).
    idr_rungs: frozenset[int]


class RungOutput(msgspec.Struct, frozen=True, kw_only=True):
    """What one rung made of one frame."""

    rung: int
    access_units: tuple[EncodedFrame, ...]
    #: This thread's CPU seconds scaling the picture, then encoding it.
    scale_cpu_s: float
    encode_cpu_s: float
    #: Seconds from the start of scaling to the end of encoding.
    wall_s: float


class LadderOutput(msgspec.Struct, frozen=True, kw_only=True):
    """What every rung made of one frame (rungs that left it out are absent)."""

    pts: int
    scene_cut: bool
    rungs: tuple[RungOutput, ...]

    def access_units(self, rung: int) -> tuple[EncodedFrame, ...]:
        """Rung ``rung``'s access units for this frame (none when it left the frame out)."""
        return next((out.access_units for out in self.rungs if out.rung == rung), ())


class RungEncodeStats(msgspec.Struct, kw_only=True):
    index: int
    width: int
    height: int
    framerate: int
    codec: str
    hardware: bool
    target_bitrate: int
    #: The rate the encoder is set to (target times the rate adjuster's gain).
    encoder_bitrate: int
    #: What the rung produced over the last two seconds.
    bitrate: int
    fps: float
    frames_encoded: int
    keyframes: int
    #: Milliseconds per frame from the start of scaling to the end of encoding.
    encode_ms: float
    hardware_fallbacks: int
    reconfigurations: int
    #: CPU milliseconds per frame spent scaling and encoding this rung.
    encode_cpu_ms: float = 0.0
    #: Paused: nobody watches it (``LadderEncoder.set_paused``).
    paused: bool = False
    #: The average QP of its frames over the stats window, when its encoder reports one
    #: (``shared.media.codec.packet_qp``).  With ``bitrate`` against ``target_bitrate``, the
    #: rung's complexity signal (``shared.control.rung_targets``): few bits at a low QP is an
    #: easy picture; few bits at a high QP is a starved encoder.
    qp: float | None = None


class LadderStats(msgspec.Struct, kw_only=True):
    #: Source frames handed to the ladder (each taken by the rungs whose rate wants it).
    frames_taken: int
    #: Frames the pool held that were never handed to the ladder (a slow encoder's drops).
    frames_dropped: int
    #: Rung 0's frames per second since the first frame.
    average_fps: float
    scene_cuts: int
    keyframe_requests: int
    #: Why a rung last fell back from hardware to libx264 (None: none did).
    fallback_reason: str | None
    rungs: list[RungEncodeStats]


@dataclasses.dataclass
class _RungState:
    rung: Rung
    encoder: H264Encoder
    decimator: FrameDecimator
    #: (now, bytes, QP or None) of each access unit, for the stats window.
    recent: collections.deque[tuple[float, int, float | None]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=600)
    )
    #: A scene cut came on a frame this rung left out: its next frame is an IDR.
    cut_pending: bool = False
    #: Nobody watches it: it takes no frames (``LadderEncoder.set_paused``).
    paused: bool = False
    wall_s: float = 0.0
    cpu_s: float = 0.0


class LadderEncoder:
    """One stream's encoders, one per rung, fed one source frame at a time (module doc)."""

    def __init__(
        self,
        quality: StreamQuality,
        presets: Sequence[QualityPreset] = (),
        *,
        keyframe_interval_s: float,
        codec: str | None = None,
        opener: SessionOpener = open_session,
        scene_cuts: SceneCutDetector | None = None,
    ) -> None:
        """Plan the ladder and open every rung's encoder (this may probe hardware: blocking).

        ``codec`` pins an FFmpeg encoder (default: ``"auto"`` when the quality asks for
        hardware acceleration, else libx264); ``opener`` replaces how encoder sessions are
        opened; ``scene_cuts`` replaces the scene-cut detector's settings.
        """
        if keyframe_interval_s <= 0:
            raise ConfigError(f"keyframe interval {keyframe_interval_s} s must be positive")
        self.plan: Final[LadderPlan] = plan_ladder(quality, presets)
        self._quality = quality
        self._keyframe_interval_s = keyframe_interval_s
        self._opener = opener
        self._scaler = QualityScaler()
        self._cuts = scene_cuts or SceneCutDetector()
        self._rungs: list[_RungState] = []
        chosen = codec or ("auto" if quality.hardware_acceleration else SOFTWARE_ENCODER)
        try:
            for rung in self.plan.rungs:
                self._rungs.append(self._open_rung(rung, chosen))
        except BaseException:
            self.close()
            raise
        self._origin_us: int | None = None
        self._first_frame_at = 0.0
        self._last_pts = -1
        self._taken = 0
        self._dropped = 0
        self._keyframe_requests = 0

    def _open_rung(self, rung: Rung, codec: str) -> _RungState:
        config = EncoderConfig(
            width=rung.width,
            height=rung.height,
            framerate=rung.framerate,
            bitrate=rung.bitrate,
            keyframe_interval=self._keyframe_frames(rung.framerate),
            codec=codec,
            # Lower rungs are small: slices would cost bits and buy no latency there.
            threads=0 if rung.index == 0 else 1,
        )
        encoder = H264Encoder(config, opener=self._opener)
        return _RungState(rung=rung, encoder=encoder, decimator=FrameDecimator(rung.framerate))

    def _keyframe_frames(self, framerate: int) -> int:
        return max(1, round(self._keyframe_interval_s * framerate))

    def close(self) -> None:
        for state in self._rungs:
            state.encoder.close()

    # --- what the ladder is ----------------------------------------------------------------

    @property
    def rungs(self) -> list[Rung]:
        """Every rung as it is now, rung 0 first."""
        return [state.rung for state in self._rungs]

    @property
    def quality(self) -> StreamQuality:
        """Rung 0's quality, as last configured."""
        return self._quality

    @property
    def hardware(self) -> bool:
        """Whether any rung encodes on hardware now (which may hold a picture after encoding
        returns, so the caller must hand over pixels it will not overwrite)."""
        return any(state.encoder.hardware for state in self._rungs)

    def _rung(self, index: int) -> _RungState:
        if not 0 <= index < len(self._rungs):
            raise ConfigError(f"the ladder has no rung {index} (it has {len(self._rungs)})")
        return self._rungs[index]

    # --- per frame ---------------------------------------------------------------------------

    def continue_timeline(self, pts: int, monotonic_us: int, now: float) -> None:
        """Carry on the timeline of a stream whose previous encoder crashed after a frame at
        ``pts``, captured at ``monotonic_us``: later frames get pts on the same timeline, so
        viewers' RTP timestamps and recordings run on instead of jumping back to zero
        (``actors.recovery``).  Call before the first frame."""
        self._origin_us = monotonic_us - pts * _US_PER_S // TIME_BASE.denominator
        self._last_pts = pts
        self._first_frame_at = now

    def begin(self, frame: FrameRead, now: float) -> LadderFrame:
        """Take ``frame`` (read from the pool at ``now``): its pts, a scene cut, which rungs."""
        if frame.pixel_format is not PixelFormat.YUV420P:
            raise EncodingError(
                f"the frame pool holds {frame.pixel_format}; encoding needs yuv420p"
            )
        self._taken += 1
        self._dropped += frame.missed
        if self._origin_us is None:
            self._origin_us = frame.monotonic_us
            self._first_frame_at = now
        elapsed_us = frame.monotonic_us - self._origin_us
        pts = max(elapsed_us * TIME_BASE.denominator // _US_PER_S, self._last_pts + 1)
        self._last_pts = pts
        width, height = frame.width, frame.height
        luma = frame.pixels[: width * height].reshape(height, width)
        cut = self._cuts.observe(luma, pts / TIME_BASE.denominator)
        due: list[int] = []
        idr: set[int] = set()
        for state in self._rungs:
            if not state.paused and state.decimator.admit(pts):
                due.append(state.rung.index)
                if cut or state.cut_pending:
                    idr.add(state.rung.index)
                state.cut_pending = False
            elif cut:
                state.cut_pending = True
        return LadderFrame(
            source=frame, pts=pts, scene_cut=cut, rungs=tuple(due), idr_rungs=frozenset(idr)
        )

    def encode_rung(self, frame: LadderFrame, index: int) -> RungOutput:
        """Rung ``index``'s picture of ``frame``, scaled once and encoded.  Any thread; never
        two at once for one rung."""
        state = self._rung(index)
        if index not in frame.rungs:
            raise ConfigError(f"rung {index} does not take the frame at pts {frame.pts}")
        source = frame.source
        started, cpu_started = time.perf_counter(), time.thread_time()
        picture = self._scaler.picture(source.pixels, source.width, source.height, state.rung)
        scaled = time.thread_time()
        units = state.encoder.encode_frame(
            picture,
            pts=frame.pts,
            capture_us=source.capture_us,
            keyframe=index in frame.idr_rungs,
        )
        cpu_done = time.thread_time()
        return RungOutput(
            rung=index,
            access_units=tuple(units),
            scale_cpu_s=scaled - cpu_started,
            encode_cpu_s=cpu_done - scaled,
            wall_s=time.perf_counter() - started,
        )

    def record(self, frame: LadderFrame, output: RungOutput, now: float) -> None:
        """Book ``output`` (rung output of ``frame``, handed out at ``now``) for the stats."""
        state = self._rung(output.rung)
        state.wall_s += output.wall_s
        state.cpu_s += output.scale_cpu_s + output.encode_cpu_s
        for unit in output.access_units:
            state.recent.append((now, len(unit.data), unit.qp))
            if unit.keyframe and output.rung == 0:
                self._cuts.keyframe_sent(unit.pts / TIME_BASE.denominator)

    def encode(self, frame: FrameRead, now: float) -> LadderOutput:
        """All three steps for ``frame`` on this thread, rung 0 first."""
        job = self.begin(frame, now)
        outputs = []
        for index in job.rungs:
            output = self.encode_rung(job, index)
            self.record(job, output, now)
            outputs.append(output)
        return LadderOutput(pts=job.pts, scene_cut=job.scene_cut, rungs=tuple(outputs))

    # --- control -----------------------------------------------------------------------------

    def request_keyframe(self, rung: int | None = 0) -> None:
        """An IDR on the next frame of ``rung`` (None: every rung), e.g. for a viewer's PLI.

        Only counts the request, so it may come from any thread at any time."""
        states = self._rungs if rung is None else [self._rung(rung)]
        self._keyframe_requests += 1
        for state in states:
            state.encoder.request_keyframe()
        if rung is not None:
            # A viewer asking a paused rung for an IDR is on its way to it (a switch of rung,
            # ``shared.control.rung_choice``): it resumes at once, not at the next round of
            # the quality actor, so a step down under congestion does not wait.
            self._rungs[rung].paused = False

    def set_paused(self, rung: int, paused: bool) -> bool:
        """Pause a rung nobody watches (it takes no frames: no encoder time) or resume it; a
        resumed rung's first frame is an IDR.  Rung 0, the stream's own quality that
        recordings follow, is never paused.  Returns whether it is paused now."""
        state = self._rung(rung)
        if rung == 0 and paused:
            raise ConfigError("rung 0 is the stream's own quality: it is never paused")
        if state.paused and not paused:
            state.encoder.request_keyframe()
        state.paused = paused
        return paused

    def set_bitrate(self, bitrate: int, rung: int = 0) -> int:
        """Retarget ``rung``; returns the bitrate applied (clamped).  At or below the encoder's
        ceiling it applies within the GOP, above it the next frame is an IDR."""
        # The rung keeps its planned bitrate: the stats' target_bitrate says what it runs at.
        return self._rung(rung).encoder.set_bitrate(bitrate)

    def configure(self, quality: StreamQuality) -> StreamQuality:
        """Make rung 0 encode at ``quality`` (blocking: a change of hardware acceleration
        probes the encoders).

        A bitrate at or below the current ceiling applies in place; a new size, frame rate,
        higher ceiling or a change of hardware acceleration reopens the encoder at the next
        frame, which is an IDR, with pts running on.  Frames keep the capture's size and are
        scaled to the new one; a frame rate above the capture's yields the capture's rate.
        A change of hardware acceleration moves every rung.
        """
        top = self._rungs[0]
        hardware_changed = quality.hardware_acceleration != self._quality.hardware_acceleration
        codec = "auto" if quality.hardware_acceleration else SOFTWARE_ENCODER
        config = msgspec.structs.replace(
            top.encoder.config,
            width=quality.resolution.width,
            height=quality.resolution.height,
            framerate=quality.framerate,
            bitrate=quality.bitrate,
            max_bitrate=quality.bitrate,
            keyframe_interval=self._keyframe_frames(quality.framerate),
            codec=codec if hardware_changed else top.encoder.config.codec,
        )
        top.encoder.configure_encoder(config)
        if quality.framerate != top.rung.framerate:
            top.decimator = FrameDecimator(quality.framerate)
        top.rung = Rung.top(quality)
        if hardware_changed:
            for other in self._rungs[1:]:
                other_config = msgspec.structs.replace(other.encoder.config, codec=codec)
                other.encoder.configure_encoder(other_config)
        self._quality = quality
        return quality

    def enable_hardware_acceleration(self) -> bool:
        """Move every rung to the best hardware encoder that works here, from its next frame
        (an IDR); False, and nothing changes, when there is none.  Blocking: it probes."""
        enabled = all([state.encoder.enable_hardware_acceleration() for state in self._rungs])
        if enabled:
            self._quality = msgspec.structs.replace(self._quality, hardware_acceleration=True)
        return enabled

    # --- stats -------------------------------------------------------------------------------

    def _rung_stats(self, state: _RungState, now: float) -> RungEncodeStats:
        window = [(t, n) for t, n, _ in state.recent if now - t <= STATS_WINDOW_S]
        span = (window[-1][0] - window[0][0]) if len(window) > 1 else 0.0
        qps = [qp for t, _, qp in state.recent if now - t <= STATS_WINDOW_S and qp is not None]
        encoder = state.encoder
        frames = encoder.frames_encoded
        return RungEncodeStats(
            index=state.rung.index,
            width=state.rung.width,
            height=state.rung.height,
            framerate=state.rung.framerate,
            codec=encoder.codec_name,
            hardware=encoder.hardware,
            target_bitrate=encoder.bitrate,
            encoder_bitrate=encoder.encoder_bitrate,
            # The first unit's bytes belong to the interval before the window: left out.
            bitrate=int(sum(n for _, n in window[1:]) * 8 / span) if span > 0 else 0,
            fps=(len(window) - 1) / span if span > 0 else 0.0,
            frames_encoded=frames,
            keyframes=encoder.keyframes_encoded,
            encode_ms=state.wall_s * 1000 / frames if frames else 0.0,
            hardware_fallbacks=encoder.hardware_fallbacks,
            reconfigurations=encoder.reconfigurations,
            encode_cpu_ms=state.cpu_s * 1000 / frames if frames else 0.0,
            paused=state.paused,
            qp=sum(qps) / len(qps) if qps else None,
        )

    def stats(self, now: float) -> LadderStats:
        rungs = [self._rung_stats(state, now) for state in self._rungs]
        top = rungs[0].frames_encoded
        elapsed = now - self._first_frame_at
        reasons = [s.encoder.fallback_reason for s in self._rungs if s.encoder.fallback_reason]
        return LadderStats(
            frames_taken=self._taken,
            frames_dropped=self._dropped,
            average_fps=(top - 1) / elapsed if top > 1 and elapsed > 0 else 0.0,
            scene_cuts=self._cuts.cuts,
            keyframe_requests=self._keyframe_requests,
            fallback_reason=reasons[-1] if reasons else None,
            rungs=rungs,
        )
