"""RTP over QUIC on real loopback sockets, without Ray: server, sender core and viewer."""

from __future__ import annotations

import asyncio
import datetime
import inspect
import ipaddress
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import cast

import pytest

from shared.capture.testpattern import TestPattern
from shared.errors import NetworkError
from shared.media.codec import EncoderConfig, H264Encoder
from shared.roq.framing import AUDIO_FLOW_ID, VIDEO_FLOW_ID, encode_datagram
from shared.roq.tls import TlsIdentity, generate_self_signed, load_identity
from shared.roq.transport import HANDOVER_DATAGRAMS, RoqClient, RoqConnection, RoqServer
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


def batch_frames(count: int, seed: int) -> list[list[bytes]]:
    """``count`` frames of RoQ-ready packets as a shard makes them: runs of equal-size
    fragments (one byte apart, as an H.264 FU-A split gives), a shorter last one, and now and
    then a small packet; each packet numbered, so a swapped or mangled one shows."""
    rng = random.Random(seed)
    frames = []
    for number in range(count):
        size, pieces = rng.choice([1100, 1021, 640]), rng.randint(1, 9)
        shape = [size] * rng.randint(0, pieces) + [size - 1] * pieces + [rng.randint(60, 500)]
        frames.append(
            [
                # First octet 0: not RTP version 2, so the media queue keeps no sequence for it.
                struct.pack("!BIH", 0, number, index).ljust(length, bytes([number % 251]))
                for index, length in enumerate(shape)
            ]
        )
    return frames


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "one-per-syscall"])
def test_batched_sends_deliver_every_packet_intact_and_in_order(gso: bool) -> None:
    """Through real aioquic on loopback: whether the server sends its QUIC packets in UDP GSO
    runs or one per syscall, the viewer gets exactly the packets sent."""
    frames = batch_frames(150, seed=11)
    sent = [packet for frame in frames for packet in frame]

    async def main() -> tuple[list[tuple[int, bytes] | None], int, int, bool]:
        identity = generate_self_signed("127.0.0.1")
        connections: list[RoqConnection] = []
        # A budget nothing on a loaded machine reaches: this test is about the bytes.
        server = RoqServer(identity, on_connect=connections.append, latency_budget_s=60.0, gso=gso)
        await server.start("127.0.0.1", 0)
        assert server.udp is not None
        if gso and not server.udp.gso:
            await server.close()
            pytest.skip("this kernel has no UDP GSO")
        client = await RoqClient.connect(
            "127.0.0.1", server.port, fingerprint=identity.fingerprint, max_queued=len(sent)
        )
        await until(lambda: bool(connections), "the server to see the viewer")
        got: list[tuple[int, bytes] | None] = []
        for frame in frames:
            # One frame in flight at a time: a datagram lost to a full socket buffer on a busy
            # machine is never resent (RFC 9221 §5), and would fail the test for nothing.
            connections[0].send_media(VIDEO_FLOW_ID, frame, keyframe=True)
            got += [await asyncio.wait_for(client.receive(), 10.0) for _ in frame]
        udp = server.udp
        counters = udp.syscalls, udp.datagrams, udp.gso
        await client.close()
        await server.close()
        return got, *counters

    got, syscalls, datagrams, gso_used = asyncio.run(main())
    assert got == [(VIDEO_FLOW_ID, packet) for packet in sent]
    assert gso_used == gso
    if gso:
        assert syscalls < datagrams / 2  # frames left in runs, not one datagram per syscall
    else:
        assert syscalls == datagrams


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


# -- a viewer whose ACKs stop or lag: the send queue is bounded by age -----------------------

#: These tests' latency budget (shorter than the default, so they are short).
STALL_BUDGET_S = 0.2


def stall_packet(number: int, index: int, size: int) -> bytes:
    """Frame ``number``'s ``index``-th packet.  Its first octet is 0, not RTP version 2, so the
    queue keeps no sequence numbers for it (repairs of it are never refused)."""
    return struct.pack("!BIH", 0, number, index).ljust(size, b"\x00")


