"""Prometheus metrics (`/metrics`), all named `tandem_*`, in a registry per app.

Request-level series are recorded by the API layer; worker-level series (KV usage, queue depths,
running requests) are read from the latest worker status reports at scrape time.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tandem.common.sampling import PRIORITIES

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _ClusterCollector:
    def __init__(self, state):
        self.state = state

    def collect(self):
        client = self.state.client
        admission = self.state.admission
        up = GaugeMetricFamily("tandem_worker_up", "1 if the worker is alive", labels=["worker", "role"])
        kv = GaugeMetricFamily("tandem_kv_cache_usage_ratio", "fraction of KV blocks in use", labels=["worker"])
        kvu = GaugeMetricFamily("tandem_kv_blocks_used", "KV blocks in use", labels=["worker"])
        kvt = GaugeMetricFamily("tandem_kv_blocks_total", "KV blocks in the pool", labels=["worker"])
        kvc = GaugeMetricFamily("tandem_kv_blocks_cached_free", "free KV blocks still holding cached prefixes",
                                labels=["worker"])
        run = GaugeMetricFamily("tandem_worker_running_requests", "requests running in the engine",
                                labels=["worker"])
        wq = GaugeMetricFamily("tandem_worker_waiting_requests", "requests waiting in the engine",
                               labels=["worker", "priority"])
        wpt = GaugeMetricFamily("tandem_worker_waiting_prefill_tokens", "uncomputed prompt tokens queued",
                                labels=["worker"])
        pre = CounterMetricFamily("tandem_worker_preemptions", "preemptions in the engine", labels=["worker"])
        qd = GaugeMetricFamily("tandem_queue_depth", "requests waiting in engines, by priority", labels=["priority"])
        infl = GaugeMetricFamily("tandem_inflight_requests", "requests admitted and not finished",
                                 labels=["priority"])
        dis = CounterMetricFamily("tandem_disagg_decisions", "remote vs local prefill decisions by reason",
                                  labels=["reason"])
        for reason, n in sorted(client.disagg_decisions.items()):
            dis.add_metric([reason], float(n))
        hand = CounterMetricFamily("tandem_kv_handoffs", "requests moved to another worker with their KV",
                                   labels=["kind"])
        hand.add_metric(["prefill_to_decode"], float(client.num_handoffs))
        hand.add_metric(["migration"], float(client.num_migrations))
        pools = GaugeMetricFamily("tandem_pool_workers", "live workers per role", labels=["role"])
        for role in ("prefill", "decode", "both"):
            pools.add_metric([role], float(sum(1 for w in client.workers.values() if w.alive and w.role == role)))
        flips = CounterMetricFamily("tandem_planner_flips", "role flips ordered by the planner", labels=["direction"])
        sp = getattr(self.state, "extra", {}).get("planner")
        if sp is not None:
            for k, v in sp.planner.flips.items():
                flips.add_metric([k], float(v))
        xfer = CounterMetricFamily("tandem_kv_transfer_bytes", "KV bytes fetched from peers", labels=["worker"])
        xfb = CounterMetricFamily("tandem_kv_transfer_fallbacks", "KV fetches that failed (request recomputed)",
                                  labels=["worker"])
        qd_sum = {p: 0 for p in PRIORITIES}
        for w in client.workers.values():
            up.add_metric([w.worker_id, w.role], 1.0 if w.alive else 0.0)
            if not w.alive or not w.stats:
                continue
            s = w.stats
            kv.add_metric([w.worker_id], float(s.get("kv_usage", 0.0)))
            kvu.add_metric([w.worker_id], float(s.get("kv_blocks_used", 0)))
            kvt.add_metric([w.worker_id], float(s.get("kv_blocks_total", 0)))
            kvc.add_metric([w.worker_id], float(s.get("kv_blocks_cached_free", 0)))
            run.add_metric([w.worker_id], float(s.get("num_running", 0)))
            wpt.add_metric([w.worker_id], float(s.get("waiting_prefill_tokens", 0)))
            pre.add_metric([w.worker_id], float(s.get("num_preemptions", 0)))
            t = s.get("transfer") or {}
            xfer.add_metric([w.worker_id], float(t.get("bytes", 0)))
            xfb.add_metric([w.worker_id], float(t.get("fallbacks", 0)))
            for p, n in (s.get("num_waiting") or {}).items():
                wq.add_metric([w.worker_id, p], float(n))
                if p in qd_sum:
                    qd_sum[p] += n
        for p in PRIORITIES:
            qd.add_metric([p], float(qd_sum[p]))
            infl.add_metric([p], float(admission.inflight.get(p, 0)))
        yield from (up, kv, kvu, kvt, kvc, run, wq, wpt, pre, qd, infl, dis, hand, pools, xfer, xfb, flips)


class Metrics:
    def __init__(self, state=None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tandem_requests", "HTTP requests by endpoint, status and priority",
                                ["endpoint", "status", "priority"], registry=r)
        self.finished = Counter("tandem_request_finish", "finished generations by finish reason and priority",
                                ["reason", "priority"], registry=r)
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "time to first token", ["priority"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("tandem_time_per_output_token_seconds", "(E2E - TTFT) / (output tokens - 1)",
                              ["priority"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("tandem_e2e_request_latency_seconds", "end-to-end request latency", ["priority"],
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("tandem_prompt_tokens", "prompt tokens of finished requests", ["priority"],
                                     registry=r)
        self.cached_tokens = Counter("tandem_prompt_tokens_cached", "prompt tokens served from the prefix cache",
                                     ["priority"], registry=r)
        self.generation_tokens = Counter("tandem_generation_tokens", "generated tokens", ["priority"], registry=r)
        self.aborted = Counter("tandem_requests_aborted", "requests aborted because the client went away",
                               ["priority"], registry=r)
        self.retried = Counter("tandem_requests_retried", "requests re-sent to another worker after a worker died",
                               registry=r)
        self.rejected = Counter("tandem_requests_rejected", "requests refused by admission control (429)",
                                ["priority"], registry=r)
        if state is not None:
            r.register(_ClusterCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)
