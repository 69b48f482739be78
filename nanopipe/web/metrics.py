"""The web app's Prometheus metrics: what it measured itself, plus what the leader reports.

    GET /metrics  ->  # HELP nanopipe_web_tokens_total Tokens the web app passed on to callers.
                      # TYPE nanopipe_web_tokens_total counter
                      nanopipe_web_tokens_total 42.0
                      nanopipe_web_ttft_seconds_bucket{le="0.05"} 3.0
                      ...

prometheus_client formats the text (exposition format 0.0.4) and keeps the histograms. Each app has
a CollectorRegistry of its own, not the library's global one, so several apps in one process (the
tests make many) never share or collide on a metric. The leader's numbers are not kept here: they
are read from its status answer at each scrape (`LeaderCollector`). prometheus_client is imported
by the web edge only; a worker never loads it.
"""
from __future__ import annotations

import math
import threading

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, StateSetMetricFamily

# Without this every counter also gets a `<name>_created` timestamp series; the metric names stay
# those nanopipe always had.
prometheus_client.disable_created_metrics()

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# every status the leader gives a node (/health): each node's nanopipe_node_status has all of them, 1 for its own
NODE_STATES = ("up", "joining", "down", "left out")
# the cluster events the leader counts (its status' "events"): each is shown, 0 until it happens
EVENT_KINDS = ("joined", "rejoined", "left", "planned", "slow_stage", "gone", "drained", "replanned")
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LeaderCollector:
    """The leader's side of /metrics, from its last status answer (None: it did not answer, and only
    nanopipe_leader_up=0 says so)."""

    def __init__(self):
        self.status: dict | None = None

    def collect(self):
        status = self.status
        yield GaugeMetricFamily("nanopipe_leader_up", "1 if the leader answered a status request.",
                                value=int(status is not None))
        if status is None:
            return
        yield GaugeMetricFamily("nanopipe_leader_ready", "1 if every rank is up and the ring is closed.",
                                value=int(bool(status.get("ready"))))
        yield GaugeMetricFamily("nanopipe_live_sessions", "Generations live on the leader now.",
                                value=status.get("live_sessions") or 0)
        for key, help_text in (("requests", "Requests the leader has admitted."),
                               ("tokens", "Tokens the leader has sampled."),
                               ("errors", "Requests the leader failed."),
                               ("prompt_tokens_cached", "Prompt tokens reused from kept KV caches (prefix reuse)."),
                               ("prompt_tokens_computed", "Prompt tokens prefilled through the model."),
                               ("prefix_hits", "Requests that reused a kept KV cache's prefix."),
                               ("prefix_evictions", "Kept KV caches dropped to stay within prefix_cache_mb.")):
            yield CounterMetricFamily(f"nanopipe_leader_{key}", help_text, value=status.get(key) or 0)
        nodes = status.get("nodes", [])
        up = GaugeMetricFamily("nanopipe_node_up", "1 if the node is up.", labels=["rank", "host"])
        rss = GaugeMetricFamily("nanopipe_node_rss_bytes", "Each node's resident memory as it last reported.",
                                labels=["rank", "host"])
        usable = GaugeMetricFamily("nanopipe_node_memory_usable_bytes",
                                   "The memory each node found usable for the model when it measured itself.",
                                   labels=["rank", "host"])
        state = StateSetMetricFamily("nanopipe_node_status", "Each node's status as /health gives it: "
                                     "up, joining, down or left out (a standby the plan gave no layers).",
                                     labels=["rank", "host"])
        for n in nodes:
            labels = [str(n.get("rank")), str(n.get("host"))]
            up.add_metric(labels, int(n.get("status") == "up"))
            if _number(n.get("rss_mb")):
                rss.add_metric(labels, int(n["rss_mb"] * 1024 * 1024))
            cap = n.get("capacity") if isinstance(n.get("capacity"), dict) else {}
            if _number(cap.get("memory_mb")):
                usable.add_metric(labels, int(cap["memory_mb"] * 1024 * 1024))
            states = NODE_STATES + ((n.get("status"),) if n.get("status") not in NODE_STATES else ())
            state.add_metric(labels, {str(k): k == n.get("status") for k in states})
        yield up
        yield rss
        yield usable
        yield state
        events = status.get("events") if isinstance(status.get("events"), dict) else {}
        counter = CounterMetricFamily("nanopipe_cluster_events", "Cluster events the leader logged, by kind: a "
                                      "worker joined, rejoined or left, the leader planned the split, a stage "
                                      "ran slow.", labels=["kind"])
        for kind in sorted(set(EVENT_KINDS) | set(map(str, events))):
            v = events.get(kind, 0)
            counter.add_metric([kind], v if _number(v) else 0)
        yield counter
        if status.get("kv_cache_bytes") is not None:
            yield GaugeMetricFamily("nanopipe_leader_kv_cache_bytes", "Rank 0's KV cache memory.",
                                    value=status["kv_cache_bytes"])
        if status.get("prefix_kept") is not None:
            yield GaugeMetricFamily("nanopipe_prefix_kept", "Finished sessions' KV caches kept on every stage.",
                                    value=status["prefix_kept"])
        yield from placement_metrics(status.get("placement") or {})


