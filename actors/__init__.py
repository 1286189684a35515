"""The Ray layer and the public API of kizuna-stream.

``StreamManager`` is what a user drives; the actor classes are plain classes that the
supervisor starts with ``ray.remote`` (see ``actors.placement``) and calls through the typed
handles of ``actors.handles``.
"""

from actors.manager import StreamManager

__all__ = ["StreamManager"]
