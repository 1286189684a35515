"""A browser's RTCP feedback into its rung choice, sans-I/O: the same selector as QUIC viewers.

What a browser sends back to aiortc
-----------------------------------
aiortc 1.16 offers, for its video codecs, ``nack``, ``nack pli`` and ``goog-remb``
(``aiortc/codecs/__init__.py``) and the ``abs-send-time`` header extension, but not
``transport-cc``: so Chromium, whose transport-wide feedback (the send-side estimate
QUIC viewers get, draft-holmer-rmcat-transport-wide-cc-extensions-01) needs it negotiated,
falls back to its receive-side estimator on ``abs-send-time`` and reports the result as
REMB (draft-alvestrand-rmcat-remb-03, a PSFB/APP packet whose FCI carries the bitrate and
the SSRCs it is for).  It also sends receiver reports (RFC 3550 §6.4.2: fraction lost, and
LSR/DLSR from which aiortc computes the round-trip time), NACKs (RFC 4585 §6.2.1, aiortc
retransmits) and PLIs (RFC 4585 §6.3.1, forwarded to the shared encoder).  aiortc's
``RTCRtpSender._handle_rtcp_packet`` routes REMB to the sender whose SSRC its FCI lists and
hands it to the encoder's ``target_bitrate``; a sender of packets has none, so nothing acts on
it there.  This module does.

The estimate
------------
:class:`shared.control.rung_choice.RungSelector` takes an estimate with a loss fraction and an
RTT on every feedback.  Here the estimate is the last REMB, the loss the last receiver
report's fraction lost (``/256``) and the RTT aiortc's smoothed one; each REMB and each report
is one feedback.  libwebrtc's receive-side AIMD estimate (as GCC's, draft-ietf-rmcat-gcc-02
§5.5) never rises above 1.5x the rate it receives, and nothing here can probe (aiortc sends no
padding), so a viewer starts on the best rung its token allows and the selector takes it down
when the path cannot carry it; going back up needs an estimate of ``up_headroom`` x the higher
rung's rate, which a REMB reaches only when that rung's rate is within 1.5x of the current
one's.  Chromium sends a REMB about once a second and a receiver report about as often, so the
feedback timeout is longer than the QUIC viewers' (where transport-wide feedback comes every
100 ms); and until the first REMB nothing is timed (a browser that sends none stays where it
started rather than be stepped down for a silence that is not a path's).

The switch
----------
As for QUIC viewers (``shared.rtp.adaptation.PeerAdaptation.takes``): a new rung is pending
until an IDR of it; :meth:`BrowserRungChoice.keyframe_request` says which rung's encoder to ask
for one, and :meth:`BrowserRungChoice.takes` lets through the viewer's rung, and the IDR of the
rung it is switching to, which completes the switch.  The rungs are encoded from the same
frames with the same pts, so the RTP timestamps run on across the switch.

Nothing here reads a clock; ``now`` is passed in (monotonic seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from shared.control.rung_choice import RungSelector, RungSelectorConfig, RungSwitch
from shared.errors import ConfigError

__all__ = ["WEBRTC_SELECTOR", "BrowserRungChoice"]

#: The selector's settings for browsers: feedback comes about once a second (module doc).
WEBRTC_SELECTOR: Final = RungSelectorConfig(feedback_timeout_s=3.0)


class BrowserRungChoice:
    """One WebRTC peer's rung, from its browser's REMB and receiver reports (module doc)."""

    def __init__(
        self,
        rates_bps: Sequence[int],
        *,
        now: float,
        cap: int = 0,
        config: RungSelectorConfig = WEBRTC_SELECTOR,
    ) -> None:
        """``rates_bps``: each rung's rate, top first; ``cap``: the best rung the viewer's
        token allows, which is where it starts."""
        self.selector = RungSelector(rates_bps, now=now, cap=cap, start_rung=cap, config=config)
        self.remb_bps: int | None = None
        self.loss = 0.0
        self.rtt_s: float | None = None
        self.rembs = 0
        self.reports = 0
        #: Why the last switch was wanted.
        self.last_reason = ""

    @property
    def rung(self) -> int:
        return self.selector.rung

    @property
    def wanted(self) -> int:
        return self.selector.wanted

    def set_rates(self, rates_bps: Sequence[int]) -> None:
        """The rungs' rates as they are now (measured on their rings: easy content needs less
        than a rung's target, and the browser's estimate follows what it receives)."""
        self.selector.set_rates(rates_bps)

    def on_remb(self, bitrate_bps: int, now: float) -> RungSwitch | None:
        """A REMB for this peer's SSRC: the browser's estimate of what it can receive."""
        if bitrate_bps <= 0:
            return None  # a REMB of 0 says nothing usable (the selector needs a positive one)
        self.rembs += 1
        self.remb_bps = bitrate_bps
        return self._decide(now)

    def on_receiver_report(
        self, fraction_lost: int, rtt_s: float | None, now: float
    ) -> RungSwitch | None:
        """A receiver report block for this peer's SSRC: ``fraction_lost`` as sent (an 8-bit
        fixed-point fraction, RFC 3550 §6.4.1) and the RTT aiortc derived from it."""
        if not 0 <= fraction_lost <= 255:
            raise ConfigError(f"fraction lost {fraction_lost} is not an 8-bit fraction")
        self.reports += 1
        self.loss = fraction_lost / 256
        if rtt_s is not None and rtt_s >= 0:
            self.rtt_s = rtt_s
        return self._decide(now)

    def _decide(self, now: float) -> RungSwitch | None:
        if self.remb_bps is None:
            return None  # no estimate yet: a report alone cannot move the rung
        switch = self.selector.on_estimate(
            self.remb_bps, loss=self.loss, rtt_s=self.rtt_s or 0.0, now=now
        )
        return self._note(switch)

    def set_pin(self, rung: int | None, now: float) -> RungSwitch | None:
        """The viewer asked for a rung (over the data channel, with ``can_control_quality``);
        None: back to its bandwidth's choice."""
        return self._note(self.selector.set_pin(rung, now))

    def on_timer(self, now: float) -> RungSwitch | None:
        """Run at :meth:`next_deadline`: holds expiring, the feedback timeout."""
        if self.remb_bps is None and self.selector.pending is None:
            return None
        return self._note(self.selector.on_timer(now))

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must run (None: nothing timed, e.g. before the first REMB)."""
        if self.remb_bps is None and self.selector.pending is None:
            return None
        return self.selector.next_deadline()

    def keyframe_request(self, now: float) -> int | None:
        """The rung whose encoder must make an IDR for the pending switch, when it is time."""
        return self.selector.keyframe_request(now)

    def takes(self, rung: int, keyframe: bool, now: float) -> bool:
        """Whether a video frame of ``rung`` goes to this viewer (module doc)."""
        selector = self.selector
        if rung == selector.rung:
            if keyframe:
                selector.on_keyframe(rung, now)
            return True
        return keyframe and selector.wants_keyframe(rung) and selector.on_keyframe(rung, now)

    def _note(self, switch: RungSwitch | None) -> RungSwitch | None:
        if switch is not None:
            self.last_reason = switch.reason
        return switch
