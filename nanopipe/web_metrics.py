"""The web app's Prometheus metrics: what it measured itself, plus what the leader reports.

    GET /metrics  ->  # HELP nanopipe_web_tokens_total Tokens the web app passed on to callers.
                      # TYPE nanopipe_web_tokens_total counter
                      nanopipe_web_tokens_total 42
                      nanopipe_web_ttft_seconds_bucket{le="0.05"} 3
                      ...

Every request thread records into one WebMetrics under its lock; render_metrics turns a snapshot
of it and the leader's last status answer into Prometheus text exposition format 0.0.4.
"""
from __future__ import annotations

import bisect
import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _num(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def _label(v) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Histogram:
    """A Prometheus histogram: observe(0.03) with buckets (0.01, 0.05) counts in le="0.05" and le="+Inf"."""

    def __init__(self, buckets: tuple):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)      # per bucket, not yet cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float):
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list:
        out, running = [], 0
        for le, n in zip([*map(_num, self.buckets), "+Inf"], self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {_num(self.sum)}", f"{name}_count {running}"]


class WebMetrics:
    """The web app's own measurements, shared by every request thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict = {}            # route -> generations started
        self.errors: dict = {}              # kind -> errors answered
        self.tokens = 0
        self.in_flight = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TOKEN_BUCKETS)
        self.node_s: dict = {}              # (rank, "compute" | "transit") -> seconds

    def count_request(self, route: str):
        with self.lock:
            self.requests[route] = self.requests.get(route, 0) + 1

    def count_error(self, kind: str):
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def begin(self):
        with self.lock:
            self.in_flight += 1

    def end(self):
        with self.lock:
            self.in_flight -= 1

    def observe_token(self, seconds: float, first: bool):
        with self.lock:
            self.tokens += 1
            (self.ttft if first else self.per_token).observe(seconds)

    def observe_nodes(self, node_ms: dict):
        with self.lock:
            for rank, times in node_ms.items():
                for part in ("compute", "transit"):
                    key = (str(rank), part)
                    self.node_s[key] = self.node_s.get(key, 0.0) + float(times.get(part) or 0.0) / 1000


def render_metrics(m: WebMetrics, status: dict | None) -> str:
    """Prometheus text exposition format 0.0.4: # HELP, # TYPE, then samples. `status` is the
    leader's status answer, or None when it did not answer (then only nanopipe_leader_up=0 says so)."""
    out: list = []

    def family(name, kind, help_text, samples):
        out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        for labels, value in samples:
            lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{lab}}} {_num(value)}" if lab else f"{name} {_num(value)}")

    def histogram(name, help_text, h: Histogram):
        out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *h.lines(name)])

    with m.lock:
        family("nanopipe_web_requests_total", "counter", "Generations the web app started, by route.",
               [({"route": r}, n) for r, n in sorted(m.requests.items())] or [({"route": "chat"}, 0)])
        family("nanopipe_web_tokens_total", "counter", "Tokens the web app passed on to callers.", [({}, m.tokens)])
        family("nanopipe_web_errors_total", "counter", "Error answers, by kind (invalid, unauthorized, "
               "unreachable, cluster, internal).",
               [({"kind": k}, n) for k, n in sorted(m.errors.items())] or [({"kind": "invalid"}, 0)])
        family("nanopipe_web_in_flight", "gauge", "Generations the web app is streaming now.", [({}, m.in_flight)])
        histogram("nanopipe_web_ttft_seconds", "Time from the HTTP request to its first token.", m.ttft)
        histogram("nanopipe_web_time_per_token_seconds", "Time between consecutive tokens of a reply.", m.per_token)
        for part in ("compute", "transit"):
            family(f"nanopipe_node_{part}_seconds_total", "counter",
                   f"Each node's {part} time, summed over the replies this web app served.",
                   [({"rank": r}, s) for (r, p), s in sorted(m.node_s.items()) if p == part])
    family("nanopipe_leader_up", "gauge", "1 if the leader answered a status request.", [({}, int(status is not None))])
    if status is not None:
        family("nanopipe_leader_ready", "gauge", "1 if every rank is up and the ring is closed.",
               [({}, int(bool(status.get("ready"))))])
        family("nanopipe_live_sessions", "gauge", "Generations live on the leader now.",
               [({}, status.get("live_sessions") or 0)])
        for key, help_text in (("requests", "Requests the leader has admitted."),
                               ("tokens", "Tokens the leader has sampled."),
                               ("errors", "Requests the leader failed.")):
            family(f"nanopipe_leader_{key}_total", "counter", help_text, [({}, status.get(key) or 0)])
        nodes = status.get("nodes", [])
        family("nanopipe_node_up", "gauge", "1 if the node is up.",
               [({"rank": n.get("rank"), "host": n.get("host")}, int(n.get("status") == "up")) for n in nodes])
        family("nanopipe_node_rss_bytes", "gauge", "Each node's resident memory as it last reported.",
               [({"rank": n.get("rank"), "host": n.get("host")}, int(n["rss_mb"] * 1024 * 1024))
                for n in nodes if isinstance(n.get("rss_mb"), (int, float))])
        if status.get("kv_cache_bytes") is not None:
            family("nanopipe_leader_kv_cache_bytes", "gauge", "Rank 0's KV cache memory.",
                   [({}, status["kv_cache_bytes"])])
    return "\n".join(out) + "\n"
