"""The viewer control stream (``shared.auth.control``): framing, messages, malformed input."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.auth.control import (
    LENGTH_PREFIX,
    MAX_MESSAGE_SIZE,
    AccessErrorCode,
    ClientMessage,
    ControlParser,
    Hello,
    Notice,
    Pending,
    PermissionsInfo,
    QualityReply,
    QualityRequest,
    RecordReply,
    RecordRequest,
    Refused,
    RungInfo,
    ServerMessage,
    Welcome,
    client_message_parser,
    encode_message,
    notice,
    server_message_parser,
)
from shared.errors import ConfigError, ProtocolError
from shared.models import QualityPreset
from shared.roq.framing import RoqErrorCode

CLIENT_MESSAGES: list[ClientMessage] = [
    Hello(version=1, stream="cam"),
    Hello(version=1, stream="cam", token="a.b.c", viewer="alice", name="Alice's phone"),
    QualityRequest(id=7, rung=2),
    QualityRequest(preset="low"),
    QualityRequest(),
    RecordRequest(action="start", id=1),
    RecordRequest(action="stop"),
]
SERVER_MESSAGES: list[ServerMessage] = [
    Welcome(
        version=1,
        viewer="alice",
        stream="cam",
        permissions=PermissionsInfo(
            can_view=True, can_record=False, can_control_quality=True, max_quality="medium"
        ),
        rungs=(
            RungInfo(
                index=1, width=1280, height=720, framerate=30, bitrate=1_500_000, preset="medium"
            ),
        ),
        expires_at=1_700_000_060.0,
    ),
    Pending(request="ab12cd34", expires_in=60.0),
    Refused(code=AccessErrorCode.EXPIRED, reason="expired", text="the token expired 3 s ago"),
    Notice(text="we go live in 5 minutes", data={"agenda": ["intro", "demo"], "n": 2}),
    QualityReply(ok=True, id=7, rung=1),
    QualityReply(ok=False, reason="not_permitted", text="no"),
    RecordReply(ok=True, action="start", id=1),
]


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def parse_error(parser: ControlParser[ClientMessage], data: bytes) -> str:
    with pytest.raises(ProtocolError) as caught:
        parser.feed(data)
    return str(caught.value)


def test_every_message_round_trips_in_its_direction() -> None:
    stream = b"".join(encode_message(m) for m in CLIENT_MESSAGES)
    assert client_message_parser().feed(stream) == CLIENT_MESSAGES
    stream = b"".join(encode_message(m) for m in SERVER_MESSAGES)
    assert server_message_parser().feed(stream) == SERVER_MESSAGES


def test_messages_arrive_whole_however_the_bytes_are_cut() -> None:
    stream = b"".join(encode_message(m) for m in CLIENT_MESSAGES)
    for step in (1, 3, 5, 64):
        parser = client_message_parser()
        got: list[ClientMessage] = []
        for i in range(0, len(stream), step):
            got += parser.feed(stream[i : i + step])
        assert got == CLIENT_MESSAGES
        assert parser.buffered == 0


def test_the_wire_format_is_a_big_endian_length_then_json() -> None:
    data = encode_message(Hello(version=1, stream="cam1"))
    # The docstring's example, byte for byte.
    assert data == bytes.fromhex("0000002c") + b'{"type":"hello","version":1,"stream":"cam1"}'
    assert json.loads(data[LENGTH_PREFIX:]) == {"type": "hello", "version": 1, "stream": "cam1"}


def test_a_client_written_from_the_spec_alone_is_understood() -> None:
    # What a third party writes with json and struct: members in another order, nulls for
    # absent members, a member this version does not know (ignored).
    hello = {"stream": "cam", "token": None, "type": "hello", "version": 1, "x-extra": [1, 2]}
    quality = {"type": "quality", "preset": "low", "rung": None}
    data = frame(json.dumps(hello).encode()) + frame(json.dumps(quality).encode("utf-8"))
    assert client_message_parser().feed(data) == [
        Hello(version=1, stream="cam"),
        QualityRequest(preset="low"),
    ]


def test_a_viewer_reads_the_server_messages_with_plain_json() -> None:
    data = b"".join(encode_message(m) for m in SERVER_MESSAGES)
    offset, kinds = 0, []
    while offset < len(data):
        (size,) = struct.unpack_from(">I", data, offset)
        kinds.append(json.loads(data[offset + 4 : offset + 4 + size])["type"])
        offset += 4 + size
    assert kinds == ["welcome", "pending", "refused", "notice", "quality", "quality", "record"]


def test_hello_repr_hides_the_token() -> None:
    hello = Hello(version=1, stream="cam", token="eyJhbGciOiJIUzI1NiJ9.secret.sig")
    assert "secret" not in repr(hello) and "<redacted>" in repr(hello)
    assert "eyJ" not in str(client_message_parser().feed(encode_message(hello)))


# --- malformed input -------------------------------------------------------------------------


def test_zero_length_is_an_error() -> None:
    assert "claims 0 bytes" in parse_error(client_message_parser(), b"\x00\x00\x00\x00")


def test_an_oversize_length_is_refused_before_its_bytes_arrive() -> None:
    parser = client_message_parser()
    assert parser.feed(b"\x00\x00") == []
    assert "claims 16385 bytes" in parse_error(parser, struct.pack(">I", MAX_MESSAGE_SIZE + 1)[2:])
    assert parser.buffered == 0  # nothing of it is kept


def test_the_largest_message_is_accepted() -> None:
    hello = {"type": "hello", "version": 1, "stream": "cam", "pad": ""}
    hello["pad"] = "p" * (MAX_MESSAGE_SIZE - len(json.dumps(hello)))
    payload = json.dumps(hello).encode()
    assert len(payload) == MAX_MESSAGE_SIZE
    assert client_message_parser().feed(frame(payload)) == [Hello(version=1, stream="cam")]


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"{", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b'{"type":"hello","version":1,"stream":"cam"} trailing', "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"hello"', "not a JSON object"),
        (b"{}", "not a message type a viewer sends"),
        (b'{"type":"welcome","version":1}', "not a message type a viewer sends"),
        (b'{"type":"hello","stream":"cam"}', "lacks field `version`"),
        (b'{"type":"hello","version":"1","stream":"cam"}', "bad value at `$.version`"),
        (b'{"type":"hello","version":1,"stream":""}', "bad value at `$.stream`"),
        (b'{"type":"quality","rung":-1}', "bad value at `$.rung`"),
        (b'{"type":"quality","rung":99999999999999999999999}', "bad value at `$.rung`"),
        (b'{"type":"record","action":"erase"}', "bad value at `$.action`"),
    ],
)
def test_malformed_messages(payload: bytes, says: str) -> None:
    parser = client_message_parser()
    message = parse_error(parser, frame(payload))
    assert says in message and message.startswith("control stream: message 1 ")
    # Failed for good: the connection is to be closed, nothing more is parsed.
    with pytest.raises(ProtocolError):
        parser.feed(encode_message(Hello(version=1, stream="cam")))


def test_errors_never_quote_what_the_peer_sent() -> None:
    secret = "eyJhbGciOiJIUzI1NiJ9-looks-like-a-token"
    for payload in (
        {"type": secret},
        {"type": "record", "action": secret},
        {"type": "hello", "version": 1, "stream": "cam", "token": secret * 200},
        {"type": "hello", "version": secret, "stream": "cam"},
    ):
        message = parse_error(client_message_parser(), frame(json.dumps(payload).encode()))
        assert "looks-like" not in message


def test_end_of_stream_inside_a_message_and_data_after_the_end() -> None:
    data = encode_message(Hello(version=1, stream="cam"))
    parser = client_message_parser()
    with pytest.raises(ProtocolError, match="ended inside a message"):
        parser.feed(data[:-1], end_stream=True)
    parser = client_message_parser()
    assert parser.feed(data, end_stream=True) == [Hello(version=1, stream="cam")]
    assert parser.ended
    with pytest.raises(ProtocolError, match="after the end"):
        parser.feed(data)


def test_notices_must_fit_one_message_and_be_json() -> None:
    assert notice("hello", {"a": 1}) == Notice(text="hello", data={"a": 1})
    with pytest.raises(ConfigError, match="at most 1024"):
        notice("x" * 1025)
    with pytest.raises(ConfigError, match="over the control stream's 16384-byte limit"):
        notice("big", {"blob": "b" * MAX_MESSAGE_SIZE})
    with pytest.raises(ConfigError, match="plain JSON"):
        notice("odd", {"when": object()})


def test_close_codes_are_distinct_and_clear_of_roq_codes() -> None:
    ours = [int(c) for c in AccessErrorCode]
    assert len(set(ours)) == len(ours)
    assert not set(ours) & {int(c) for c in RoqErrorCode}
    assert all(c < 2**62 for c in ours)  # a QUIC varint (RFC 9000 §16)


def test_rung_info_from_a_ladder_rung() -> None:
    class Rung:  # the shape of shared.media.scaler.Rung
        index, width, height, framerate, bitrate = 1, 854, 480, 15, 500_000
        preset = QualityPreset.LOW

    assert RungInfo.of(Rung()) == RungInfo(
        index=1, width=854, height=480, framerate=15, bitrate=500_000, preset="low"
    )


# --- property: random bytes ------------------------------------------------------------------

LIMIT = LENGTH_PREFIX + MAX_MESSAGE_SIZE


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
#: JSON objects shaped like messages: a known or unknown type, known or random members.
MESSAGE_LIKE = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "quality", "record", "welcome", "x"]) | st.text(max_size=8)},
    optional={
        "version": JSON,
        "stream": JSON,
        "token": JSON,
        "viewer": JSON,
        "rung": JSON,
        "preset": JSON,
        "action": st.sampled_from(["start", "stop"]) | JSON,
        "id": JSON,
    },
)
#: What may arrive: valid messages, raw bytes, framed raw bytes, framed JSON, framed
#: message-like objects.
CHUNKS = st.lists(
    st.sampled_from(CLIENT_MESSAGES).map(encode_message)
    | st.binary(max_size=300)
    | st.binary(max_size=300).map(frame)
    | JSON.map(lambda v: frame(json.dumps(v).encode()))
    | MESSAGE_LIKE.map(lambda v: frame(json.dumps(v).encode())),
    max_size=12,
)


@settings(max_examples=400, deadline=None)
@given(chunks=CHUNKS)
def test_random_bytes_only_ever_raise_protocol_error(chunks: list[bytes]) -> None:
    parser = client_message_parser()
    for chunk in chunks:
        try:
            messages = parser.feed(chunk)
        except ProtocolError:
            assert parser.buffered == 0
            return
        assert all(isinstance(m, Hello | QualityRequest | RecordRequest) for m in messages)
        assert parser.buffered < LIMIT


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=1, max_size=5),
    body=st.binary(max_size=200),
)
def test_random_lengths_never_make_the_parser_hold_more_than_one_message(
    sizes: list[int], body: bytes
) -> None:
    parser = server_message_parser()
    for size in sizes:
        try:
            parser.feed(struct.pack(">I", size) + body)
        except ProtocolError:
            return
        assert parser.buffered < LIMIT
