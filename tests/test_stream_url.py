from __future__ import annotations

import pytest

from shared.errors import ConfigError
from shared.roq.url import StreamUrl, advertised_host


def test_round_trip() -> None:
    url = StreamUrl(host="127.0.0.1", port=4433, session_id="abc123", fingerprint="sha256:00ff")
    assert str(url) == "roq://127.0.0.1:4433/abc123?fp=sha256:00ff"
    assert StreamUrl.parse(str(url)) == url


def test_ipv6_host() -> None:
    url = StreamUrl(host="::1", port=5000, session_id="s")
    assert str(url) == "roq://[::1]:5000/s"
    assert StreamUrl.parse(str(url)) == url


@pytest.mark.parametrize(
    "bad", ["http://h:1/s", "roq://h/s", "roq://:5/s", "roq://h:x/s", "roq://h:1/s?fp=md5:00"]
)
def test_bad_urls(bad: str) -> None:
    with pytest.raises(ConfigError):
        StreamUrl.parse(bad)


@pytest.mark.parametrize(
    ("bind", "env", "expected"),
    [
        ("0.0.0.0", {}, "10.1.2.3"),  # a wildcard is no address: the node's IP
        ("::", {}, "10.1.2.3"),
        ("127.0.0.1", {}, "127.0.0.1"),  # a concrete bind address is reachable as is
        ("0.0.0.0", {"KIZUNA_ADVERTISE_HOST": "viewers.example.org"}, "viewers.example.org"),
        ("10.0.0.5", {"KIZUNA_ADVERTISE_HOST": " 203.0.113.7 "}, "203.0.113.7"),
        ("0.0.0.0", {"KIZUNA_ADVERTISE_HOST": ""}, "10.1.2.3"),
    ],
)
def test_a_viewer_url_names_the_address_viewers_reach(
    bind: str, env: dict[str, str], expected: str
) -> None:
    assert advertised_host(bind, lambda: "10.1.2.3", env) == expected


def test_alternate_endpoints_round_trip_and_come_after_the_urls_own() -> None:
    url = StreamUrl(
        host="10.0.0.1",
        port=4433,
        session_id="s",
        fingerprint="sha256:00",
        alternates=(("10.0.0.2", 4434), ("fd00::3", 4435)),
    )
    text = str(url)
    assert "alt=10.0.0.2:4434,[fd00::3]:4435" in text
    assert StreamUrl.parse(text) == url
    assert url.endpoints == [("10.0.0.1", 4433), ("10.0.0.2", 4434), ("fd00::3", 4435)]
    assert StreamUrl.parse("roq://h:1/s").alternates == ()


@pytest.mark.parametrize("alt", ["nohost", "h:", ":5", "h:0", "h:99999", "h:x"])
def test_a_bad_alternate_is_refused(alt: str) -> None:
    with pytest.raises(ConfigError, match="alt entries must be HOST:PORT"):
        StreamUrl.parse(f"roq://h:1/s?alt={alt}")
