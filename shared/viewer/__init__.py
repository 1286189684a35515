"""The viewer: RTP over QUIC in, decoded pictures and sound out, feedback back to the sender.

``client`` is the asyncio viewer (``Viewer.connect(url)``); ``latency`` keeps bounded latency
samples for its report.
"""
