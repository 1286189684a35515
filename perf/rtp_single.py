"""H264RtpSender: one receiver's RTP sender, the baseline the benchmarks compare against.

:class:`shared.rtp.sender.BroadcastSender` is the many-viewer sender the product runs; this
one packetizes for a single receiver, with no transport-wide extension and no send history.
"""

from __future__ import annotations

from shared.rtp.h264 import (
    DEFAULT_MTU,
    H264_PAYLOAD_TYPE,
    H264Packetizer,
    ParameterSets,
    split_annexb,
)
from shared.rtp.packet import RtpStream

__all__ = ["H264RtpSender"]


class H264RtpSender:
    """Encoded access units -> serialized RTP packets for one receiver (RFC 6184 §5.1).

    Parameter sets go in front of every IDR (:class:`ParameterSets`); the marker bit is set on
    each access unit's last packet.  :class:`shared.rtp.sender.BroadcastSender` is the
    many-viewer sender; this one serves a single receiver, tests and benchmarks.
    """

    def __init__(
        self,
        *,
        ssrc: int,
        initial_sequence: int,
        timestamp_offset: int,
        payload_type: int = H264_PAYLOAD_TYPE,
        mtu: int = DEFAULT_MTU,
    ) -> None:
        self.ssrc = ssrc
        self.payload_type = payload_type
        self._stream = RtpStream(
            ssrc=ssrc,
            initial_sequence=initial_sequence,
            timestamp_offset=timestamp_offset,
            payload_type=payload_type,
        )
        self._packetizer = H264Packetizer(mtu=mtu)
        self._parameter_sets = ParameterSets()

    @property
    def packets_sent(self) -> int:
        return self._stream.packets_sent

    @property
    def octets_sent(self) -> int:
        return self._stream.octets_sent

    def packetize(self, access_unit: bytes, *, pts: int) -> list[bytes]:
        """All RTP packets of one access unit; the marker bit is set on the last (§5.1)."""
        nal_units = self._parameter_sets.complete(split_annexb(access_unit))
        payloads = self._packetizer.packetize(nal_units)
        return [packet.serialize() for packet in self._stream.packets(payloads, pts=pts)]
