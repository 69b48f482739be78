"""Re-planning a running cluster: a node joins, is drained, or is gone for good.

The plan (which rank holds which blocks) is made when the leader starts; here it changes while
requests run. The leader re-plans when

    a node joins        a configured rank that was absent (or gone) registers and measures itself
    a node is drained   `nanopipe leave --rank R`, or POST /cluster/leave: LEAVE {"rank": R}
    a node is gone      a rank down longer than rejoin_grace_s (or absent that long since the start)

and each re-plan goes the same four steps:

    1. decide the split over the nodes that are there (placement.decide, as at the start; a
       standby the last plan left out counts again, and is used if it helps)
    2. tell each node of the new ring its place: it loads its new slice while the current ring
       goes on with the old one (Worker._take_place); rank 0 loads its own
    3. once every one is READY with its new slice, between two scheduler steps: close the old
       ring, rank 0 takes its new blocks (Scheduler.use_stage), close the new ring, and replay
       every live session from its tokens (Scheduler.replay_all): what happens after a worker dies
    4. tell the nodes left out that they stand by (PLAN), and a drained node that it may stop (DRAINED)

so no request fails: one in flight pauses for the ring change and its replay, then goes on, and
its tokens are those one process gives. A rank that is gone is not listed in the status (/health).

    replanner = Replanner(cluster, model, registry, planner, ring, scheduler, lock, log, ...)
    replanner.tick(now)                # the leader's watchdog, 4 times a second
    replanner.leave(2)                 # -> (True, "rank 2 (pi1) drained: ring 0 -> 1 -> 0")
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time

from ..partition import PartitionError, even, group_of, layers_text
from .wire import drained, plan

WARNING = logging.WARNING

LOAD_TIMEOUT_S = 300.0      # every node of a new plan must have loaded its slice within this
LEAVE_TIMEOUT_S = LOAD_TIMEOUT_S + 60.0   # how long `nanopipe leave` waits for the drain


class ReplanFailed(Exception):
    """A re-plan could not be made or carried out; `retry`: worth trying again (a node went away
    meanwhile), else not (the model does not fit the nodes that would be left)."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


