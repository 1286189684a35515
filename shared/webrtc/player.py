"""The browser player page: plain HTML and JavaScript, no build step.

It POSTs a recvonly offer to the stream's WHEP resource with the token (the ``token`` query
parameter, or the field on the page), waits for ICE gathering to finish first since the
endpoint does not trickle, and plays the answer's tracks in a ``<video>`` element; an overlay
shows the picture size and the received bitrate from ``getStats``.  ``window.whep`` exposes
the state tests read (``status``: the last HTTP status, ``error``).
"""

from __future__ import annotations

import html
import json

__all__ = ["player_page"]

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>kizuna-stream: %(title)s</title>
<style>body{margin:0;background:#111;color:#eee;font:14px sans-serif}
video{width:100%%;max-height:90vh;background:#000}
#overlay{position:fixed;bottom:8px;left:8px;background:#0008;padding:4px 8px}</style></head>
<body>
<form id="form"><input id="token" placeholder="viewer token" size="60">
<button>Play</button></form>
<video id="video" autoplay muted playsinline></video>
<div id="overlay">idle</div>
<script>
const stream = %(stream)s;
const video = document.getElementById("video");
const overlay = document.getElementById("overlay");
window.whep = {status: null, error: null, location: null};
const params = new URLSearchParams(location.search);
document.getElementById("token").value = params.get("token") || "";

async function play() {
  const pc = new RTCPeerConnection();
  pc.addTransceiver("video", {direction: "recvonly"});
  pc.addTransceiver("audio", {direction: "recvonly"});
  const media = new MediaStream();
  pc.ontrack = (event) => { media.addTrack(event.track); video.srcObject = media; };
  await pc.setLocalDescription(await pc.createOffer());
  // The endpoint does not trickle: send the offer with every candidate.
  await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
  });
  const headers = {"Content-Type": "application/sdp"};
  const token = document.getElementById("token").value.trim();
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch("/whep/" + encodeURIComponent(stream),
                               {method: "POST", headers, body: pc.localDescription.sdp});
  window.whep.status = response.status;
  if (response.status !== 201) {
    window.whep.error = await response.text();
    overlay.textContent = response.status + ": " + window.whep.error;
    pc.close();
    return;
  }
  window.whep.location = response.headers.get("Location");
  await pc.setRemoteDescription({type: "answer", sdp: await response.text()});
  let last = null;
  setInterval(async () => {
    let bytes = 0;
    (await pc.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") bytes = s.bytesReceived;
    });
    const now = performance.now();
    const kbps = last ? Math.round((bytes - last[1]) * 8 / (now - last[0])) : 0;
    last = [now, bytes];
    overlay.textContent = video.videoWidth + "x" + video.videoHeight + " " + kbps + " kbit/s";
  }, 1000);
}
document.getElementById("form").onsubmit = (event) => { event.preventDefault(); play(); };
if (params.has("token") || params.has("autoplay")) play();
</script></body></html>
"""


def player_page(stream: str) -> str:
    """The page for ``stream`` (the id is escaped for HTML and embedded as a JSON string)."""
    return _PAGE % {
        "title": html.escape(stream),
        "stream": json.dumps(stream).replace("<", "\\u003c"),
    }
