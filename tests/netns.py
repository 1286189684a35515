"""A real network path with a rate cap: a network namespace joined to this one by a veth pair.

The viewer runs in the namespace (``ip netns exec``) and connects to the server on the host
side's address; the host side's egress, the server-to-viewer direction, is shaped with a
token bucket filter (``tc qdisc ... tbf``: this kernel has tbf and htb, no netem), whose rate
:meth:`CappedLink.cap` sets and lifts.  Needs root and iproute2 (``ip``, ``tc``); everything it
made is removed by :meth:`CappedLink.close` (the namespace goes with its end of the pair).

Only this machine's own namespaces are reached: the addresses are on the pair alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Final

from shared.errors import ConfigError, ResourceError

#: The bucket's depth: one full packet and a little, so the cap shapes every burst, as a
#: bottleneck link does.  (A deep bucket is a policer: a burst that fits passes at line rate,
#: and a probe cluster of 30 ms, ``shared.control.probe``, fits in a 15 kB bucket at 1 Mbps,
#: so it measures the veth, not the cap; see the report of ``test_abr_netns``.)
BURST_BYTES: Final = 2_000
#: The queue behind the bucket, in time at the cap: deep enough for an IDR's burst (5 to 10
#: frames' bits) to queue rather than be dropped, as a real bottleneck's buffer does.
LATENCY: Final = "400ms"


def missing_tools() -> str | None:
    """Why the link cannot be made here (None: it can)."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces and tc need root"
    return None


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise ResourceError(f"{' '.join(command)} failed: {done.stderr.strip()}")


class CappedLink:
    """A namespace ``name`` with a veth pair: ``host`` here, ``peer`` in the namespace."""

    def __init__(self, tag: int | None = None) -> None:
        tag = os.getpid() % 10_000 if tag is None else tag
        if not 0 <= tag < 10_000:
            raise ConfigError(f"tag {tag} must be under 10000 (interface names are short)")
        self.name = f"kzns{tag}"
        self.host_if, self.peer_if = f"kzh{tag}", f"kzv{tag}"
        subnet = f"10.213.{tag % 250}"
        self.host, self.peer = f"{subnet}.1", f"{subnet}.2"
        self.rate_bps: int | None = None
        self._made: list[Sequence[str]] = []
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def _make(self) -> None:
        _run("ip", "netns", "add", self.name)
        self._made.append(("ip", "netns", "del", self.name))
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        self._made.append(("ip", "link", "del", self.host_if))
        _run("ip", "link", "set", self.peer_if, "netns", self.name)
        _run("ip", "addr", "add", f"{self.host}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        inside = ("ip", "netns", "exec", self.name)
        _run(*inside, "ip", "addr", "add", f"{self.peer}/30", "dev", self.peer_if)
        _run(*inside, "ip", "link", "set", self.peer_if, "up")
        _run(*inside, "ip", "link", "set", "lo", "up")

    def cap(self, rate_bps: int | None) -> None:
        """Shape the server-to-viewer direction to ``rate_bps`` (None: no cap)."""
        if rate_bps is None:
            if self.rate_bps is not None:
                _run("tc", "qdisc", "del", "dev", self.host_if, "root")
            self.rate_bps = None
            return
        if rate_bps <= 0:
            raise ConfigError(f"a rate cap must be positive, got {rate_bps}")
        _run(
            "tc", "qdisc", "replace", "dev", self.host_if, "root", "tbf",
            "rate", f"{rate_bps}bit", "burst", str(BURST_BYTES), "latency", LATENCY,
        )  # fmt: skip
        self.rate_bps = rate_bps

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def close(self) -> None:
        """Remove what was made, newest first; every step is tried."""
        errors = []
        while self._made:
            undo = self._made.pop()
            done = subprocess.run(undo, capture_output=True, text=True, timeout=10)
            if done.returncode != 0 and "Cannot find" not in done.stderr:
                errors.append(f"{' '.join(undo)}: {done.stderr.strip()}")
        if errors:
            raise ResourceError("cleaning up the test link failed: " + "; ".join(errors))

    def __enter__(self) -> CappedLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