class Replanner:
    """The leader's part that changes the plan of a running cluster. It owns who is gone, who is
    leaving, and whether a re-plan is due or under way; it changes nothing itself but through the
    other parts' calls: the registry (who is there, their places, `tell`), the planner (the split
    in force, its figures, `load_rank0`), the ring builder (`take_down`, `build_once`) and the
    scheduler (its lock, `use_stage`, `interrupt`). `count(kind, rank, text)` counts a cluster
    event and notes it in the leader's event log; `started` is when the leader started (a rank
    never seen is absent since then).
    """

    def __init__(self, cluster, model, registry, planner, ring, scheduler, lock, log, *,
                 count=lambda kind, *about: None, started: float | None = None, stopped=lambda: False):
        self.cluster, self.model, self.registry, self.planner = cluster, model, registry, planner
        self.ring, self.scheduler, self.lock, self.log, self.count = ring, scheduler, lock, log, count
        self.started, self.stopped = started or time.time(), stopped
        self.configured = [tuple(r) for r in planner.ranges]    # the split asked for, with every rank there
        self.gone: dict = {}        # rank -> why it is no longer part of the cluster (status leaves it out)
        self.leaving: dict = {}     # rank -> who asked; drained by the next re-plan
        self.refused: dict = {}     # rank -> why its drain could not be done (for the `leave` waiting)
        self.down_at: dict = {}     # rank -> when it was first seen down (the leader's start: never seen)
        self.wanted: str | None = None      # why a re-plan is due, until one starts
        self.running = False        # a re-plan is under way: the ring builder waits for it (holds_ring)
        self.dirty = False          # the workers were told a new split that is not in force yet
        self.cond = threading.Condition()

    # -- what the leader asks ------------------------------------------------------------------

    @property
    def workers(self) -> dict:
        return self.registry.workers

    def holds_ring(self) -> bool:
        """A re-plan is under way, or one told the workers a split not in force yet (it failed half-way
        and is tried again): nobody else should (re)build the ring meanwhile."""
        return self.running or self.dirty

    def pending(self) -> bool:
        """A re-plan is due or under way, or will be once a rank down now is past its grace: requests
        waiting for the ring wait for it rather than fail."""
        with self.lock:
            down = any(w.status == "down" and not w.excluded and r not in self.gone for r, w in self.workers.items())
        return self.running or self.wanted is not None or down

    def is_gone(self, rank: int) -> bool:
        return rank in self.gone

    def want(self, reason: str):
        with self.cond:
            self.wanted = reason if self.wanted is None else f"{self.wanted}; {reason}"

    def leave(self, rank, timeout: float = LEAVE_TIMEOUT_S) -> tuple:
        """Drain `rank`: re-plan without it, then tell it to stop. Waits for that re-plan.
        Returns (True, what happened) or (False, why not)."""
        is_rank = isinstance(rank, int) and not isinstance(rank, bool)
        if is_rank and rank == 0:
            return False, ("rank 0 is the leader: it cannot leave its own cluster (stop `nanopipe serve` to stop "
                           "the cluster)")
        w = self.workers.get(rank) if is_rank else None
        if w is None:
            return False, (f"no worker rank {rank!r:.40} in this cluster (ranks "
                           f"{', '.join(map(str, self.workers)) or 'none'})")
        if rank in self.gone:
            return False, f"rank {rank} ({w.host}) is not in the cluster: {self.gone[rank]}"
        with self.cond:
            self.refused.pop(rank, None)
            self.leaving[rank] = "drained by `nanopipe leave`"
        self.log(f"Rank {rank} ({w.host}) asked to leave: re-planning without it")
        self.want(f"rank {rank} ({w.host}) leaves")
        with self.cond:
            done = self.cond.wait_for(lambda: rank in self.gone or rank in self.refused, timeout)
            if not done:
                return False, f"rank {rank} was not drained within {timeout:g}s; see the leader's log"
            if rank in self.refused:
                return False, f"rank {rank} ({w.host}) cannot leave: {self.refused.pop(rank)}"
        return True, f"rank {rank} ({w.host}) drained: {ring_text(self.registry.stages())}"

    # -- the watchdog's round --------------------------------------------------------------------

    def tick(self, now: float):
        """Called by the leader's watchdog: note who went down, who is gone past rejoin_grace_s and who
        came back, and start a re-plan when one is due and every node it needs has measured itself."""
        grace = self.cluster.rejoin_grace_s
        news = []
        with self.lock:
            for r, w in self.workers.items():
                if w.status != "down":
                    self.down_at.pop(r, None)
                    if r in self.gone and w.capacity is not None and r not in self.leaving:
                        news.append((r, None))                  # back after it was gone: bring it in
                    continue
                if r in self.gone:
                    continue
                # first seen down now; a rank never seen is absent since the leader started
                since = self.down_at.setdefault(r, now if w.addr else self.started)
                if r in self.leaving:
                    news.append((r, "drained while down (`nanopipe leave`)"))
                elif now - since > grace:
                    news.append((r, f"down for more than rejoin_grace_s={grace:g}s" if w.addr else
                                 f"absent for more than rejoin_grace_s={grace:g}s since the leader started"))
        for r, why in news:
            host = self.workers[r].host
            if why is None:
                self.gone.pop(r, None)
                self.log(f"Rank {r} ({host}) is back: re-planning to bring it in")
                self.want(f"rank {r} ({host}) joined")
            else:
                self.gone[r] = why
                self.leaving.pop(r, None)
                self.log(f"Rank {r} ({host}) is gone: {why}; re-planning over the rest", WARNING)
                self.count("gone", r, f"Rank {r} ({host}) is gone: {why}")
                self.want(f"rank {r} ({host}) is gone")
        if news:
            with self.cond:
                self.cond.notify_all()
        if self.wanted is not None and not self.running and self._ready_to_plan():
            with self.cond:
                reason, self.wanted = self.wanted, None
                self.running = True
            threading.Thread(target=self._run, args=(reason,), daemon=True, name="replanner").start()

    def _ready_to_plan(self) -> bool:
        """Every connected node has measured itself, none that the plan counts on is down within its
        grace (wait for it: it may come back), no ring is being built, and the first plan is made or
        waits only for the gone."""
        if self.planner.fatal or self.stopped() or self.ring.building:
            return False
        with self.lock:
            for r, w in self.workers.items():
                if r not in self.gone and (w.status == "down" or w.capacity is None):
                    return False
        return not self.planner.pending or bool(self.gone)

    def _run(self, reason: str):
        try:
            self._replan(reason)
        except ReplanFailed as e:
            self._failed(reason, str(e), e.retry)
        except Exception as e:          # a bug must not end the thread unsaid, nor leave the ring held
            import traceback
            self._failed(reason, f"internal error: {type(e).__name__}: {e}\n{traceback.format_exc()}", False)
        finally:
            with self.cond:
                self.running = False
                self.cond.notify_all()

    def _failed(self, reason: str, message: str, retry: bool):
        self.log(f"Cannot re-plan ({reason}): {message}" + ("; trying again" if retry else ""), WARNING)
        with self.cond:
            if retry or self.dirty:     # the workers hold a split not in force: carry one out
                self.wanted = reason if self.wanted is None else self.wanted
            else:
                for r in list(self.leaving):
                    self.refused[r] = message
                    self.leaving.pop(r)
            self.cond.notify_all()

    # -- one re-plan -------------------------------------------------------------------------------

    def _replan(self, reason: str):
        ranges, excluded, note, placement, head = self._decide()
        with self.lock:
            old = [tuple(r) for r in self.planner.ranges]
            in_ring = {r for r, w in self.workers.items() if not w.excluded}
            same = ranges == old and head == self.registry.head_on_members and \
                all(bool(excluded[r]) == bool(w.excluded) for r, w in self.workers.items())
            if same:
                for r, w in self.workers.items():
                    w.excluded = excluded[r]
        if same:
            self.log(f"Re-plan ({reason}): the split stays ({self._split_text(ranges, excluded)})")
            self._finish(dropped=set())
            return
        t_start = time.time()
        self.log(f"Re-planning ({reason}): {self._split_text(ranges, excluded)}; {note}")
        ring = [r for r in self.workers if not excluded[r]]
        stage0 = self._rank0_stage(ranges[0], old[0])     # before any worker is told: it may fail
        with self.lock:
            self.dirty = True
            self.planner.pending = False        # this is the plan now: a first plan still waited for the gone
            places = self.registry.assign(ranges, [excluded.get(r) for r in range(len(ranges))], head)
            for r in ring:
                self.workers[r].status = "joined"   # ready again once its new slice is loaded (READY)
        for r in ring:      # 2. each loads its new slice; the current ring goes on meanwhile
            if not self.registry.tell(self.workers[r], *plan(places[r])):
                raise ReplanFailed(f"rank {r} went away before it was told its new place", retry=True)
        deadline = time.time() + LOAD_TIMEOUT_S
        while not all(self.workers[r].status == "ready" for r in ring):
            lost = [str(r) for r in ring if self.workers[r].status == "down"]
            if lost or time.time() > deadline:
                raise ReplanFailed(f"rank {', '.join(lost)} went down while loading its new slice" if lost else
                                   f"not every node loaded its new slice within {LOAD_TIMEOUT_S:g}s", retry=True)
            time.sleep(0.01)
        t_loaded = time.time()
        self._switch(ranges, stage0, reason)    # 3. between two steps: the old ring closes
        if ring and not self.ring.build_once():
            self.log("The new ring did not close at once; the watchdog tries again", WARNING)
        if placement is not None or self.planner.placement is not None:
            self.planner.placement = placement
        self.planner.plan_note = note
        self.count("replanned", None, f"Re-planned ({reason}): {ring_text(self.registry.stages())}")
        self.log(f"Re-planned ({reason}) in {time.time() - t_start:.1f}s (loading {t_loaded - t_start:.1f}s, "
                 f"ring change {time.time() - t_loaded:.2f}s): {ring_text(self.registry.stages())}")
        self._finish(dropped=in_ring - set(ring))

    def _rank0_stage(self, new: tuple, old: tuple):
        """Rank 0's blocks for the new plan (None: they stay): fewer of those it holds need no loading;
        else `load_rank0` (cli.serve gives it: the one place rank 0 loads a slice)."""
        stage = self.scheduler.stage
        if new == old:
            return None
        if stage.holds(*new):
            return stage.narrowed(*new)
        if self.planner.load_rank0 is None:
            raise ReplanFailed("rank 0 cannot load other blocks (no weights file to load them from)", retry=False)
        from ..weights import WeightsError
        try:
            loaded = self.planner.load_rank0(*new)
        except (WeightsError, OSError) as e:
            raise ReplanFailed(f"rank 0 cannot load layers {layers_text(*new)}: {e}", retry=False) from None
        self.log(f"Server loaded layers {layers_text(*new)} for the new plan")
        return loaded

    def _decide(self) -> tuple:
        """The split over the nodes that are there: (ranges per configured rank, {rank: why it is left
        out, or None}, a note, the prediction, whether a split stage ending the ring runs the LM head
        (split_plan.members_run_head)). Ranks not there hold no layers ((0, 0))."""
        from .split_plan import members_run_head
        with self.lock:
            there = [r for r, w in self.workers.items() if r not in self.gone and r not in self.leaving
                     and w.status != "down"]
            caps = [self.planner.capacity] + [self.workers[r].capacity for r in there]
        d, note = decide_over(self.planner, self.model, self.cluster, self.configured, caps, there)
        check_memory(self.planner.shape(), caps, d.ranges, self.cluster.max_sessions)
        ranges = [(0, 0)] * (1 + len(self.workers))
        excluded = {}
        ranges[0] = tuple(d.ranges[0])
        for i, r in enumerate(there, start=1):
            lo, hi = d.ranges[i]
            ranges[r] = (lo, hi)
            if lo == hi:
                excluded[r] = next((n for n in (d.placement.notes if d.placement else ()) if
                                    n.startswith(f"{caps[i].name}:")), f"{caps[i].name}: the plan gives it no layers")
        for r in self.workers:
            if r not in there:
                excluded[r] = self.gone.get(r) or self.leaving.get(r) or "not connected"
            excluded.setdefault(r, None)
        excluded[0] = None
        return ([tuple(x) for x in ranges], excluded, note, _by_rank(d.placement, [0] + there, len(ranges)),
                members_run_head(d, self.cluster))

    def _switch(self, ranges: list, stage0, reason: str):
        """Between two scheduler steps: the old ring closes (batches in flight are dropped, to be
        replayed), rank 0 takes its new blocks, the new split is the planner's."""
        self.ring.ready.clear()     # the scheduler starts no new step, and the lock below comes free
        with self.scheduler.lock, self.lock:
            self.ring.take_down()
            self.scheduler.interrupt(f"re-planning the cluster ({reason}); the answer goes on in a moment")
            if stage0 is not None:
                self.scheduler.use_stage(stage0)
            self.planner.ranges = list(ranges)
            self.dirty = False
            if not self.registry.ring_ranks():      # rank 0 holds every block: no ring at all
                ours = self.scheduler.prefix.stages[0][1]
                self.scheduler.set_prefix_stages([(len(self.scheduler.stage.blocks), ours)])
                n = self.scheduler.replay_all()
                self.ring.no_ring_needed()
                self.log("Rank 0 holds every block now: no ring" + (f"; replaying {n} session(s)" if n else ""))

    def _finish(self, dropped: set):
        """After a re-plan: a drained node is told it may stop; the others the new ring leaves out
        (`dropped`: they were in the old one) that they stand by."""
        for r, w in self.workers.items():
            if w.status == "down" or not w.excluded:
                continue
            if r in self.leaving:
                with self.cond:
                    self.gone[r] = self.leaving.pop(r)
                self.count("drained", r, f"Rank {r} ({w.host}) drained")
                self.log(f"Rank {r} ({w.host}) drained: telling it to stop")
                self.registry.tell(w, *drained(self.gone[r]))
            elif r in dropped:
                self.registry.tell(w, *plan(self.registry.place_of(r)))
        with self.cond:
            self.cond.notify_all()

    # -- small helpers -----------------------------------------------------------------------------

    def _split_text(self, ranges: list, excluded: dict) -> str:
        parts = [f"rank 0 ({self.cluster.leader.host}) {layers_text(*ranges[0])}"]
        for r, w in self.workers.items():
            if r in self.gone:
                continue
            parts.append(f"rank {r} ({w.host}) " + (f"left out ({excluded[r]})" if excluded[r]
                                                    else layers_text(*ranges[r])))
        return ", ".join(parts)


