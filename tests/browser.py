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

A browser started in a network namespace (``wrap``: ``tests.netns.CappedLink.command()``) has
its DevTools port on that namespace's loopback, out of the test's reach, so it is driven over
``--remote-debugging-pipe`` instead: the protocol's messages, NUL-terminated JSON, on file
descriptors 3 (to the browser) and 4 (from it), attached to the page's target with
``Target.attachToTarget`` (``flatten``: the page's calls carry its ``sessionId``).

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
from collections.abc import AsyncIterator, Sequence
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
    """One page's DevTools session, over the page's websocket or the browser's pipe."""

    def __init__(
        self,
        socket: aiohttp.ClientWebSocketResponse | None = None,
        pipe: _Pipe | None = None,
        session_id: str | None = None,
    ) -> None:
        self._socket = socket
        self._pipe = pipe
        self._session_id = session_id
        self._ids = itertools.count(1)

    async def _send(self, message: dict[str, Any]) -> None:
        if self._socket is not None:
            await self._socket.send_json(message)
        else:
            assert self._pipe is not None
            self._pipe.send(message)

    async def _receive(self) -> dict[str, Any]:
        if self._socket is not None:
            message: dict[str, Any] = await self._socket.receive_json(timeout=30)
            return message
        assert self._pipe is not None
        return await self._pipe.receive()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params}
        if self._session_id is not None:
            message["sessionId"] = self._session_id
        await self._send(message)
        while True:
            reply = await self._receive()
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
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


class _Pipe:
    """The browser end of ``--remote-debugging-pipe``: NUL-terminated JSON messages."""

    def __init__(self, write_fd: int, reader: asyncio.StreamReader) -> None:
        self._write_fd = write_fd
        self._reader = reader

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._write_fd, data) :]

    async def receive(self) -> dict[str, Any]:
        data = await asyncio.wait_for(self._reader.readuntil(b"\0"), timeout=30)
        message: dict[str, Any] = json.loads(data[:-1])
        return message


@contextlib.asynccontextmanager
async def _piped(process_args: list[str], url: str, log: Path) -> AsyncIterator[tuple[Page, Any]]:
    to_browser, browser_in = os.pipe()[::-1]  # (write end, read end)
    browser_out, from_browser = os.pipe()[::-1]
    # fds 3 and 4 in the browser, whatever their numbers here (``ip netns exec`` passes them;
    # bash, not dash: dash redirects single-digit fds only).
    shell = f'exec "$@" 3<&{browser_in} 4>&{browser_out}'
    process = subprocess.Popen(
        ["bash", "-c", shell, "bash", *process_args, "--remote-debugging-pipe", url],
        pass_fds=(browser_in, browser_out),
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    os.close(browser_in)
    os.close(browser_out)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 << 20)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(from_browser, "rb", 0)
    )
    try:
        pipe = _Pipe(to_browser, reader)
        browser = Page(pipe=pipe)
        deadline = time.monotonic() + 30
        while True:
            targets = (await browser.call("Target.getTargets"))["targetInfos"]
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                break
            assert time.monotonic() < deadline, "chromium opened no page"
            await asyncio.sleep(0.1)
        attached = await browser.call(
            "Target.attachToTarget", targetId=pages[0]["targetId"], flatten=True
        )
        yield Page(pipe=pipe, session_id=attached["sessionId"]), process
    finally:
        transport.close()
        os.close(to_browser)
        _end(process)


def _end(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.asynccontextmanager
async def chromium(url: str, profile: Path, wrap: Sequence[str] = ()) -> AsyncIterator[Page]:
    """Headless Chromium showing ``url``; its page.  ``wrap``: a command prefix to start it
    with (a network namespace's ``ip netns exec``): then it is driven over a pipe."""
    args = [
        *wrap,
        chromium_path(),
        *FLAGS,
        *(["--no-sandbox"] if os.geteuid() == 0 else []),
        f"--user-data-dir={profile}",
    ]
    if wrap:
        log = profile.parent / f"{profile.name}.log"  # its stderr, when it fails to start
        async with _piped([a for a in args if a != "--remote-debugging-port=0"], url, log) as (
            page,
            _,
        ):
            yield page
        return
    process = subprocess.Popen(
        [*args, url],
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
        _end(process)