class QueueTap:
    """What one server connection's media queue and aioquic do with each datagram.

    It records the ``now`` the shell passes to the queue's push and pop (the queue's own
    clock, so the bounds below are the code's, not the machine's speed), and reads aioquic's
    datagram queue as each batch of packets is built: aioquic writes DATAGRAM frames from its
    head, so what left it is what went on the wire.
    """

    def __init__(self, connection: RoqConnection, monkeypatch: pytest.MonkeyPatch) -> None:
        self.protocol = protocol = connection._protocol
        queue, quic = protocol.media, protocol._quic
        self.pushed: dict[bytes, float] = {}
        self.popped: dict[bytes, float] = {}
        self.wire: list[bytes] = []
        self.most_held = 0
        push, pop, datagrams_to_send = queue.push, queue.pop, quic.datagrams_to_send

        def recording_push(
            now: float, flow_id: int, datagrams: Sequence[bytes], *, keyframe: bool, kind: str
        ) -> bool:
            self.pushed.update((datagram, now) for datagram in datagrams)
            return push(now, flow_id, datagrams, keyframe=keyframe, kind=kind)

        def recording_pop(now: float, limit: int) -> list[bytes]:
            out = pop(now, limit)
            self.popped.update((datagram, now) for datagram in out)
            return out

        def recording_datagrams_to_send(now: float) -> list[tuple[bytes, tuple[str, int]]]:
            held = list(protocol._pending_datagrams)
            self.most_held = max(self.most_held, len(held))
            out = datagrams_to_send(now)
            self.wire.extend(held[: len(held) - len(protocol._pending_datagrams)])
            return cast(list[tuple[bytes, tuple[str, int]]], out)

        monkeypatch.setattr(queue, "push", recording_push)
        monkeypatch.setattr(queue, "pop", recording_pop)
        monkeypatch.setattr(quic, "datagrams_to_send", recording_datagrams_to_send)

    def assert_bounded(self, budget_s: float, received: list[tuple[int, bytes]]) -> None:
        """Every media datagram on the wire (and at the viewer) left the queue within the
        budget, and aioquic never held more than the top-up (plus one repair) behind it."""
        media = [datagram for datagram in self.wire if datagram in self.pushed]
        assert media and all(datagram in self.popped for datagram in media)
        popped, pushed = self.popped, self.pushed
        assert all(popped[datagram] - pushed[datagram] < budget_s for datagram in popped)
        assert self.most_held <= HANDOVER_DATAGRAMS + 1
        for flow_id, packet in received:
            datagram = encode_datagram(flow_id, packet)
            if datagram in pushed:
                assert popped[datagram] - pushed[datagram] < budget_s

    def assert_chains_unbroken(self, stream: StallStream) -> None:
        """No P-frame left the queue, even in part, after a gap in its chain."""
        intact = False
        for frame in range(stream.number):
            key = frame in stream.keyframes
            left = [datagram in self.popped for datagram in stream.video(frame)]
            if any(left):
                assert key or intact, f"P-frame {frame} sent after a gap"
            intact = all(left) and (key or intact)


class StallStream:
    """The encoder and frame clock: 100 video frames/s of 3 kB (a keyframe is 6 kB), audio
    every other frame.  A keyframe first, then only when the connection asks for one."""

    def __init__(self, connection: RoqConnection) -> None:
        self.connection = connection
        self.keyframes: list[int] = []
        self.number = 0

    def video(self, frame: int) -> list[bytes]:
        """Frame ``frame``'s datagrams."""
        count = 6 if frame in self.keyframes else 3
        return [encode_datagram(VIDEO_FLOW_ID, stall_packet(frame, i, 1000)) for i in range(count)]

    @property
    def asked(self) -> int:
        return len(self.keyframes) - 1

    def send_frame(self) -> None:
        number, connection = self.number, self.connection
        key = number == 0 or connection.take_keyframe_needed()
        if key:
            self.keyframes.append(number)
        packets = [stall_packet(number, i, 1000) for i in range(6 if key else 3)]
        connection.send_media(VIDEO_FLOW_ID, packets, keyframe=key)
        if number % 2 == 0:
            connection.send_media(AUDIO_FLOW_ID, [stall_packet(number, 0, 160)], keyframe=True)
        self.number += 1

    async def stream(self, frames: int) -> None:
        for _ in range(frames):
            self.send_frame()
            await asyncio.sleep(0.01)  # the frame clock


