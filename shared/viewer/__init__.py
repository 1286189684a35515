"""The viewer: RTP over QUIC in, decoded pictures and sound out, feedback back to the sender.

``client`` is the asyncio viewer (``Viewer.connect(url)``): protocol work on the event loop;
``decoding`` is its decode thread (frames in, pictures and sound back, in order); ``latency``
keeps bounded latency samples for its report; ``access`` is the viewer's end of the control
stream (the hello with its token, what the server answers), sans-I/O.  ``light`` is the light viewer, which receives
and sends a real viewer's feedback but decodes nothing, and ``load`` runs many of them on one
event loop and reports (``kizuna-stream loadtest``).
"""
