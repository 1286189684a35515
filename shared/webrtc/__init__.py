"""WebRTC viewers (browsers) fed with the encoder's packets: encode once, no encoder per peer.

- :mod:`shared.webrtc.track`: an aiortc track that hands already-encoded access units
  (``av.Packet``) to aiortc's RTP sender, which packetizes them without encoding;
- :mod:`shared.webrtc.feed`: the shell that reads one packet ring (woken by its doorbell) and
  fans each packet out to every peer's track;
- :mod:`shared.webrtc.whep`: the WHEP endpoint (draft-ietf-wish-whep) over aiohttp: an SDP
  offer with a viewer token in, an SDP answer and a session URL out;
- :mod:`shared.webrtc.feedback`: a browser's REMB and receiver reports into the per-viewer
  rung choice QUIC viewers use (sans-I/O);
- :mod:`shared.webrtc.control`: the control and stats data channel's messages (sans-I/O);
- :mod:`shared.webrtc.player`: the browser player page the endpoint serves.
"""
