"""The HTTP server's Prometheus series (GET /metrics), named as vLLM names its own (`vllm:` -> `moestack:`).

Gauges read the engine thread's last snapshot; counters and histograms are fed by the engine thread as
tokens come out (prometheus-client is thread-safe), so the latencies are the engine's, not the network's.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """One registry per server (no global state): what /metrics shows."""

    def __init__(self, snapshot):
        """`snapshot()` returns the engine thread's latest `worker.Snapshot`."""
        r = self.registry = CollectorRegistry()
        gauges = {
            "requests_running": ("requests in the engine's running batch", lambda s: s.running),
            "requests_waiting": ("requests waiting to be admitted", lambda s: s.waiting),
            "kv_cache_usage_perc": ("fraction of KV blocks held by requests (1 = full)", lambda s: s.kv_usage),
            "kv_blocks_free": ("free KV blocks (evictable prefix-cache blocks included)", lambda s: s.kv_free),
            "kv_blocks_total": ("KV blocks in the cache", lambda s: s.kv_total),
            "batch_size_max": ("largest batch an engine step has run", lambda s: s.max_batch),
            "num_preemptions": ("requests preempted (recomputed later) since start", lambda s: s.preemptions),
            "realb_layer_forwards": ("ReaLB: MoE layer forwards it decided on (batches of >= min_tokens)",
                                     lambda s: s.realb_layers),
            "realb_low_precision_layer_forwards": ("ReaLB: layer forwards where some EP rank ran low precision",
                                                   lambda s: s.realb_low_layers),
        }
        for name, (doc, read) in gauges.items():
            Gauge(f"moestack:{name}", doc, registry=r).set_function(lambda read=read: read(snapshot()))
        self.prompt_tokens = Counter("moestack:prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("moestack:generation_tokens", "tokens generated", registry=r)
        self.finished = Counter("moestack:request_success", "requests finished, by finish reason (stop, length, "
                                "abort)", ["finished_reason"], registry=r)
        self.rejected = Counter("moestack:request_rejected", "requests refused before running, by HTTP status",
                                ["status"], registry=r)
        self.batch = Histogram("moestack:batch_size", "sequences per engine step", registry=r, buckets=BATCH_BUCKETS)
        self.ttft = Histogram("moestack:time_to_first_token_seconds", "arrival to first generated token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("moestack:inter_token_latency_seconds", "time between a request's tokens", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("moestack:e2e_request_latency_seconds", "arrival to the last token", registry=r,
                             buckets=LATENCY_BUCKETS)
