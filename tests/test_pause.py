"""Pausing a stream (StreamState.PAUSED): capture stops, viewers stay connected and keep the
last picture, recordings pause; resume brings frames back.  The state table first, then a real
stream with a real viewer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from actors import StreamManager
from shared.control.session import StreamEvent, StreamLifecycle, StreamOperation
from shared.errors import StreamStateError
from shared.models import (
    AccessMode,
    ErrorInfo,
    RecordingConfig,
    RecordingState,
    Resolution,
    StreamAccess,
    StreamConfig,
    StreamQuality,
    StreamSession,
    StreamState,
    StreamStats,
    StreamType,
    TestPatternSource,
)
from shared.viewer.client import Viewer
from tests.conftest import wait_for_no_leaks
from tests.test_pipeline import eventually

SMALL = StreamQuality(resolution=Resolution(320, 180), framerate=15, bitrate=200_000)


def new_session() -> StreamSession:
    return StreamSession(
        session_id="s1",
        stream_type=StreamType.CAMERA,
        source=TestPatternSource(),
        viewers=[],
        quality=SMALL,
        state=StreamState.STARTING,
        stats=StreamStats(),
        created_at=0.0,
    )


def test_the_state_table_pauses_and_resumes() -> None:
    session = new_session()
    lifecycle = StreamLifecycle(session)
    with pytest.raises(StreamStateError, match="'pause' cannot happen while it is starting"):
        lifecycle.handle(StreamEvent.PAUSE)
    lifecycle.handle(StreamEvent.STARTED)
    assert lifecycle.handle(StreamEvent.PAUSE) is StreamState.PAUSED
    assert lifecycle.running  # its actors are still polled
    # Viewers may come and go; what would change the pipeline waits for the resume.
    assert lifecycle.allows(StreamOperation.ADD_VIEWER)
    assert lifecycle.allows(StreamOperation.REMOVE_VIEWER)
    with pytest.raises(StreamStateError, match="cannot adjust the quality: stream s1 is paused"):
        lifecycle.check(StreamOperation.ADJUST_QUALITY)
    assert not lifecycle.allows(StreamOperation.RECORD)
    assert lifecycle.handle(StreamEvent.RESUME) is StreamState.ACTIVE
    assert lifecycle.allows(StreamOperation.ADJUST_QUALITY)
    with pytest.raises(StreamStateError, match="'resume' cannot happen while it is active"):
        lifecycle.handle(StreamEvent.RESUME)
    # A paused stream can fail and can be stopped.
    lifecycle.handle(StreamEvent.PAUSE)
    assert lifecycle.handle(StreamEvent.STOP) is StreamState.STOPPING
    other = StreamLifecycle(new_session())
    other.handle(StreamEvent.STARTED)
    other.handle(StreamEvent.PAUSE)
    assert other.fail(ErrorInfo(kind="CaptureError", message="gone"))
    assert other.state is StreamState.ERROR


async def frames_over(viewer: Viewer, seconds: float) -> int:
    """Frames the viewer decodes in the next ``seconds`` (an observation window, not a wait
    for a condition: the claim is that nothing arrives in it)."""
    before = viewer.frames_decoded
    await asyncio.sleep(seconds)
    return viewer.frames_decoded - before


@pytest.mark.ray
def test_pause_keeps_viewers_connected_without_new_frames_and_resume_brings_them_back(
    ray_cluster: str, tmp_path: Path
) -> None:
    async def main() -> str:
        async with StreamManager.start() as manager:
            config = StreamConfig(quality=SMALL, access=StreamAccess(mode=AccessMode.OPEN))
            sid = (await manager.start_camera_stream(config)).session_id
            recording = await manager.start_recording(
                sid, RecordingConfig(output_path=str(tmp_path / "paused.mp4"))
            )
            ticket = await manager.add_viewer(sid, "watcher")
            viewer = await Viewer.connect(ticket.url)
            watching = asyncio.create_task(viewer.watch(seconds=120))
            try:
                await eventually(lambda: viewer.frames_decoded, lambda n: n >= 15, "frames")
                paused = await manager.pause_stream(sid)
                assert paused.state is StreamState.PAUSED
                assert (await manager.get_stream(sid)).state is StreamState.PAUSED
                status = await manager.get_recording_status(recording.session_id)
                assert status.state is RecordingState.PAUSED
                # Frames already on their way may still land; after that, none.
                await frames_over(viewer, 1.0)
                assert await frames_over(viewer, 2.0) == 0
                # The connection stayed: the viewer is neither cut nor reconnecting.  Its shard
                # sent SRs all the while, so its silence timer (1.5 s) never gave up on it.
                assert viewer.termination is None
                assert (viewer.report().silences, viewer.report().reconnects) == (0, 0)
                [seen] = await manager.get_viewer_status(sid)
                assert seen.state == "connected"
                assert (await manager.get_stream(sid)).state is StreamState.PAUSED

                resumed = await manager.resume_stream(sid)
                assert resumed.state is StreamState.ACTIVE
                frozen_at = viewer.frames_decoded
                await eventually(
                    lambda: viewer.frames_decoded,
                    lambda n: n >= frozen_at + 15,
                    "frames again after the resume",
                )
                status = await manager.get_recording_status(recording.session_id)
                assert status.state is RecordingState.RECORDING
                # Pausing twice is harmless; a stopped stream cannot be paused.
                await manager.pause_stream(sid)
                assert (await manager.pause_stream(sid)).state is StreamState.PAUSED
            finally:
                watching.cancel()
                await viewer.close()
            final = await manager.stop_stream(sid)
            assert final is not None and final.state is StreamState.STOPPED
            return sid

    sid = asyncio.run(main())
    wait_for_no_leaks(sid)
