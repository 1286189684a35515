#!/usr/bin/env bash
# The README's two commands on a fresh Debian/Ubuntu machine with Python >= 3.11:
#   bash deploy/quickstart.sh demo [demo options]   install, then run the demo broadcast
#   bash deploy/quickstart.sh test [pytest options] install, then ruff, mypy and the test suite
#   bash deploy/quickstart.sh perf [perf options]   install, then the performance suite
#                                                   (python -m perf; e.g. --quick)
# It installs the system packages the tests use through apt when run as root (otherwise it
# prints the exact apt line and stops), makes .venv and installs the project into it.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-}"
case "$mode" in
  demo|test|perf) shift ;;
  *) echo "usage: bash deploy/quickstart.sh demo|test|perf [options]" >&2; exit 2 ;;
esac

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "kizuna-stream needs Python >= 3.11 (found: $("$python" --version 2>&1 || echo none))." >&2
  echo "Install it (e.g. apt-get install python3.11 python3.11-venv) or set PYTHON=/path/to/python3.11." >&2
  exit 1
fi

# System packages: ffmpeg (ffprobe checks recordings) for tests; venv support everywhere.
packages=()
if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  packages+=("python3-venv")
fi
if [ "$mode" = test ]; then
  command -v ffprobe >/dev/null 2>&1 || packages+=("ffmpeg")
  # Capture tests: an X server to capture (Xvfb, libXfixes for the cursor), a sound server
  # with a null sink (PulseAudio; paplay plays the test tone), PortAudio for sounddevice and
  # the ALSA plugin that routes PortAudio's ALSA devices to PulseAudio.
  command -v Xvfb >/dev/null 2>&1 || packages+=("xvfb")
  command -v pulseaudio >/dev/null 2>&1 || packages+=("pulseaudio")
  command -v paplay >/dev/null 2>&1 || packages+=("pulseaudio-utils")
  # Browser viewers: headless Chromium plays the WHEP player page (tests/test_webrtc.py).
  command -v chromium >/dev/null 2>&1 || packages+=("chromium")
  for lib in libportaudio2 libasound2-plugins libx11-6 libxfixes3; do
    dpkg -s "$lib" >/dev/null 2>&1 || packages+=("$lib")
  done
fi
if [ "$mode" = perf ]; then
  # The latency benchmark's peers: FFmpeg's pipeline and GStreamer's (x264enc, the RTP
  # elements, avdec_h264), both from Debian's packages.
  command -v ffmpeg >/dev/null 2>&1 || packages+=("ffmpeg")
  for pkg in gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
             gstreamer1.0-plugins-ugly gstreamer1.0-libav; do
    dpkg -s "$pkg" >/dev/null 2>&1 || packages+=("$pkg")
  done
fi
if [ ${#packages[@]} -gt 0 ]; then
  apt_line="apt-get install -y --no-install-recommends ${packages[*]}"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${packages[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $apt_line -qq
  else
    echo "missing system packages: ${packages[*]}. Run as root:" >&2
    echo "  apt-get update && $apt_line" >&2
    exit 1
  fi
fi

# The virtual environment, reinstalled only when pyproject.toml changes.
extras=""
[ "$mode" = test ] && extras="[test]"
[ "$mode" = perf ] && extras="[perf]"
stamp=".venv/.kizuna-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)$extras"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing kizuna-stream$extras into .venv ..." >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".$extras"
  echo "$want" > "$stamp"
fi

if [ "$mode" = demo ]; then
  [ $# -eq 0 ] && set -- --seconds 10 --viewers 2 --record demo.mp4
  exec .venv/bin/kizuna-stream demo "$@"
fi

if [ "$mode" = perf ]; then
  exec .venv/bin/python -m perf "$@"
fi

echo "== ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy" >&2
.venv/bin/mypy
echo "== pytest" >&2
exec .venv/bin/python -m pytest "$@"
