"""Media: H.264 and Opus coding, the hardware probe, rate control and the quality ladder.

``codec`` wraps PyAV's encoders and decoders synchronously; ``hwaccel`` finds the encoders
that work by trying each one; ``rate_control`` (bits per frame, scene cuts), ``scaler`` (which
rungs a stream has) and ``ladder`` (one encode per rung, per frame) are the decisions around
them; ``opus`` is the audio codec.
"""
