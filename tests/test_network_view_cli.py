"""``kizuna-stream view``'s loop against a loopback stream: per frame it does O(1) work.

The full viewer report takes latency percentiles over up to 100,000 samples, so it must be
taken at the status line's rate and at the end, never once per decoded picture.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import pytest

from actors.cli import view
from actors.cli.common import StatusLine
from shared.viewer.client import Viewer, ViewerReport
from tests.test_roq_loopback import Broadcast, until


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "status-line"])
def test_view_takes_the_full_report_at_the_status_rate_not_per_frame(
    json_output: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports = shows = 0
    report, show = Viewer.report, StatusLine.show

    def counted_report(self: Viewer) -> ViewerReport:
        nonlocal reports
        reports += 1
        return report(self)

    def counted_show(self: StatusLine, text: str) -> None:
        nonlocal shows
        shows += self.enabled
        show(self, text)

    monkeypatch.setattr(Viewer, "report", counted_report)
    monkeypatch.setattr(StatusLine, "show", counted_show)

    async def main() -> dict[str, Any]:
        broadcast = Broadcast()
        url = await broadcast.start()
        args = argparse.Namespace(
            url=str(url),
            out=None,
            display=False,
            frames=45,
            seconds=None,
            ca=None,
            streams=False,
            latency_budget=200.0,
            json=json_output,
            token=None,
            name=None,
        )
        watching = asyncio.create_task(view.watch(args, asyncio.Event()))
        await until(lambda: len(broadcast.sender.peers) == 1, "the server to see the viewer")
        sending = asyncio.create_task(broadcast.send(range(120)))
        result = await asyncio.wait_for(watching, 30)
        sending.cancel()
        await broadcast.server.close()
        return result

    result = asyncio.run(main())
    assert result["report"]["frames_decoded"] == 45
    # The end takes two (the report, and stream_stats() built on it); the status line one per
    # redraw after "connecting" (at most every STATUS_INTERVAL_S): not one per picture.
    redraws = max(shows - 1, 0)
    assert reports == 2 + redraws
    if json_output:
        assert redraws == 0
    else:
        assert 1 <= redraws < 45
