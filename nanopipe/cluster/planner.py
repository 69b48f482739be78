"""Where the layers go, as the leader decides it: the plan, and its prediction against what is measured.

With `partition: auto` (or none set) and workers, every node measures itself first (its speed with
the model's own matrix shapes, its usable memory; placement.measure). Once the last worker's
figures are in, placement.decide chooses the split (as `nanopipe plan` does), rank 0 reloads its
blocks if they moved, and each worker is told its place; a worker the plan leaves out stands by.
After real traffic, each stage's measured one-row time is compared with the prediction.
"""
from __future__ import annotations

import logging
import threading

from ..partition import first_last, layers_text, planned_by_leader, uses_mapping
from .registry import finite
from .wire import Msg, plan

DEBUG, WARNING, ERROR = logging.DEBUG, logging.WARNING, logging.ERROR


def figure(v, unit: str, fmt: str = ".1f") -> str:
    """A measured figure for the log: (9.04, "GB/s") -> "9.0 GB/s"; None -> "unknown GB/s"."""
    return f"unknown {unit}" if v is None else f"{v:{fmt}} {unit}"


class Planner:
    """Owns the split: `ranges` (each rank's (lo, hi), rank 0 first), `pending` (the plan waits for
    every worker's figures), rank 0's `capacity`, the chosen `placement` and its `note`, and the
    stages' measured times against that prediction (`stage_report`, `check_predictions`), and
    `fatal`: why the model cannot be placed, if it cannot.

    It reads the workers' capacities from the registry and tells them their place through it
    (`registry.assign`, `registry.tell`); it reloads rank 0's blocks with `load_rank0(lo, hi)` and
    hands them to the scheduler (`Scheduler.use_stage`). What it cannot decide alone goes to the
    leader: `on_fatal(message)` (the model fits nowhere: stop) and `on_applied()` (a split was
    adopted: the ring may be needed no more). `count(kind)` counts a cluster event.
    """

    def __init__(self, cluster, model, config, ranges: list, registry, scheduler, log, *, capacity=None,
                 load_rank0=None, count=lambda kind, *about: None, on_fatal=lambda message: None,
                 on_applied=lambda: None):
        """`capacity`: rank 0's own placement.Capacity. With partition auto (or none set) and workers,
        the plan waits for every worker's measurements; `ranges` is then the starting (even) split."""
        self.cluster, self.model, self.config, self.ranges = cluster, model, config, ranges
        self.registry, self.scheduler, self.log = registry, scheduler, log
        self.capacity, self.load_rank0, self.count = capacity, load_rank0, count
        self.on_fatal, self.on_applied = on_fatal, on_applied
        self.pending = planned_by_leader(model) and len(ranges) > 1
        self.placement = None           # the plan's prediction (placement.Placement), for /metrics and bench
        self.plan_note = ""             # how the split was chosen, for status()
        self.fatal: str | None = None   # set when the model cannot be placed: `serve` exits with it
        self._off_warned: dict = {}     # rank -> (((lo, hi), "slower" | "faster") warned about or None, last % off)

    # -- the figures ---------------------------------------------------------------------------

    def capacities(self) -> list:
        """Every node's Capacity in rank order (None where not known yet)."""
        return [self.capacity] + self.registry.capacities()

    def shape(self):
        from ..placement import ModelShape
        c = self.config
        return ModelShape(n_layer=c.n_layer, n_embd=c.n_embd, n_ctx=c.n_ctx, n_vocab=c.n_vocab, n_head=c.n_head)

    def on_capacity(self, w, data, peer: str):
        """Worker w measured itself (its STATS {"capacity"}): note it; plan once every worker has."""
        from ..placement import Capacity
        try:
            cap = Capacity.from_dict(data)
        except ValueError as e:
            # unknown, not missing: the plan goes ahead without its figures rather than wait for them
            self.log(f"Worker {w.rank} ({peer}) sent a bad capacity ({e}); it counts as unknown", WARNING)
            cap = Capacity.unknown(w.host, "unknown (bad report)")
        w.capacity = cap.overridden(self.cluster.node_overrides.get(w.host))
        c = w.capacity
        self.log(f"Worker {w.rank} ({w.host}) measured {figure(c.speed_gbps, 'GB/s')} (1 row), "
                 f"{figure(c.speed8_gbps, 'GB/s')} (8 rows), {figure(c.memory_mb, 'MB usable', '.0f')} ({c.source})"
                 + (f"; unknown: {', '.join(c.unknowns)}" if c.unknowns else ""))
        measured = all(x is not None for x in self.registry.capacities())
        with self.registry.lock:
            go = self.pending and measured
            if go:
                self.pending = False            # one plan per leader: a rejoining worker keeps its layers
        if go:
            threading.Thread(target=self._plan, daemon=True, name="planner").start()
        elif self.placement is None and measured:
            self._predict_current()

    def _predict_current(self):
        """A fixed split (even, balanced, mapping): predict it all the same, to check it against traffic."""
        from ..placement import forecast
        from .group import hops
        if self.capacity is None or len(hops(self.ranges, list(range(len(self.ranges))))) < len(self.ranges):
            return                          # a split stage: the placement model runs stages in turn (`plan` says)
        p = forecast(self.shape(), self.capacities(), self.ranges, self.cluster, self.model.placement_objective)
        if p is not None:                   # None: a speed unknown, nothing to predict with
            self.placement = p

    # -- the plan ------------------------------------------------------------------------------

    def transits(self) -> list:
        """Every hop transit measured on real traffic so far, in ms (for split_plan.split_link)."""
        batcher = getattr(self.scheduler, "batcher", None)
        return [ms for q in dict(batcher.transit_ms if batcher else {}).values() for ms in list(q)]

    def _plan(self):
        """Every worker has measured itself: split_plan.decide_with_split chooses the split (as
        `nanopipe plan` does); tell each worker its layers."""
        from ..placement import PlacementError, unknown_figures
        from .split_plan import decide_with_split, members_run_head
        caps = self.capacities()
        unknown = unknown_figures(caps)
        if unknown:
            self.log(f"Plan: figures unknown ({'; '.join(unknown)}); planning with what is known", WARNING)
        try:
            d = decide_with_split(self.shape(), caps, self.ranges, self.model, self.cluster, transit_ms=self.transits())
        except PlacementError as e:
            self._refuse(str(e))
            return
        self.plan_note = d.note
        head = members_run_head(d, self.cluster)
        self.count("planned", None, f"Plan: {d.note}")
        if d.no_split:
            self.log(f"Plan: no split stage: {d.no_split}")
        if d.split is not None:             # a split stage: the placement model (stages in turn) cannot predict it
            excluded = [None] + [f"{caps[i].name}: not in the split stage, which predicts one conversation faster"
                                 if lo == hi else None for i, (lo, hi) in enumerate(d.ranges) if i > 0]
            self.log("Plan: " + ", ".join(f"rank {i} ({c.name}) {layers_text(*r)}" for i, (c, r) in
                                          enumerate(zip(caps, d.ranges))) + f"; planned: {self.plan_note}")
            self._apply_plan(d.ranges, excluded, head)
            return
        if not d.solved:
            self.log(f"Plan: {self.plan_note}")
            self._apply_plan(d.ranges, [None] * len(caps), head)
            if d.placement is not None:
                self.placement = d.placement
            return
        p, ev = d.placement, d.even
        excluded = [None] * len(caps)
        for i, (lo, hi) in enumerate(p.ranges):
            if i > 0 and lo == hi:
                excluded[i] = next((n for n in p.notes if n.startswith(f"{caps[i].name}:")),
                                   f"{caps[i].name}: the plan gives it no layers")
        self.log(f"Plan: {self.plan_note}: " + ", ".join(
            f"rank {i} ({c.name}) {layers_text(*r)}" for i, (c, r) in enumerate(zip(caps, p.ranges)))
            + f"; predicted {p.tok_s(1):.1f} tok/s for 1 stream, {p.tok_s(8):.1f} for 8 "
              f"(even split: {ev.tok_s(1):.1f} and {ev.tok_s(8):.1f})")
        for n in p.notes:
            self.log(f"Plan: {n}", WARNING)
        self._apply_plan(p.ranges, excluded, head)
        self.placement = p

    def _refuse(self, message: str):
        """The model does not fit the cluster: tell every worker, and stop (`serve` exits with it)."""
        self.fatal = message
        self.log(f"Cannot place the model: {message}", ERROR)
        for w in self.registry.workers.values():
            self.registry.tell(w, Msg.ERROR, {"message": message, "fatal": True})
        self.on_fatal(message)

    def _apply_plan(self, ranges: list, excluded: list, head_on_members: bool):
        """Adopt `ranges` (and where the LM head runs, if they end in a split stage): reload rank 0's
        blocks if they changed, then send each worker its place."""
        ranges = [tuple(r) for r in ranges]
        if ranges[0] != tuple(self.ranges[0]) and self.load_rank0 is not None:
            lo, hi = ranges[0]
            # requests that came in while the nodes were measured wait on in the same scheduler
            self.scheduler.use_stage(self.load_rank0(lo, hi))
            self.log(f"Server reloaded its share for the plan: layers {layers_text(*ranges[0])}")
        self.ranges = ranges
        places = self.registry.assign(ranges, excluded, head_on_members)
        self.on_applied()
        for r, w in self.registry.workers.items():
            # one that left gets its place in the WELCOME when it is back
            self.registry.tell(w, *plan(places[r]))

    # -- the prediction against traffic -----------------------------------------------------------

    def check_predictions(self):
        """After real traffic: warn when a stage's measured one-row time goes more than 25% off its
        prediction, once per condition (rank, its layers, slower or faster), and again only when that
        changes; it is back in line below 15% (a stage hovering at 25% does not flap). The figures
        go to the debug log (-v) whenever their whole percent changes."""
        for row in self.stage_report():
            off = row.get("off")
            if off is None or row["samples"] < 16:
                continue
            rank = row["rank"]
            said, last_pct = self._off_warned.get(rank, (None, None))
            pct = round(off * 100)
            figures = (f"Stage {rank} ({row['host']}) takes {row['measured_ms']:.2f} ms per decode step, "
                       f"{off:+.0%} off its predicted {row['predicted_ms']:.2f} ms")
            condition = (tuple(row["layers"] or ()), "slower" if off > 0 else "faster")
            if abs(off) > 0.25 and said != condition:
                said = condition
                self.count("slow_stage", rank, figures)
                self.log(f"{figures} (throttled, overloaded, or measured at a better moment; said again only "
                         "if that changes, figures at -v)", WARNING)
            elif said is not None and abs(off) < 0.15:
                said = None
                self.log(f"{figures}: back in line with its prediction")
            elif pct != last_pct:
                self.log(figures, DEBUG)
            self._off_warned[rank] = (said, pct)

    def stage_report(self) -> list:
        """Predicted vs measured milliseconds per one-row decode step, per stage in the ring."""
        p = self.placement
        if p is None:
            return []
        rows = []
        workers = self.registry.workers
        for r in range(len(self.ranges)):
            if r > 0 and workers[r].excluded:
                continue
            pred = p.stage_s[r] * 1000
            if r == 0:
                samples = sorted(self.scheduler.decode_ms)
                meas = samples[len(samples) // 2] if samples else None
                n, host = len(samples), self.cluster.leader.host
            else:
                w = workers[r]
                meas, n, host = w.stats.get("decode_ms"), w.stats.get("decode_samples", 0) or 0, w.host
            meas = meas if finite(meas) and meas >= 0 else None     # (checked_stats let only those in)
            n = n if finite(n) else 0
            rows.append({"rank": r, "host": host, "layers": first_last(*self.ranges[r]), "predicted_ms": round(pred, 3),
                         "measured_ms": None if meas is None else round(meas, 3), "samples": n,
                         "off": round(meas / pred - 1, 3) if meas and pred > 0 else None})
        return rows

    def lm_head_ranks(self) -> list:
        """Who runs the LM head in the ring in force: [0], or the members of the split stage that
        ends it when they run it, each its share of the vocabulary ([1, 2]); [0] when the plan
        gave them the head but a member holds no share of it (its READY said why: registry.splits_head)."""
        return self.registry.stages()[-1] if self.registry.splits_head() else [0]

    def status(self) -> dict:
        """The plan and its prediction (None until every node is measured), and predicted vs measured
        per stage after traffic: the leader's status()["placement"]."""
        from ..placement import unknown_figures
        p = self.placement
        how = "layer_mapping" if uses_mapping(self.model) else self.model.partition or "default"
        out = {"partition": how, "objective": self.model.placement_objective,
               "note": self.plan_note, "pending": self.pending, "stages": self.stage_report(),
               "unknown": unknown_figures(self.capacities()),
               "lm_head_ranks": self.lm_head_ranks(),
               # the members that were to run a share of the LM head and hold none, and why
               "lm_head_missing": [{"rank": r, "why": why} for r, why in self.registry.head_missing().items()]}
        if p is not None:
            out.update(predicted_tok_s_1=round(p.tok_s(1), 2), predicted_tok_s_8=round(p.tok_s(8), 2),
                       hop_ms=round(p.hop_s * 1000, 3), notes=list(p.notes))
        return out
