"""Run every benchmark: python -m perf [--json]."""

from __future__ import annotations

import sys

import ray

from perf import (
    bench_encoder,
    bench_fanout,
    bench_ladder,
    bench_latency,
    bench_network_latency,
    bench_pool_handoff,
    bench_receiver_feedback,
    bench_sender,
)

if __name__ == "__main__":
    flags = [arg for arg in sys.argv[1:] if arg == "--json"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        bench_pool_handoff.main(flags)
        bench_latency.main(flags)
        bench_sender.main(flags)
        bench_network_latency.main(flags)
        bench_receiver_feedback.main(flags)
        bench_encoder.main(flags)
        bench_ladder.main(flags)
        bench_fanout.main(flags)
    finally:
        ray.shutdown()
