"""H264RtpSender: encoded access units -> RTP packets (RFC 3550 §5.1, RFC 6184).

One sender per viewer connection keeps that viewer's sequence space.  Sequence number and
timestamp start at values the caller supplies (random in production, RFC 3550 §5.1; fixed in
tests).  The encoder's pts is already on the 90 kHz RTP clock, so the RTP timestamp is the pts
plus the random offset, modulo 2**32.
"""

from __future__ import annotations

from shared.h264_rtp import H264Packetizer, split_annexb
from shared.rtp import RtpPacket

__all__ = ["DEFAULT_MTU", "H264_PAYLOAD_TYPE", "H264RtpSender"]

#: Dynamic payload type for H.264 (RFC 3551 §6 leaves 96-127 to signalling).
H264_PAYLOAD_TYPE = 96
#: RTP payload budget: a QUIC packet of 1200 bytes minus QUIC, DATAGRAM frame, flow id and RTP
#: headers leaves about 1130 bytes; 1100 keeps a margin.
DEFAULT_MTU = 1100


class H264RtpSender:
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
        self._sequence = initial_sequence & 0xFFFF
        self._timestamp_offset = timestamp_offset
        self._packetizer = H264Packetizer(mtu=mtu)
        self.packets_sent = 0
        self.octets_sent = 0

    def packetize(self, access_unit: bytes, *, pts: int) -> list[bytes]:
        """All RTP packets of one access unit; the marker bit is set on the last (§5.1)."""
        payloads = self._packetizer.packetize(split_annexb(access_unit))
        timestamp = (pts + self._timestamp_offset) & 0xFFFFFFFF
        packets = []
        last = len(payloads) - 1
        for index, payload in enumerate(payloads):
            packet = RtpPacket(
                payload_type=self.payload_type,
                marker=index == last,
                sequence_number=self._sequence,
                timestamp=timestamp,
                ssrc=self.ssrc,
                payload=payload,
            )
            packets.append(packet.serialize())
            self._sequence = (self._sequence + 1) & 0xFFFF
            self.octets_sent += len(payload)
        self.packets_sent += len(packets)
        return packets
