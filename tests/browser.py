"""Headless Chromium for the browser tests, driven over the DevTools protocol (CDP).

No WebDriver: Chromium is started with ``--remote-debugging-port=0``, which writes the port it
chose to ``DevToolsActivePort`` in its profile folder; the page's target is found at
``/json/list`` and driven over its websocket (aiohttp's client) with ``Runtime.evaluate`` and
``Page.captureScreenshot``.

The flags: ``--use-fake-ui-for-media-stream`` grants media permissions without a prompt;
``--disable-features=WebRtcHideLocalIpsWithMdns`` makes Chromium offer its real host
addresses instead of mDNS ``.local`` names, which the aiortc server would otherwise have to
resolve over multicast DNS; ``--autoplay-policy=no-user-gesture-required`` lets the page play
without a click.  As root (CI containers), Chromium's sandbox cannot start: ``--no-sandbox``.

:func:`chromium_path` finds Debian's ``chromium`` package; a test skips without it, except
under ``CI=true``, where a missing browser fails the test (the CI image must have it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

FLAGS = (
    "--headless=new",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-gpu",
    "--use-fake-ui-for-media-stream",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
    "--remote-debugging-port=0",
    "--window-size=800,600",
)


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path is not None:
            return path
    message = "Chromium is not installed (Debian: apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


class Page:
    """One page's DevTools session."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._socket.send_json({"id": call_id, "method": method, "params": params})
        while True:
            message = await self._socket.receive_json(timeout=30)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, path: Path) -> None:
        data = (await self.call("Page.captureScreenshot", format="png"))["data"]
        path.write_bytes(base64.b64decode(data))


@contextlib.asynccontextmanager
async def chromium(url: str, profile: Path) -> AsyncIterator[Page]:
    """Headless Chromium showing ``url``; its page."""
    process = subprocess.Popen(
        [
            chromium_path(),
            *FLAGS,
            *(["--no-sandbox"] if os.geteuid() == 0 else []),
            f"--user-data-dir={profile}",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        marker = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (marker.exists() and marker.read_text().strip()):
            assert process.poll() is None, f"chromium exited with {process.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port = int(marker.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                    targets = json.loads(await response.text())
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    break
                assert time.monotonic() < deadline, "chromium opened no page"
                await asyncio.sleep(0.1)
            async with session.ws_connect(
                pages[0]["webSocketDebuggerUrl"], max_msg_size=64 << 20
            ) as socket:
                yield Page(socket)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
