"""Control decisions, pure: the stream state table, quality targets, placement and resources.

``session`` is the stream's state machine; ``stream_type`` says which kind of stream a request
makes; ``ports`` which stream serves each fixed listen port; ``stats`` folds the stages' reports
into a stream's figures; ``quality`` turns viewer feedback into a target bitrate; ``rung_choice``
picks each viewer's rung of the ladder, ``probe`` probes its path for headroom first,
``rung_targets`` sets each rung's encoder target and pauses rungs nobody watches, ``pressure``
sheds frame rate and rungs under CPU pressure; ``scheduler``
admits streams and places them on nodes; ``resources`` measures CPU and memory (psutil).
``balancer`` chooses the sender shard a new viewer goes to, when to start or retire a shard, and
rate-limits new connections; ``registry`` keeps a stream's viewers in step with the connections
its shards report.
"""
