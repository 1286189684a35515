"""WebRTC viewers (browsers) fed with the encoder's packets: encode once, no encoder per peer.

- :mod:`shared.webrtc.track`: an aiortc track that hands already-encoded access units
  (``av.Packet``) to aiortc's RTP sender, which packetizes them without encoding;
- :mod:`shared.webrtc.feed`: the shell that reads one packet ring (woken by its doorbell) and
  fans each packet out to every peer's track;
- :mod:`shared.webrtc.whep`: the WHEP endpoint (draft-ietf-wish-whep) over aiohttp: an SDP
  offer with a viewer token in, an SDP answer and a session URL out;
- :mod:`shared.webrtc.player`: the minimal browser player page the endpoint serves.
"""
