"""GET /cluster: the ring as the cluster page draws it, in one JSON answer built from the leader's status.

    GET /cluster -> {"ok": true, "model": "gpt2", "ready": true,
                     "tokens_per_s": {"now": 11.8, "predicted_1": 12.4, ...},
                     "nodes": [{"rank": 1, "host": "node1", "status": "up", "layers": [4, 7],
                                "memory_mb": {"used": 180.2, "usable": 2900.0}, "blas": "openblas ...",
                                "ms_per_step": {"measured": 21.5, "predicted": 20.0, "off": 0.075},
                                "tokens_per_s": 46.5, "transit_ms": 0.41, ...}, ...],
                     "events": [{"t": 1765000000.0, "ago_s": 3.2, "kind": "died", "rank": 2,
                                 "text": "Worker 2 (node2) is down: ..."}, ...]}

The page (web/app.js, its "Cluster" view) polls it; `nanopipe plan --from-cluster URL` reads it too.
docs/WEB.md lists every field. A node's status here is what a person watching the cluster asks:

    up         in the ring (or holding its layers, ready)
    joining    registered for the first time and loading its layers, or not come yet
    rejoining  it died less than rejoin_grace_s ago (requests wait for it), or it is back and loading
    standby    the plan left it out: it holds no layers
    gone       it died more than rejoin_grace_s ago and has not come back

The leader says "up", "joining", "down" or "left out" (/health); the rest comes from its event log.
It is guarded like every API route: the API token when cluster_config.yaml sets api_token.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque

from flask import Flask, current_app, jsonify

from .connection import status_or_503

RATE_WINDOW_S = 10.0        # tokens/s "now": the leader's token count over about this long
RATE_MIN_SPAN_S = 1.0       # ... measured over at least this long, else not known yet


class TokenRate:
    """The cluster's tokens/s now, from the leader's running token count at each poll.

        rate.add(t=0.0, tokens=100); rate.add(t=2.0, tokens=124) -> 12.0 tokens/s
    A count that goes down (a new leader, a new scheduler) starts over."""

    def __init__(self):
        self._samples: deque = deque()
        self._lock = threading.Lock()

    def add(self, t: float, tokens) -> float | None:
        if not _number(tokens):
            return None
        with self._lock:
            if self._samples and tokens < self._samples[-1][1]:
                self._samples.clear()
            self._samples.append((t, tokens))
            while len(self._samples) > 2 and t - self._samples[1][0] >= RATE_WINDOW_S:
                self._samples.popleft()
            t0, n0 = self._samples[0]
        return round((tokens - n0) / (t - t0), 2) if t - t0 >= RATE_MIN_SPAN_S else None


def register(app: Flask):
    """Add GET /cluster to `app`."""
    app.extensions["nanopipe_token_rate"] = TokenRate()

    @app.get("/cluster")
    def cluster():
        status, down = status_or_503(nodes=[], events=[])
        if down is not None:
            return down
        rate = current_app.extensions["nanopipe_token_rate"].add(time.monotonic(), status.get("tokens"))
        return jsonify(cluster_view(status, current_app.config["LEADER"], rate))


def cluster_view(status: dict, addr: str, tokens_per_s_now: float | None = None) -> dict:
    """The leader's status answer -> GET /cluster's body (see the module docstring)."""
    placement = status.get("placement") if isinstance(status.get("placement"), dict) else {}
    stages = {row.get("rank"): row for row in placement.get("stages") or [] if isinstance(row, dict)}
    grace = status.get("rejoin_grace_s")
    now = status.get("now") if _number(status.get("now")) else time.time()
    events = [e for e in status.get("event_log") or [] if isinstance(e, dict)]
    died = {e.get("rank") for e in events if e.get("kind") == "died"}
    # the ring's nodes, and those gone for good (the leader re-planned without them; not in /health)
    listed = [n for n in (status.get("nodes") or []) + (status.get("gone") or []) if isinstance(n, dict)]
    nodes = sorted((node_view(n, stages.get(n.get("rank")), n.get("rank") in died, grace) for n in listed),
                   key=lambda n: n["rank"] if isinstance(n["rank"], int) else 1 << 30)
    mark_split_stages(nodes)
    ring = [n for n in nodes if n["layers"] and n["status"] != "standby"]
    measured = [n["ms_per_step"]["measured"] for n in ring]
    transit = [n["transit_ms"] for n in ring]
    one_stream = (round(1000 / (sum(measured) + sum(transit)), 2)
                  if ring and all(map(_number, measured + transit)) and sum(measured) + sum(transit) > 0 else None)
    up = [n for n in nodes if n["status"] in ("up", "standby")]
    return {
        "ok": bool(status.get("ready")) and len(up) == len([n for n in nodes if n["status"] != "gone"]),
        "leader": {"addr": addr, "reachable": True, "authorized": True},
        "model": status.get("model"), "ready": bool(status.get("ready")), "uptime_s": status.get("uptime_s"),
        "synthetic": status.get("synthetic"),
        "tokens_per_s": {"now": tokens_per_s_now, "one_stream_measured": one_stream,
                         "predicted_1": placement.get("predicted_tok_s_1"),
                         "predicted_8": placement.get("predicted_tok_s_8")},
        "live_sessions": status.get("live_sessions"), "tokens": status.get("tokens"),
        "requests": status.get("requests"), "errors": status.get("errors"),
        "rejoin_grace_s": grace,
        "plan": placement,          # the leader's own: split, objective, note, predictions, stages
        "ring": [n["rank"] for n in ring],
        "nodes": nodes,
        "events": [{"t": e.get("t"), "ago_s": round(now - e["t"], 1) if _number(e.get("t")) else None,
                    "kind": e.get("kind"), "rank": e.get("rank"), "text": e.get("text")} for e in events],
        "event_counts": status.get("events") if isinstance(status.get("events"), dict) else {},
    }


def node_view(n: dict, stage: dict | None, died_before: bool, grace) -> dict:
    """One node of the leader's status -> the page's node (the module docstring's statuses)."""
    stage = stage or {}
    cap = n.get("capacity") if isinstance(n.get("capacity"), dict) else {}
    measured = round(stage["measured_ms"], 3) if _number(stage.get("measured_ms")) else None
    view = {"rank": n.get("rank"), "host": n.get("host"), "addr": n.get("addr"),
            "status": page_status(n.get("status"), died_before, n.get("down_s"), grace),
            "leader_status": n.get("status"), "layers": n.get("layers")}
    if n.get("heads") is not None:          # a stage split by heads (tensor parallel) says which it holds
        view["heads"] = n["heads"]
    view.update({
        "memory_mb": {"used": n.get("rss_mb") if _number(n.get("rss_mb")) else None,
                      "usable": cap.get("memory_mb") if _number(cap.get("memory_mb")) else None},
        "blas": n.get("blas"),
        "ms_per_step": {"measured": measured, "predicted": stage.get("predicted_ms"), "off": stage.get("off"),
                        "samples": stage.get("samples")},
        # the tokens/s this stage alone could keep up with: the ring goes no faster than its slowest
        "tokens_per_s": round(1000 / measured, 2) if measured else None,
        "transit_ms": n.get("transit_ms") if _number(n.get("transit_ms")) else None,
        "last_seen_s": n.get("last_seen_s"), "down_s": n.get("down_s"),
        "sessions": n.get("sessions"), "kv_cache_bytes": n.get("kv_cache_bytes"), "synthetic": n.get("synthetic"),
        "standby_reason": n.get("excluded"), "gone_reason": n.get("why"), "capacity": n.get("capacity"),
        "unknown": n.get("unknown"),
    })
    return view


def mark_split_stages(nodes: list):
    """Nodes that hold the very same layers split that stage between them (tensor parallel, each a
    share of the heads): each gets "split": {"members": [ranks], "member": its index}.

        layers [0, 1], [2, 3], [2, 3] -> ranks 1 and 2 get {"members": [1, 2], "member": 0} and 1
    """
    by_layers: dict = {}
    for n in nodes:
        if n["layers"] and n["status"] != "standby":
            by_layers.setdefault(tuple(n["layers"]), []).append(n)
    for group in by_layers.values():
        if len(group) > 1:
            ranks = [n["rank"] for n in group]
            for i, n in enumerate(group):
                n["split"] = {"members": ranks, "member": i}


def page_status(leader_said, died_before: bool, down_s, grace) -> str:
    """The leader's word for a node -> the page's:

        ("up", ...) -> "up"; ("left out", ...) -> "standby"; ("joining", False, ...) -> "joining";
        ("joining", True, ...) -> "rejoining"; ("down", True, 3.0, 10) -> "rejoining";
        ("down", True, 12.0, 10) -> "gone"; ("down", False, None, 10) -> "joining" (not come yet)
    Another word (a newer leader's) is passed on as it is."""
    if leader_said == "up":
        return "up"
    if leader_said == "left out":
        return "standby"
    if leader_said == "joining":
        return "rejoining" if died_before else "joining"
    if leader_said == "down":
        if not died_before:
            return "joining"
        if _number(down_s) and _number(grace) and down_s > grace:
            return "gone"
        return "rejoining"
    return str(leader_said)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