class StallViewer:
    """A RoqClient that keeps what it receives."""

    def __init__(self, client: RoqClient) -> None:
        self.client = client
        self.received: list[tuple[int, bytes]] = []
        self._task = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        while (item := await self.client.receive()) is not None:
            self.received.append(item)

    def got(self, frame: int) -> bool:
        """Whether a packet of video frame ``frame`` arrived."""
        return any(
            flow_id == VIDEO_FLOW_ID and struct.unpack_from("!I", packet, 1)[0] == frame
            for flow_id, packet in self.received
        )

    async def close(self) -> None:
        await self.client.close()
        await asyncio.wait_for(self._task, 5)


async def stall_setup(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[RoqServer, RoqConnection, StallViewer, QueueTap]:
    identity = generate_self_signed("127.0.0.1")
    connections: list[RoqConnection] = []
    server = RoqServer(identity, on_connect=connections.append, latency_budget_s=STALL_BUDGET_S)
    await server.start("127.0.0.1", 0)
    client = await RoqClient.connect("127.0.0.1", server.port, fingerprint=identity.fingerprint)
    await until(lambda: bool(connections), "the server to see the viewer")
    connection = connections[0]
    return server, connection, StallViewer(client), QueueTap(connection, monkeypatch)


def test_a_viewer_whose_acks_stop_only_gets_media_that_left_the_queue_within_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server stops hearing the viewer (every packet from it is dropped, so no ACKs):
    QUIC's congestion window closes and stays closed but for loss-detection probes, while
    2.4 Mbit/s of video keeps coming for five budgets.  Media on the wire left the queue within
    the budget, aioquic held no more than the top-up; the dropped video made the connection
    ask for a keyframe, and once the viewer is heard again it gets that keyframe.
    """

    async def main() -> None:
        server, connection, viewer, tap = await stall_setup(monkeypatch)
        protocol, stream = tap.protocol, StallStream(connection)
        await stream.stream(10)
        await until(lambda: viewer.got(9), "frame 9 at the viewer")
        heard = protocol.datagram_received
        monkeypatch.setattr(protocol, "datagram_received", lambda data, addr: None)
        await stream.stream(50)
        # Media waits for the window: one timer is armed for the moment the oldest goes stale.
        deadline, timer = protocol.media.next_deadline(), protocol._media_timer
        assert deadline is not None and timer is not None and timer.when() <= deadline
        repair = stall_packet(10**6, 0, 200)
        repaired_after = len(tap.wire)
        connection.send_media(AUDIO_FLOW_ID, [repair], keyframe=True, urgent=True)
        await stream.stream(50)
        monkeypatch.setattr(protocol, "datagram_received", heard)
        heard_again = stream.number

        def recovered() -> bool:
            return any(viewer.got(k) for k in stream.keyframes if k >= heard_again)

        for _ in range(1000):  # until a keyframe made since reaches the viewer
            if recovered():
                break
            await stream.stream(1)
        stats = connection.refresh()
        await viewer.close()
        await server.close()

        tap.assert_bounded(STALL_BUDGET_S, viewer.received)
        tap.assert_chains_unbroken(stream)
        # The repair went out ahead of everything queued before it.
        assert tap.wire[repaired_after] == encode_datagram(AUDIO_FLOW_ID, repair)
        # The stall was real: stale media was dropped, and the keyframe came on request.
        assert stats.frames_expired > 0 and stats.bytes_expired > 0
        assert stream.asked >= 1
        assert recovered(), "no keyframe reached the viewer after the stall"

    asyncio.run(main())


def test_a_viewer_whose_acks_lag_gets_what_the_window_allows_and_nothing_stale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every packet from the viewer reaches the server 0.3 s late, so each ACK is a round trip
    of at least 0.3 s behind: QUIC's window (about 12 kB at first) lets through far less than
    the 2.4 Mbit/s offered until it grows, and the first frames go stale before any ACK can
    come.  Media keeps flowing, in parts and with gaps, and the same bounds hold throughout.
    """

    async def main() -> None:
        server, connection, viewer, tap = await stall_setup(monkeypatch)
        protocol, stream = tap.protocol, StallStream(connection)
        heard = protocol.datagram_received
        loop = asyncio.get_running_loop()

        def late(data: bytes, addr: tuple[str, int]) -> None:
            loop.call_later(0.3, heard, data, addr)

        monkeypatch.setattr(protocol, "datagram_received", late)
        await stream.stream(150)
        last = stream.number - 1
        for _ in range(1000):  # until the viewer is sent a frame made after the lag
            if any(viewer.got(k) for k in range(last - 20, stream.number)):
                break
            await stream.stream(1)
        stats = connection.refresh()
        await viewer.close()
        await server.close()

        tap.assert_bounded(STALL_BUDGET_S, viewer.received)
        tap.assert_chains_unbroken(stream)
        assert stats.frames_expired > 0
        assert any(viewer.got(k) for k in range(last - 20, stream.number))

    asyncio.run(main())


@pytest.mark.parametrize("datagrams", [True, False], ids=["datagram", "stream"])
def test_the_control_stream_carries_bytes_both_ways_and_other_bidi_streams_are_refused(
    datagrams: bool,
) -> None:
    """Stream 0 (the access-control stream) reaches the server's handler, in order, with its
    end; the server's replies reach the client; a second bidirectional stream is refused and
    counted, and RoQ's unidirectional RTCP streams still work beside them."""

    async def main() -> None:
        identity = generate_self_signed("127.0.0.1")
        received: list[tuple[bytes, bool]] = []
        rtcp: list[tuple[int, bytes]] = []
        connections: list[RoqConnection] = []

        def on_control(connection: RoqConnection, data: bytes, end: bool) -> None:
            received.append((data, end))
            connection.send_control(b"echo:" + data)

        server = RoqServer(
            identity,
            on_connect=connections.append,
            on_control=on_control,
            on_packet=lambda c, flow, packet: rtcp.append((flow, packet)),
        )
        await server.start("127.0.0.1", 0)
        client = await RoqClient.connect(
            "127.0.0.1", server.port, fingerprint=identity.fingerprint, datagrams=datagrams
        )
        try:
            client.send_control(b"hello")
            client.send_control(b"bye", end_stream=True)
            replies = b""
            while replies != b"echo:helloecho:bye":
                item = await asyncio.wait_for(client.receive_control(), 10)
                assert item is not None
                replies += item[0]
            assert b"".join(d for d, _ in received) == b"hellobye"
            assert received[-1][1] is True
            # A second client-initiated bidirectional stream (ID 4) is not RoQ: refused.
            protocol = client._protocol
            protocol._quic.send_stream_data(4, b"\x00\x01junk")
            protocol.transmit()
            [connection] = connections
            await until(lambda: connection.refresh().datagrams_malformed == 1, "refusal")
            client.send(VIDEO_FLOW_ID + 1, b"\x81\xc9\x00\x01" + bytes(4))
            await until(lambda: len(rtcp) == 1, "the RTCP beside the control stream")
            assert b"junk" not in b"".join(d for d, _ in received)
        finally:
            await client.close()
            await server.close()

    asyncio.run(main())
