"""Shared memory between the stages: segments, the raw frame pool and the encoded packet rings.

``shm`` owns segment lifetime (named, swept, kept away from the resource tracker);
``frame_pool`` is the one-writer, many-reader seqlock pool of raw pictures; ``packet_ring``
carries encoded access units and Opus packets to every reader at its own pace.
"""
