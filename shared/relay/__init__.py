"""Carrying a stream's encoded packets from the node that encodes them to other nodes.

A stream's packet rings live in one node's shared memory.  Shards on another node read a copy:
one relay connection per remote node and stream carries each rung's packets once, and the
receiving end appends them to rings in its own node's shared memory, which that node's shards
read exactly as they read the origin's.

- :mod:`shared.relay.wire` — the messages and their framing (sans-I/O codec).
- :mod:`shared.relay.uplink` — the origin's decision per packet: forward, or drop to the next
  keyframe when the link backs up (sans-I/O).
- :mod:`shared.relay.downlink` — the receiving end: sequence gaps, keyframe resync (sans-I/O).
- :mod:`shared.relay.link` — the asyncio shells: :class:`RelayServer` at the origin,
  :class:`RelayReceiver` on a remote node.
"""
