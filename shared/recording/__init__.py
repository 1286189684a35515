"""Recording: the recording core, its policy decisions, the muxer and where files go.

``core`` decides what to write and when (pre-roll, start at a keyframe, pause, rotation), with
time passed in; ``policy`` holds the timeline, limits and triggers it uses; ``muxer`` writes
MP4/MOV/AVI/WebM with PyAV; ``storage`` names files and keeps quotas.
"""
