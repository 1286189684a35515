"""The browser player page: plain HTML and JavaScript, no build step.

It opens the control data channel (:mod:`shared.webrtc.control`), POSTs a recvonly offer to
the stream's WHEP resource with the token (the ``token`` query parameter, or the field on the
page), waits for ICE gathering to finish first since the endpoint does not trickle, and plays
the answer's tracks in a ``<video>`` element.  An overlay shows the picture size, the received
bitrate (``getStats``), the rung (the channel's ``stats``) and the latency.

Latency: when the picture carries the test source's stamp (:mod:`shared.capture.stamp`: the
frame number and capture time, one bit per 8- or 16-pixel block of pure black or white across
the top rows), each presented frame (``requestVideoFrameCallback``) is drawn to a canvas and
the stamp read back as :func:`shared.capture.stamp.read_stamp` does: the inner half of each
block, thresholded at mid-grey, the marker and the CRC-32 checked; the latency is the display
time minus the capture time (wall clocks: the same machine, or synchronised ones).  The page
reports it to the server once a second.

``window.whep`` exposes the state tests read (``status``: the last HTTP status, ``error``,
``stats``: the last stats message, ``notices``, ``latencies``: the last 600 readings in ms,
``quality``: the last quality reply) and ``requestRung(n)`` (null: automatic).
"""

from __future__ import annotations

import html
import json

__all__ = ["player_page"]

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>kizuna-stream: %(title)s</title>
<style>body{margin:0;background:#111;color:#eee;font:14px sans-serif}
video{width:100%%;max-height:90vh;background:#000}
#overlay{position:fixed;bottom:8px;left:8px;background:#0008;padding:4px 8px}
#notice{position:fixed;top:40px;left:8px;background:#0008;padding:4px 8px}</style></head>
<body>
<form id="form"><input id="token" placeholder="viewer token" size="60">
<button>Play</button>
<select id="rung" title="quality (needs can_control_quality)"><option value="">auto</option></select>
</form>
<video id="video" autoplay muted playsinline></video>
<div id="overlay">idle</div><div id="notice"></div>
<script>
const stream = %(stream)s;
const video = document.getElementById("video");
const overlay = document.getElementById("overlay");
const whep = window.whep = {status: null, error: null, location: null, stats: null,
  notices: [], latencies: [], quality: null, channel: null, stamps: 0};
const params = new URLSearchParams(location.search);
document.getElementById("token").value = params.get("token") || "";

// The stamp (shared/capture/stamp.py): marker E4B1, frame u32, capture_us u64, CRC-32.
const CRC = new Uint32Array(256).map((_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
const canvas = document.createElement("canvas");
const context = canvas.getContext("2d", {willReadFrequently: true});
function readStamp() {
  const width = video.videoWidth, height = video.videoHeight;
  if (width < 160 || height < 96) return null;
  const block = width >= 640 ? 16 : 8, columns = Math.floor(width / block);
  const rows = Math.ceil(144 / columns), margin = block / 4;
  canvas.width = width; canvas.height = rows * block;
  context.drawImage(video, 0, 0, width, height, 0, 0, width, height);
  const pixels = context.getImageData(0, 0, width, rows * block).data;
  const bytes = new Uint8Array(18);
  for (let bit = 0; bit < 144; bit++) {
    const x0 = (bit %% columns) * block, y0 = Math.floor(bit / columns) * block;
    let sum = 0, count = 0;
    for (let y = y0 + margin; y < y0 + block - margin; y++)
      for (let x = x0 + margin; x < x0 + block - margin; x++) {
        const i = (y * width + x) * 4;
        sum += 0.299 * pixels[i] + 0.587 * pixels[i + 1] + 0.114 * pixels[i + 2]; count++;
      }
    if (sum / count > 127.5) bytes[bit >> 3] |= 0x80 >> (bit & 7);
  }
  if (bytes[0] !== 0xe4 || bytes[1] !== 0xb1) return null;
  const view = new DataView(bytes.buffer);
  if (crc32(bytes.subarray(2, 14)) !== view.getUint32(14)) return null;
  return {frame: view.getUint32(2), captureMs: Number(view.getBigUint64(6)) / 1000};
}
function onFrame(now) {
  const stamp = readStamp();
  if (stamp) {
    whep.stamps++;
    whep.latencies.push(performance.timeOrigin + now - stamp.captureMs);
    if (whep.latencies.length > 600) whep.latencies.shift();
  }
  video.requestVideoFrameCallback(onFrame);
}
function percentile(values, p) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
}

let channel = null;
window.requestRung = (rung) => channel && channel.readyState === "open" &&
  channel.send(JSON.stringify({type: "quality", rung: rung}));
document.getElementById("rung").onchange = (event) =>
  window.requestRung(event.target.value === "" ? null : Number(event.target.value));

async function play() {
  const pc = new RTCPeerConnection();
  pc.addTransceiver("video", {direction: "recvonly"});
  pc.addTransceiver("audio", {direction: "recvonly"});
  channel = pc.createDataChannel("kizuna");
  channel.onopen = () => { whep.channel = "open"; };
  channel.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.type === "stats") {
      whep.stats = message;
      const select = document.getElementById("rung");
      if (select.options.length === 1) for (const rung of message.rungs)
        select.add(new Option(rung.width + "x" + rung.height, rung.index));
    } else if (message.type === "notice") {
      whep.notices.push(message);
      document.getElementById("notice").textContent = message.text;
    } else if (message.type === "quality") whep.quality = message;
    else if (message.type === "error") whep.error = message.reason;
  };
  const media = new MediaStream();
  pc.ontrack = (event) => { media.addTrack(event.track); video.srcObject = media; };
  if ("requestVideoFrameCallback" in video) video.requestVideoFrameCallback(onFrame);
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
  whep.status = response.status;
  if (response.status !== 201) {
    whep.error = await response.text();
    overlay.textContent = response.status + ": " + whep.error;
    pc.close();
    return;
  }
  whep.location = response.headers.get("Location");
  await pc.setRemoteDescription({type: "answer", sdp: await response.text()});
  let last = null, reported = 0;
  setInterval(async () => {
    let bytes = 0, decoded = 0;
    (await pc.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") {
        bytes = s.bytesReceived; decoded = s.framesDecoded || 0;
      }
    });
    const now = performance.now();
    const kbps = last ? Math.round((bytes - last[1]) * 8 / (now - last[0])) : 0;
    last = [now, bytes];
    const recent = whep.latencies.slice(reported - whep.stamps || whep.latencies.length);
    reported = whep.stamps;
    const latency = percentile(recent, 0.5), p95 = percentile(whep.latencies, 0.95);
    const rung = whep.stats ? "rung " + whep.stats.rung : "rung ?";
    overlay.textContent = video.videoWidth + "x" + video.videoHeight + " " + kbps +
      " kbit/s " + rung + (latency === null ? "" : " latency " + Math.round(latency) + " ms");
    if (channel.readyState === "open") channel.send(JSON.stringify({type: "report",
      latency_ms: latency, latency_p95_ms: p95, width: video.videoWidth,
      height: video.videoHeight, frames_decoded: decoded}));
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
