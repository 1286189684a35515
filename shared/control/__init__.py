"""Control decisions, pure: the stream state table, quality targets, placement and resources.

``session`` is the stream's state machine; ``quality`` turns viewer feedback into a target
bitrate; ``scheduler`` admits streams and places them on nodes; ``resources`` measures CPU and
memory (psutil).
"""
