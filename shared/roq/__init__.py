"""RTP over QUIC (draft-ietf-avtcore-rtp-over-quic-14): framing, the socket shell, TLS, URLs.

``framing`` and ``media_queue`` (a connection's send queue, bounded by age) are sans-I/O;
``transport`` is the one module that opens sockets (aioquic's asyncio layer); ``tls`` makes and
loads the senders' identity; ``url`` parses ``roq://`` URLs.
"""
