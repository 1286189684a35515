"""RTP over QUIC on real loopback sockets, without Ray: server, sender core and viewer."""

from __future__ import annotations

import asyncio
import datetime
import inspect
import ipaddress
import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from shared.capture.testpattern import TestPattern
from shared.errors import NetworkError
from shared.media.codec import EncoderConfig, H264Encoder
from shared.roq.tls import TlsIdentity, generate_self_signed, load_identity
from shared.roq.transport import RoqConnection, RoqServer
from shared.roq.url import StreamUrl
from shared.rtp.packet import RtpPacket
from shared.rtp.sender import VIDEO_TRACK, BroadcastSender, MediaTrack
from shared.viewer.client import Viewer

WIDTH, HEIGHT, FPS = 320, 180, 30

#: Decides per outgoing RTP packet whether the network "loses" it.
Drop = Callable[[RtpPacket], bool]


class LossyConnection:
    """A RoqConnection whose outgoing media packets pass a drop rule first."""

    def __init__(self, inner: RoqConnection, drop: Drop) -> None:
        self.inner, self.drop = inner, drop

    @property
    def backlog(self) -> int:
        return self.inner.backlog

    @property
    def transport_rtt_s(self) -> float:
        return self.inner.transport_rtt_s

    def send_media(
        self, flow_id: int, packets: Sequence[bytes], *, keyframe: bool, urgent: bool = False
    ) -> None:
        kept = [p for p in packets if not self.drop(RtpPacket.parse(p))]
        if kept:
            self.inner.send_media(flow_id, kept, keyframe=keyframe, urgent=urgent)

    def send_rtcp(self, flow_id: int, packet: bytes) -> None:
        self.inner.send_rtcp(flow_id, packet)


class Broadcast:
    """Encoder + BroadcastSender + QUIC server in one loop, as the actors are across processes."""

    def __init__(
        self,
        *,
        identity: TlsIdentity | None = None,
        tracks: Sequence[MediaTrack] = (VIDEO_TRACK,),
        drop: Drop | None = None,
        keyframe_interval: int = 300,
        size: tuple[int, int] = (WIDTH, HEIGHT),
        bitrate: int = 300_000,
    ) -> None:
        self.identity = identity or generate_self_signed("127.0.0.1")
        self.plis = 0
        self.drop = drop
        self.sender = BroadcastSender(tracks, initial_bps=bitrate, rng=random.Random(7))
        self._wrapped: dict[RoqConnection, LossyConnection | RoqConnection] = {}
        self.server = RoqServer(
            self.identity,
            on_packet=self._on_packet,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
        )
        width, height = size
        self.encoder = H264Encoder(
            EncoderConfig(
                width=width,
                height=height,
                framerate=FPS,
                bitrate=bitrate,
                keyframe_interval=keyframe_interval,
            )
        )
        self.pattern = TestPattern(width, height, FPS)

    def _on_connect(self, connection: RoqConnection) -> None:
        wrapped = LossyConnection(connection, self.drop) if self.drop else connection
        self._wrapped[connection] = wrapped
        self.sender.add(wrapped, time.monotonic())

    def _on_disconnect(self, connection: RoqConnection) -> None:
        self.sender.remove(self._wrapped.pop(connection, connection))

    def _on_packet(self, connection: RoqConnection, flow_id: int, data: bytes) -> None:
        self.sender.on_rtcp(self._wrapped.get(connection, connection), data, time.monotonic())
        if self.sender.take_keyframe_request():
            self.plis += 1
            self.encoder.request_keyframe()

    async def start(self, port: int = 0) -> StreamUrl:
        await self.server.start("127.0.0.1", port)
        return StreamUrl(
            host="127.0.0.1",
            port=self.server.port,
            session_id="t",
            fingerprint=self.identity.fingerprint,
        )

    def send_one(self, index: int) -> None:
        capture_us = time.time_ns() // 1000
        pixels = self.pattern.render(index, capture_us)
        for unit in self.encoder.encode(pixels, pts=index * 3000, capture_us=capture_us):
            self.sender.send(
                0,
                unit.data,
                pts=unit.pts,
                capture_us=unit.capture_us,
                keyframe=unit.keyframe,
                now=time.monotonic(),
                wall_now=time.time(),
            )

    async def send(self, frames: range) -> None:
        started = time.monotonic()
        for number, index in enumerate(frames):
            self.send_one(index)
            # Paced on the frame clock, so a slow encode does not stretch the stream.
            await asyncio.sleep(max(0.0, started + (number + 1) / FPS - time.monotonic()))


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    what: str,
    *,
    timeout: float = 10.0,
    required: bool = True,
) -> bool:
    """Wait until ``condition()`` holds (it may be async), checking every 10 ms, for at most
    ``timeout`` seconds.

    Past the deadline it fails the test with ``what``, or, when not ``required`` (a lossy path
    may legitimately never get there), returns False and leaves the verdict to the assertions
    that follow.
    """
    deadline = time.monotonic() + timeout

    async def holds() -> bool:
        result = condition()
        return await result if inspect.isawaitable(result) else result

    while not await holds():
        if time.monotonic() > deadline:
            if required:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            return False
        await asyncio.sleep(0.01)
    return True


