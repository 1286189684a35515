"""RTP and RTCP, sans-I/O: packets, payload formats, and the sending and receiving sessions.

``packet`` (RFC 3550 §5) and ``rtcp`` (RFC 3550 §6, RFC 4585) are the wire formats; ``h264``
(RFC 6184) and ``opus`` (RFC 7587) the payload formats.  ``sender`` is the per-viewer sending
session with ``send_history`` and ``bandwidth`` (the sender's estimate and RTT); ``keyframes``
decides where the sender skips to and when it asks the encoder for a keyframe; ``receiver`` is
the viewer's session with ``jitter_buffer`` and ``feedback`` (what a receiver measures and
reports); ``rate_window`` measures a send or receive rate in bounded memory.
Nothing here touches a socket or reads a clock: time is passed in, ``now`` on the monotonic
clock, and the wall clock only where it is data (an SR's NTP timestamp, capture times).
"""
