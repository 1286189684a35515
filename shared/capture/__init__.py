"""Capture: every source of pictures and sound, and the decisions about pacing them.

``source`` holds the types every source shares (``FrameSource``, ``SourceInfo``, ``CameraMode``);
``engine`` opens sources by spec.  Each device has its own shell: ``camera`` (OpenCV) with
``v4l2`` (enumeration, ioctls), ``screen`` (mss), ``file`` (PyAV demux), ``audio``
(sounddevice into Opus), and the synthetic ``testpattern`` with its readable ``stamp``.
``optimizer`` (mode choice) and ``pacing`` (frame gate, pacer, rate meter) are pure cores with
time passed in; ``pixels`` converts pictures into the frame pool's layout.
"""