def received(seen: list[int], last: int) -> Callable[[], bool]:
    """The viewer has decoded frame ``last`` (the newest sent)."""
    return lambda: bool(seen) and seen[-1] >= last


async def collect(viewer: Viewer, into: list[int]) -> None:
    async for frame in viewer.frames():
        assert frame.stamp is not None
        into.append(frame.stamp.frame_number)


async def run_stream(
    broadcast: Broadcast, frames: range, *, datagrams: bool = True
) -> tuple[list[int], Viewer]:
    url = await broadcast.start()
    viewer = await Viewer.connect(url, datagrams=datagrams, reconnect=False)
    seen: list[int] = []
    task = asyncio.create_task(collect(viewer, seen))
    # The client's handshake can complete before the server's: frames sent before the server
    # knows the viewer would never reach it.
    await until(lambda: len(broadcast.sender.peers) == 1, "the server to see the viewer")
    await broadcast.send(frames)
    await until(received(seen, frames[-1]), f"frame {frames[-1]} at the viewer")
    await broadcast.server.close()
    await asyncio.wait_for(task, 5)  # the stream ends when the server closes
    await viewer.close()
    return seen, viewer


@pytest.mark.parametrize("datagrams", [True, False], ids=["datagram-mode", "stream-mode"])
def test_every_frame_arrives_decodes_and_carries_its_stamp(datagrams: bool) -> None:
    seen, viewer = asyncio.run(run_stream(Broadcast(), range(60), datagrams=datagrams))
    report = viewer.report()
    assert seen == list(range(60))
    assert report.mode == ("datagram" if datagrams else "stream")
    assert report.decode_errors == 0 and report.frames_dropped == 0
    assert report.latency_p50_ms is not None and report.latency_p50_ms < 1000


def test_a_lost_packet_is_nacked_and_recovered() -> None:
    lost: set[int] = set()

    def lose_once(packet: RtpPacket) -> bool:
        # The 40th packet is lost on its first trip only; the retransmission gets through.
        if len(lost) < 40 and packet.sequence_number not in lost:
            lost.add(packet.sequence_number)
            return len(lost) == 40
        return False

    broadcast = Broadcast(drop=lose_once)
    seen, viewer = asyncio.run(run_stream(broadcast, range(40)))
    report = viewer.report()
    assert seen == list(range(40))
    assert report.nacks_sent >= 1 and report.packets_recovered == 1
    assert report.frames_recovered == 1 and report.frames_dropped == 0
    assert broadcast.plis <= 1  # only the join keyframe request


def test_a_packet_lost_for_good_is_skipped_cleanly_after_a_keyframe_request() -> None:
    doomed: list[int] = []

    def lose_forever(packet: RtpPacket) -> bool:
        # Frame 10's marker packet never arrives, however often it is resent.
        if (
            packet.marker
            and not doomed
            and packet.timestamp % 2**32
            == (
                broadcast.sender.peers[next(iter(broadcast.sender.peers))]
                .streams[0]
                .timestamp(30000)
            )
        ):
            doomed.append(packet.sequence_number)
        return packet.sequence_number in doomed

    broadcast = Broadcast(drop=lose_forever)
    seen, viewer = asyncio.run(run_stream(broadcast, range(45)))
    report = viewer.report()
    assert doomed and broadcast.plis >= 2  # the join request, then the viewer's PLI
    assert seen[:10] == list(range(10)) and 10 not in seen
    resumed = [n for n in seen if n > 10]
    assert resumed and resumed == sorted(resumed) and resumed[-1] == 44
    assert report.decode_errors == 0 and report.frames_dropped >= 1
    assert report.keyframe_requests >= 1