def ring_text(stages: list) -> str:
    """The ring's worker stages (Registry.stages) in words, a split stage's members joined by +:
    [[1], [2]] -> "ring 0 -> 1 -> 2 -> 0"; [[1, 2]] -> "ring 0 -> 1+2 -> 0"; [] -> "rank 0 alone"."""
    return ("ring " + " -> ".join(["0"] + ["+".join(map(str, g)) for g in stages] + ["0"])
            if stages else "rank 0 alone")


def check_memory(shape, caps: list, ranges: list, sessions: int):
    """A split as configured (even, balanced) is not solved within memory: refuse one that gives a
    node more blocks than it has room for (its weights and KV cache at `sessions`), rather than have
    it die loading them. Node i (Capacity caps[i]) holds ranges[i]; rank 0 also the embeddings and head;
    a member of a split stage its share of every block (split_plan.member_fraction)."""
    from ..placement import max_blocks
    from .split_plan import member_fraction
    for i, (cap, (lo, hi)) in enumerate(zip(caps, ranges)):
        if cap is None or cap.memory_mb is None or hi == lo:
            continue
        group = group_of(ranges, i)
        share = 1.0 if len(group) == 1 else member_fraction(shape.n_head or max(1, shape.n_embd // 64), shape.n_embd,
                                                             group.index(i), len(group))
        room = max_blocks(shape, dataclasses.replace(cap, memory_mb=cap.memory_mb / share), rank0=i == 0,
                          sessions=sessions)
        if hi - lo > room:
            held = f"{hi - lo} blocks" if share == 1.0 else f"{share:.0%} of {hi - lo} blocks (a split stage's member)"
            raise ReplanFailed(f"{cap.name} would hold {held} ({layers_text(lo, hi)}), and its "
                               f"{cap.memory_mb:.0f} MB usable have room for {max(room, 0)}", retry=False)


def decide_over(planner, model, cluster, configured: list, caps: list, there: list) -> tuple:
    """(split_plan.decide_with_split's Decision, a note) over rank 0 and the workers `there`: the
    configured split when everyone is there, or it without those not there while it still holds
    every layer (`without`), else the even split over the rest, as the starting point."""
    from ..placement import PlacementError
    from .split_plan import decide_with_split
    everyone = len(there) == len(cluster.nodes) - 1
    kept = None if everyone else without(configured, there, planner.config.n_layer)
    try:
        asked = configured if everyone else kept or even(planner.config.n_layer, 1 + len(there))
        # the cluster's nodes by position in `caps`, for which members share a machine
        view = dataclasses.replace(cluster, nodes=tuple(cluster.nodes[r] for r in [0] + there))
        d = decide_with_split(planner.shape(), caps, asked, model, view, transit_ms=planner.transits())
    except (PlacementError, PartitionError) as e:
        raise ReplanFailed(str(e), retry=False) from None
    return d, (d.note if everyone or d.solved else
               "as configured, without the ranks not there (each of their layers is still held)" if kept else
               f"even over the {1 + len(there)} nodes there")


def without(configured: list, there: list, n_layer: int) -> list | None:
    """The configured split over rank 0 and the workers `there` (rank order), when it still holds
    every layer: a split stage that lost a member goes on with the others (one left: a plain stage
    of the whole blocks). None when a layer was held by ranks not there alone.

        without([(0, 1), (1, 5), (1, 5)], [1], 5) -> [(0, 1), (1, 5)]
        without([(0, 1), (1, 3), (3, 5)], [1], 5) -> None
    """
    kept = [tuple(configured[0])] + [tuple(configured[r]) for r in there]
    edges = sorted({r for r in kept if r[1] > r[0]})
    end = 0
    for lo, hi in edges:
        if lo > end:
            return None
        end = max(end, hi)
    return kept if end == n_layer else None


def _by_rank(p, ranks: list, n: int):
    """A prediction made over the nodes there (node i is rank ranks[i]) as one over all n configured
    ranks, those not there holding nothing (what stage_report and /metrics index by rank)."""
    if p is None:
        return None

    def spread(xs, empty):
        out = [empty] * n
        for i, r in enumerate(ranks):
            out[r] = xs[i]
        return out
    return dataclasses.replace(p, ranges=spread(p.ranges, (0, 0)), stage_s=spread(p.stage_s, 0.0),
                               stage8_s=spread(p.stage8_s, 0.0))


def back_from_gone(w, gone: dict):
    """w registers (again), under the registry's lock, before it is told its place. A rank that was
    gone (`gone`: rank -> why; drained, or down past its grace) still holds the plan's reason for
    leaving it out; it is back now, standing by until the re-plan Replanner.tick starts, and is told so."""
    why = gone.get(w.rank)
    if why is not None and w.excluded:
        w.excluded = f"back after it was {why}; the next re-plan places it"
