"""A stream's figures, folded from what its stages report (the design's StreamStats).

The supervisor polls the capture, encoder and sender actors; this module turns their reports
into the ``StreamStats`` and ``ViewerStatus`` fields a caller sees.  The reports are described
by the fields read here (Protocols), so this stays free of the actor layer that defines them.

``frames_decoded`` is only known at the viewers (``Viewer.stream_stats()``); everything else
comes from the stages and from what viewers report back (RTCP receiver reports, transport-wide
feedback).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from shared.models import ConnectionQuality, StreamStats

__all__ = [
    "CaptureReport",
    "EncoderReport",
    "PeerReport",
    "SenderReport",
    "stage_failure",
    "stream_stats",
    "viewer_connection",
]


class CaptureReport(Protocol):
    @property
    def frames_skipped(self) -> int: ...
    @property
    def error(self) -> str | None: ...


class EncoderReport(Protocol):
    @property
    def frames_encoded(self) -> int: ...
    @property
    def frames_dropped(self) -> int: ...
    @property
    def bitrate(self) -> int: ...
    @property
    def average_fps(self) -> float: ...
    @property
    def hardware_fallbacks(self) -> int: ...
    @property
    def error(self) -> str | None: ...


class PeerReport(Protocol):
    """One viewer connection of a sender."""

    @property
    def bytes_received(self) -> int: ...
    @property
    def frames_dropped(self) -> int: ...
    @property
    def rtt_ms(self) -> float: ...
    @property
    def jitter_ms(self) -> float: ...
    @property
    def loss(self) -> float: ...


class SenderReport(Protocol):
    @property
    def viewer_id(self) -> str: ...
    @property
    def bytes_sent(self) -> int: ...
    @property
    def peers(self) -> Sequence[PeerReport]: ...
    @property
    def error(self) -> str | None: ...


def stream_stats(
    capture: CaptureReport,
    encoder: EncoderReport,
    senders: Sequence[SenderReport],
    *,
    elapsed_s: float,
    wall_now: float,
) -> StreamStats:
    """The stream's StreamStats; ``elapsed_s`` since it started (monotonic), ``wall_now`` the
    wall-clock time stamped as ``last_updated``."""
    bytes_sent = sum(s.bytes_sent for s in senders)
    peers = [p for s in senders for p in s.peers]
    return StreamStats(
        bytes_sent=bytes_sent,
        bytes_received=sum(p.bytes_received for p in peers),
        frames_encoded=encoder.frames_encoded,
        frames_dropped=capture.frames_skipped
        + encoder.frames_dropped
        + sum(p.frames_dropped for p in peers),
        current_bitrate=encoder.bitrate,
        # Per sender: what one viewer (or one shard of viewers) was sent on average.
        average_bitrate=int(bytes_sent * 8 / max(elapsed_s, 1e-3) / max(len(senders), 1)),
        # One-way latency as half the round trip (RTCP's LSR/DLSR RTT where known, else QUIC's),
        # of the worst viewer: the one a broadcaster has to worry about.
        latency_ms=int(max((p.rtt_ms for p in peers), default=0.0) / 2),
        jitter_ms=int(max((p.jitter_ms for p in peers), default=0.0)),
        packet_loss_rate=max((p.loss for p in peers), default=0.0),
        last_updated=wall_now,
        encoder_fps=encoder.average_fps,
        hardware_fallbacks=encoder.hardware_fallbacks,
    )


def stage_failure(
    capture: CaptureReport, encoder: EncoderReport, senders: Sequence[SenderReport]
) -> str | None:
    """The first error a stage reports, in pipeline order (capture's explains the encoder's)."""
    for error in (capture.error, encoder.error, *(s.error for s in senders)):
        if error:
            return error
    return None


def viewer_connection(
    sender: SenderReport, classified: Mapping[str, ConnectionQuality]
) -> ConnectionQuality:
    """A viewer's connection quality: as the quality actor classified it from the viewer's
    feedback, Disconnected while nobody is connected or before the first classification."""
    if not sender.peers:
        return ConnectionQuality.DISCONNECTED
    return classified.get(sender.viewer_id, ConnectionQuality.DISCONNECTED)
