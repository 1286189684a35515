"""The pipeline stages as Ray actors: capture, encoder, sender, recorder and quality.

Each is a thin shell: it holds a core from ``shared/`` and moves data between shared memory,
sockets and that core.  The supervisor starts them through ``actors.placement``.
"""
