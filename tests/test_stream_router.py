"""Which stream a connection on a shared port wants (``shared.auth.stream_router``), with
literal times: routed by its hello, refused with a code and reason otherwise."""

from __future__ import annotations

import pytest

from shared.auth.control import (
    AccessErrorCode,
    Hello,
    QualityRequest,
    Refused,
    encode_message,
    server_message_parser,
)
from shared.auth.stream_router import Refuse, Route, StreamRouter


def router() -> StreamRouter:
    core = StreamRouter(hello_timeout_s=5.0)
    core.streams |= {"cam1", "cam2"}
    return core


def test_a_hello_routes_the_connection_to_its_stream_with_every_byte_so_far() -> None:
    core = router()
    core.connect("c1", now=0.0)
    core.connect("c2", now=0.0)
    first = encode_message(Hello(version=1, stream="cam2", token="t.o.k"))
    after = encode_message(QualityRequest(id=1, rung=0))
    # The hello split across two reads, a second message right behind it.
    assert core.receive("c1", first[:7], False) is None
    route = core.receive("c1", first[7:] + after, False)
    assert route == Route(stream="cam2", control=first + after)
    assert core.receive("c2", encode_message(Hello(version=1, stream="cam1")), False) == Route(
        stream="cam1", control=encode_message(Hello(version=1, stream="cam1"))
    )
    # Decided: no longer waiting, and its later bytes are the stream's business.
    assert core.waiting == 0
    assert core.receive("c1", b"more", False) is None


def test_a_stream_the_port_does_not_carry_is_refused_with_its_code_and_reason() -> None:
    core = router()
    core.connect("c", now=0.0)
    refusal = core.receive("c", encode_message(Hello(version=1, stream="lobby")), False)
    assert isinstance(refusal, Refuse)
    assert refusal.code == AccessErrorCode.UNKNOWN_STREAM
    assert refusal.reason == "unknown_stream"
    # The other streams it carries are not told to a stranger.
    assert refusal.text == "this port carries no stream 'lobby'"
    assert refusal.close_reason.startswith("unknown_stream: this port carries no stream")
    # What the viewer reads on its control stream before the close.
    (message,) = server_message_parser().feed(refusal.message)
    assert message == Refused(code=refusal.code, reason="unknown_stream", text=refusal.text)
    assert core.refusals == {"unknown_stream": 1}


@pytest.mark.parametrize(
    ("data", "end", "text"),
    [
        (encode_message(QualityRequest(id=1)), False, "the first message must be hello"),
        (b"\x00\x00\x00\x00", False, "control stream:"),
        (b"\x00\x00", True, "control stream:"),
        (b"", True, "the control stream ended before hello"),
    ],
)
def test_a_control_stream_that_breaks_the_protocol_is_refused(
    data: bytes, end: bool, text: str
) -> None:
    core = router()
    core.connect("c", now=0.0)
    refusal = core.receive("c", data, end)
    assert isinstance(refusal, Refuse)
    assert refusal.code == AccessErrorCode.PROTOCOL_ERROR
    assert text in refusal.text


def test_no_hello_in_time_is_refused_at_the_deadline() -> None:
    core = router()
    core.connect("silent", now=1.0)
    core.connect("slow", now=2.0)
    core.receive("slow", encode_message(Hello(version=1, stream="cam1"))[:3], False)
    assert core.next_deadline() == 6.0
    assert core.handle_timer(5.9) == []
    (late,) = core.handle_timer(6.0)
    connection, refusal = late
    assert connection == "silent"
    assert refusal.code == AccessErrorCode.HELLO_TIMEOUT
    # It never opened its control stream: the close alone says why.
    assert refusal.write is False
    assert core.next_deadline() == 7.0
    ((connection, refusal),) = core.handle_timer(7.0)
    assert (connection, refusal.write) == ("slow", True)
    assert core.next_deadline() is None


def test_a_connection_gone_before_its_hello_is_forgotten() -> None:
    core = router()
    core.connect("c", now=0.0)
    core.forget("c")
    assert core.waiting == 0 and core.next_deadline() is None
