"""A split stage whose plan gives it the LM head, with a member that holds no share of the head.

A member runs its rows of the vocabulary from its own weights file (weights.load_head_share). One
given a file of blocks only (`nanopipe pull --layers` writes one: no wte, no ln_f) cannot: it says
why in its READY, and the leader then runs the head on rank 0 and says so everywhere: the status's
`lm_head_ranks` ([0], what GET /cluster and `plan --from-cluster` show), `lm_head_missing` (who,
and why), one warning in the leader's log saying what to do, and a ring that asks the stage for no
logits (so the member that holds its share spends no time on it either). The answers stay one
process's.

Real `nanopipe serve` / `join` processes (LocalCluster), rank 2 started on a blocks-only file.
"""
from __future__ import annotations

import logging
import sys
import threading
import time

import pytest
import test_split_cluster as plain
from click.testing import CliRunner
from helpers import log_of, node, status, wait_log, wait_status, wait_until
from test_split_cluster import CASES, PROMPT, READY_S, assert_same

from nanopipe import gpt2_tensors as gt
from nanopipe.cluster.registry import WorkerRegistry
from nanopipe.cluster.wire import MISSING_WHY_CHARS, Frame, Msg, read_ready, ready
from nanopipe.config import load_cluster_config
from nanopipe.model import GPTConfig
from nanopipe.safetensors_io import read_header, read_tensor, write_safetensors
from nanopipe.tools.cli import main
from nanopipe.tools.localcluster import LocalCluster
from nanopipe.weights import slice_metadata

weights, reference = plain.weights, plain.reference
MAPPING = {0: [0, 0], 1: [1, 4], 2: [1, 4]}
SAID = "Member rank 2 of the split stage holds no share of the LM head ("


def blocks_only(src: str, path: str, lo: int, hi: int) -> str:
    """Blocks lo..hi-1 of `src` alone, as `nanopipe pull --layers` writes them: no wte, wpe, ln_f."""
    header = read_header(src)
    with open(src, "rb") as f:
        tensors = {n: read_tensor(f, t) for n, t in header.tensors.items() if gt.stage_needs(n, lo, hi, rank0=False)}
    assert not any("wte" in n or "ln_f" in n for n in tensors)
    write_safetensors(path, tensors, slice_metadata(header, "test", lo, hi))
    return path