def test_one_viewer_leaving_does_not_disturb_another() -> None:
    async def main() -> tuple[list[int], int]:
        broadcast = Broadcast()
        url = await broadcast.start()
        stays = await Viewer.connect(url, reconnect=False)
        leaves = await Viewer.connect(url, reconnect=False)
        seen: list[int] = []
        task = asyncio.create_task(collect(stays, seen))
        await until(lambda: len(broadcast.sender.peers) == 2, "the server to see both viewers")
        await broadcast.send(range(15))
        await leaves.close()
        await broadcast.send(range(15, 30))
        # The server lets a closed connection go after its draining period (RFC 9000 §10.2).
        await until(lambda: len(broadcast.server.peers) == 1, "the server to drop the leaver")
        peers = len(broadcast.server.peers)
        await until(received(seen, 29), "frame 29 at the viewer that stayed")
        await broadcast.server.close()
        await asyncio.wait_for(task, 5)
        await stays.close()
        return seen, peers

    seen, peers = asyncio.run(main())
    assert seen == list(range(30))
    assert peers == 1


def test_certificate_mismatch_is_refused() -> None:
    async def main() -> None:
        broadcast = Broadcast()
        url = await broadcast.start()
        forged = StreamUrl(
            host=url.host, port=url.port, session_id="t", fingerprint="sha256:" + "0" * 64
        )
        try:
            with pytest.raises(NetworkError, match="expected sha256:000"):
                await Viewer.connect(forged)
        finally:
            await broadcast.server.close()

    asyncio.run(main())


def test_port_in_use_and_nobody_listening_are_network_errors() -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            for reuse_port in (False, True):
                with pytest.raises(NetworkError, match="already in use"):
                    await RoqServer(generate_self_signed()).start(
                        "127.0.0.1", port, reuse_port=reuse_port
                    )
        with pytest.raises(NetworkError, match="cannot connect"):
            await Viewer.connect(
                StreamUrl(host="127.0.0.1", port=port, session_id="t"), timeout=1.0
            )

    asyncio.run(main())


def _ca_signed_identity(tmp_path: Path) -> tuple[TlsIdentity, Path, Path]:
    """A CA, and a server certificate for 127.0.0.1 it signed; returns (identity, CA, other CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cert, key

    authority, authority_key = ca("test CA")
    other, _ = ca("another CA")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(authority.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(authority_key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ca_path, other_path = tmp_path / "ca.pem", tmp_path / "other.pem"
    ca_path.write_bytes(authority.public_bytes(serialization.Encoding.PEM))
    other_path.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    return load_identity(cert_path, key_path), ca_path, other_path


def test_a_viewer_can_trust_a_ca_instead_of_pinning(tmp_path: Path) -> None:
    identity, ca_path, other_path = _ca_signed_identity(tmp_path)

    async def main() -> list[int]:
        broadcast = Broadcast(identity=identity)
        url = await broadcast.start()
        unpinned = StreamUrl(host=url.host, port=url.port, session_id="t")  # no fp=
        with pytest.raises(NetworkError, match="cannot connect"):
            await Viewer.connect(unpinned, ca_file=str(other_path), timeout=2.0)
        viewer = await Viewer.connect(unpinned, ca_file=str(ca_path), reconnect=False)
        seen: list[int] = []
        task = asyncio.create_task(collect(viewer, seen))
        await until(lambda: len(broadcast.sender.peers) == 1, "the server to see the viewer")
        await broadcast.send(range(10))
        await until(received(seen, 9), "frame 9 at the viewer")
        await broadcast.server.close()
        await asyncio.wait_for(task, 5)
        await viewer.close()
        return seen

    assert asyncio.run(main()) == list(range(10))
