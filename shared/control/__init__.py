"""Control decisions, pure: the stream state table, quality targets, placement and resources.

``session`` is the stream's state machine; ``stream_type`` says which kind of stream a request
makes; ``ports`` which stream serves each fixed listen port; ``stats`` folds the stages' reports
into a stream's figures; ``quality`` turns viewer feedback into a target bitrate; ``scheduler``
admits streams and places them on nodes; ``resources`` measures CPU and memory (psutil).
``balancer`` chooses the sender shard a new viewer goes to, when to start or retire a shard, and
rate-limits new connections; ``registry`` keeps a stream's viewers in step with the connections
its shards report.
"""