def _number(x) -> bool:
    """A finite number >= 0 (not a bool): what a gauge of bytes or a count may show."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def placement_metrics(placement: dict):
    """The plan's prediction against what the stages take: per stage, predicted and
    measured seconds of a one-row decode step, and the plan's predicted tokens/s."""
    labels = ["rank", "host"]
    pred = GaugeMetricFamily("nanopipe_stage_predicted_seconds",
                             "A one-row decode step's predicted time at each stage (placement).", labels=labels)
    meas = GaugeMetricFamily("nanopipe_stage_measured_seconds",
                             "A one-row decode step's measured time at each stage (median of recent steps).",
                             labels=labels)
    for row in placement.get("stages") or []:
        lab = [str(row.get("rank")), str(row.get("host"))]
        if isinstance(row.get("predicted_ms"), (int, float)):
            pred.add_metric(lab, row["predicted_ms"] / 1000)
        if isinstance(row.get("measured_ms"), (int, float)):
            meas.add_metric(lab, row["measured_ms"] / 1000)
    yield pred
    yield meas
    tok = GaugeMetricFamily("nanopipe_predicted_tokens_per_second", "The plan's predicted tokens/s.",
                            labels=["streams"])
    for streams in ("1", "8"):
        v = placement.get(f"predicted_tok_s_{streams}")
        if isinstance(v, (int, float)):
            tok.add_metric([streams], v)
    yield tok


class WebMetrics:
    """The web app's own measurements, shared by every request thread (prometheus_client's metrics
    are thread-safe), in a registry of this app's own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nanopipe_web_requests", "Generations the web app started, by route.",
                                ["route"], registry=r)
        self.tokens = Counter("nanopipe_web_tokens", "Tokens the web app passed on to callers.", registry=r)
        self.errors = Counter("nanopipe_web_errors", "Error answers, by kind (invalid, unauthorized, "
                              "unreachable, cluster, internal).", ["kind"], registry=r)
        self.in_flight = Gauge("nanopipe_web_in_flight", "Generations the web app is streaming now.", registry=r)
        self.ttft = Histogram("nanopipe_web_ttft_seconds", "Time from the HTTP request to its first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.per_token = Histogram("nanopipe_web_time_per_token_seconds",
                                   "Time between consecutive tokens of a reply.", buckets=TOKEN_BUCKETS, registry=r)
        self.node_s = {part: Counter(f"nanopipe_node_{part}_seconds",
                                     f"Each node's {part} time, summed over the replies this web app served.",
                                     ["rank"], registry=r)
                       for part in ("compute", "transit")}
        self.requests.labels(route="chat")      # shown as 0 before the first one
        self.errors.labels(kind="invalid")
        self.leader = LeaderCollector()
        r.register(self.leader)
        self.scrape_lock = threading.Lock()      # one scrape at a time sees its own leader status

    def count_request(self, route: str):
        self.requests.labels(route=route).inc()

    def count_error(self, kind: str):
        self.errors.labels(kind=kind).inc()

    def begin(self):
        self.in_flight.inc()

    def end(self):
        self.in_flight.dec()

    def observe_token(self, seconds: float, first: bool):
        self.tokens.inc()
        (self.ttft if first else self.per_token).observe(seconds)

    def observe_nodes(self, node_ms: dict):
        """Add one reply's per-node times: {"1": {"compute": 0.4, "transit": 0.1}, ...} in ms. What is
        not a finite number >= 0 (a worker that lied, a leader of another version) is skipped:
        a counter only goes up, and a reply never fails for its statistics."""
        if not isinstance(node_ms, dict):
            return
        for rank, times in node_ms.items():
            for part, counter in self.node_s.items():
                ms = times.get(part) if isinstance(times, dict) else None
                if isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms) and ms > 0:
                    counter.labels(rank=str(rank)).inc(ms / 1000)


def render_metrics(m: WebMetrics, status: dict | None) -> str:
    """Prometheus text exposition format 0.0.4 of the app's metrics and the leader's `status` answer
    (None when it did not answer)."""
    with m.scrape_lock:
        m.leader.status = status
        return generate_latest(m.registry).decode("utf-8")