class SliceFor(LocalCluster):
    """A LocalCluster whose rank `rank` is started on another weights file (`--weights path`)."""

    def __init__(self, *args, files: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.files = files

    def command(self, rank: int) -> list:
        argv = super().command(rank)
        if rank in self.files:
            argv[argv.index("--weights") + 1] = self.files[rank]
        return argv


def test_a_member_without_wte_leaves_the_head_on_rank_0_and_the_cluster_says_so(weights, reference, tmp_path):
    slice_file = blocks_only(weights, str(tmp_path / "tiny5-1-4.safetensors"), 1, 5)
    cl = SliceFor(weights, nodes=3, layer_mapping=MAPPING, workdir=str(tmp_path / "cluster"), ready_timeout=READY_S,
                  cluster_extra={"heartbeat_s": 0.2, "rejoin_grace_s": 60}, files={2: slice_file})
    with cl:
        wait_log(cl, 1, "Loaded the LM head's rows 0-25128 of 50257")     # rank 1's file has the head
        with cl.client() as c:
            for case in ("greedy", "sampling"):
                assert_same(c.generate(PROMPT, CASES[case]), reference(PROMPT, CASES[case]), case)
        time.sleep(0.6)                     # the next heartbeats carry what the members did
        st = status(cl)
        assert st["placement"]["lm_head_ranks"] == [0], st["placement"]
        # the ring asked the stage for no logits: the member that holds its share never ran it
        assert node(st, 1)["head_ms"] in (None, 0.0) and node(st, 2)["head_ms"] is None, st["nodes"]
        assert not node(st, 1)["logits_frames"] and not node(st, 1)["top_frames"], node(st, 1)
        missing = st["placement"]["lm_head_missing"]
        assert [m["rank"] for m in missing] == [2] and "has no wte" in missing[0]["why"], missing
        wait_log(cl, 2, "Cannot run a share of the LM head (", "has no wte", "rank 0 runs the head")
        line = wait_log(cl, 0, SAID)
        print(line)
        assert "has no wte: it holds blocks only (as `nanopipe pull --layers` writes)" in line, line
        assert "the LM head runs on rank 0" in line and "split_lm_head: false" in line, line
        assert "`nanopipe pull` without --layers" in line, line

        out = CliRunner().invoke(main, ["plan", "--from-cluster", cl.leader_addr, "--config-dir", cl.config_dir])
        assert out.exit_code == 0 and "LM head: on rank 0 (node0): member rank 2 holds no share (" in out.output \
            and "has no wte" in out.output, out.output

        # the member comes back with the same file: the head stays on rank 0, said once only
        cl.kill_rank(2)
        wait_log(cl, 0, "Worker 2 is down", timeout=10)
        cl.start_rank(2)
        wait_until("rank 2 ready again", lambda: log_of(cl, 0).count("Worker 2 ready") == 2, READY_S, detail=cl.logs)
        st = wait_status(cl, lambda st: st["ready"], READY_S, "the ring rebuilt with rank 2 back")
        assert st["placement"]["lm_head_ranks"] == [0], st["placement"]
        with cl.client() as c:
            assert_same(c.generate(PROMPT, CASES["greedy"]), reference(PROMPT, CASES["greedy"]), "after the rejoin")
        assert log_of(cl, 0).count(SAID) == 1, "the same reason was logged again"


# A leader from before READY carried `lm_head_missing` (37d88f5) never read it: the same leader with
# its READY reader made to drop the field, started as `nanopipe serve` is (the CLI's main)
OLDER_LEADER = ("import nanopipe.cluster.registry as r; said = r.read_ready; "
                "r.read_ready = lambda frame: dict(said(frame), lm_head_missing=None); "
                "from nanopipe.tools.cli import main; main(prog_name='nanopipe')")


class OlderLeader(SliceFor):
    def command(self, rank: int) -> list:
        argv = super().command(rank)
        return [sys.executable, "-c", OLDER_LEADER] + argv[3:] if rank == 0 else argv     # argv[:3]: python -m nanopipe


def test_a_leader_that_ignores_the_field_still_gets_one_process_answers(weights, reference, tmp_path):
    """Mixed versions: a leader that does not know READY's lm_head_missing keeps asking the split
    stage for logits. Member 0 then finds a member without its share, passes the rows on instead
    (data_path.head_step) and rank 0 runs the head: one process's answers all the same. What such a
    leader cannot do is say so: it reports the head on the members, wrongly."""
    slice_file = blocks_only(weights, str(tmp_path / "tiny5-1-4.safetensors"), 1, 5)
    cl = OlderLeader(weights, nodes=3, layer_mapping=MAPPING, workdir=str(tmp_path / "cluster"), ready_timeout=READY_S,
                     cluster_extra={"heartbeat_s": 0.2}, files={2: slice_file})
    with cl:
        wait_log(cl, 2, "Cannot run a share of the LM head (", "has no wte")
        with cl.client() as c:
            for case in ("greedy", "sampling"):
                assert_same(c.generate(PROMPT, CASES[case]), reference(PROMPT, CASES[case]), case)
        # the next heartbeats carry what the members did
        st = wait_status(cl, lambda st: node(st, 1)["head_ms"], 10, "rank 1's heartbeat with its head time")
        assert st["placement"]["lm_head_ranks"] == [1, 2] and not st["placement"].get("lm_head_missing"), \
            st["placement"]
        # it asked for logits: member 0 ran its share of the head each step, then passed the rows on
        assert node(st, 1)["head_ms"] and not node(st, 1)["logits_frames"] and not node(st, 1)["top_frames"], \
            node(st, 1)
        assert SAID not in log_of(cl, 0), "this leader never read why"


# ---------------------------------------------------------------------------------------------
# the pieces, in one process


def read(meta: dict) -> dict:
    return read_ready(Frame(Msg.READY, meta, b""))


def test_ready_carries_why_a_member_holds_no_share_of_the_head():
    msg, meta = ready(2, 7002, False, [1, 4], 0, lm_head_missing="its file has no wte")
    assert msg is Msg.READY and read(meta)["lm_head_missing"] == "its file has no wte"
    assert "lm_head_missing" not in ready(2, 7002, False, [1, 4], 0)[1], "nothing said when it holds its share"
    assert read(ready(2, 7002, False, [1, 4], 0)[1])["lm_head_missing"] is None
    # a reason that is not readable text: missing all the same, the reason unknown; a long one is cut
    for bad in (3, "", "two\nlines", ["x"]):
        assert read({"lm_head_missing": bad})["lm_head_missing"] == "it gave no readable reason", bad
    assert len(read({"lm_head_missing": "x" * 5000})["lm_head_missing"]) == MISSING_WHY_CHARS


def registry(split_lm_head: bool, ranges: list, log) -> WorkerRegistry:
    import dataclasses
    from pathlib import Path
    cc = load_cluster_config(str(Path(__file__).resolve().parent.parent / "configs"))
    nodes = tuple(dataclasses.replace(cc.nodes[0], rank=r, host=f"n{r}", ip=f"10.0.0.{r + 1}", port=7000 + r)
                  for r in range(len(ranges)))
    cc = dataclasses.replace(cc, split_lm_head=split_lm_head, nodes=nodes)
    return WorkerRegistry(cc, GPTConfig(n_layer=5, n_embd=64, n_head=4), ranges, threading.Lock(), log,
                          model_name="tiny")


@pytest.mark.parametrize("mapping_ranges", [[(0, 1), (1, 5), (1, 5)], [(0, 1), (1, 3), (3, 5), (3, 5)]],
                         ids=["2 members end the ring", "a plain stage, then 2 members"])
def test_the_registry_runs_the_head_on_rank_0_while_a_member_holds_no_share(mapping_ranges):
    logged = []
    reg = registry(True, mapping_ranges, lambda msg, level=logging.INFO: logged.append((level, msg)))
    last = reg.stages()[-1]
    assert reg.splits_head() and reg.head_missing() == {}
    said = {"synthetic": False, "prefix_cache_bytes": None}
    for r in last:
        reg._on_ready(reg.workers[r], {**said, "lm_head_missing": "its file has no wte" if r == last[-1] else None})
    assert not reg.splits_head() and reg.head_missing() == {last[-1]: "its file has no wte"}
    warnings = [m for level, m in logged if level == logging.WARNING]
    assert len(warnings) == 1 and f"Member rank {last[-1]} of the split stage" in warnings[0], logged
    assert all(reg.place_of(r)["group"]["head"] is True for r in last), "each member is still asked to try"
    reg._on_ready(reg.workers[last[-1]], {**said, "lm_head_missing": "its file has no wte"})      # it rejoined
    assert len([m for level, m in logged if level == logging.WARNING]) == 1, "said again for the same reason"
    reg._on_ready(reg.workers[last[-1]], {**said, "lm_head_missing": None})       # given the whole file
    assert reg.splits_head() and reg.head_missing() == {}
