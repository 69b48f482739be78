"""A split stage in a real cluster: workers given the very same layers share every block by heads.

Real `nanopipe serve` / `join` processes on 127.0.0.1 (LocalCluster), each cluster mixing a split
stage with plain ones, compared with one process (Engine). The members add their partial sums in
another order than one process's single matmul, so logprobs compare within a tolerance (the largest
difference is in the message); the tokens, greedy and seeded, must be the very same.

The weights have 4 heads, so 3 members hold 2, 1 and 1 heads (uneven), and their biases and
LayerNorm gains are made to count (init_weights writes zeros and ones, which would hide a c_proj
bias added by every member instead of once), and the block matrices scaled up so that greedy
decoding picks a different token at most steps (a repeated token would hide a wrong answer).
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from helpers import handshake, log_of, read_tensors, status, wait_log, wait_until, worker_addr

from nanopipe.cluster.wire import Msg
from nanopipe.decoding import SamplingParams
from nanopipe.engine import Engine
from nanopipe.safetensors_io import read_header, write_safetensors
from nanopipe.tools.localcluster import LocalCluster
from nanopipe.weights import init_weights

SHAPE = dict(n_layer=5, n_embd=64, n_head=4, n_ctx=256)
PROMPT = [15496, 995, 11, 616]
READY_S = 60
LOGPROB_TOL = 1e-4
LONG = SamplingParams("greedy", max_tokens=40)

CASES = {
    "greedy": SamplingParams("greedy", max_tokens=12),
    "sampling": SamplingParams("sampling", temperature=0.8, max_tokens=12, seed=1),
    "top_k": SamplingParams("top_k", temperature=0.9, top_k=20, max_tokens=12, seed=2),
}

# name -> layer_mapping (inclusive), and the stages the leader's log must show
SPLITS = {
    "2 members between plain stages": ({0: [0, 0], 1: [1, 3], 2: [1, 3], 3: [4, 4]}, "ring 0 -> 1+2 -> 3 -> 0"),
    "3 members, uneven heads": ({0: [0, 0], 1: [1, 3], 2: [1, 3], 3: [1, 3], 4: [4, 4]},
                                "ring 0 -> 1+2+3 -> 4 -> 0"),
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    return lively_weights(str(tmp_path_factory.mktemp("splitcluster") / "tiny5.safetensors"))


def lively_weights(path: str) -> str:
    """SHAPE's synthetic weights at `path`, biases and gains made to count and the blocks scaled up,
    so that greedy decoding picks a different token at most steps (a wrong split cannot hide)."""
    init_weights(path, **SHAPE, seed=0)
    raw = read_tensors(path)
    rng = np.random.default_rng(5)
    for name, arr in raw.items():
        if name.startswith("h.") and name.endswith((".bias", "ln_1.weight", "ln_2.weight")) \
                and not name.endswith("attn.bias"):                   # attn.bias: the causal-mask buffer
            arr += rng.standard_normal(arr.shape).astype(np.float32) * np.float32(0.1)
        if name.startswith("h.") and name.endswith(".weight") and arr.ndim == 2:
            arr *= np.float32(8)        # the blocks matter: greedy then picks different tokens, not one repeated
    write_safetensors(path, raw, read_header(path).metadata)
    return path


@pytest.fixture(scope="module")
def reference(weights):
    engine = Engine.load(weights)
    memo = {}

    def run(prompt, params):
        key = (tuple(prompt), params)
        if key not in memo:
            memo[key] = engine.generate(list(prompt), params)
        return memo[key]
    return run


def assert_same(got: dict, want: dict, what: str):
    assert got["token_ids"] == want["token_ids"], \
        f"{what}: the split cluster gave {got['token_ids']}, one process {want['token_ids']}"
    diff = float(np.max(np.abs(np.subtract(got["logprobs"], want["logprobs"]))))
    assert diff <= LOGPROB_TOL, f"{what}: logprobs differ from one process by up to {diff:.3g}"
    print(f"{what}: tokens equal, logprobs within {diff:.3g} of one process")


@pytest.fixture(scope="module", params=list(SPLITS))
def split_cluster(request, weights):
    mapping, path = SPLITS[request.param]
    cl = LocalCluster(weights, nodes=len(mapping), layer_mapping=mapping, ready_timeout=READY_S,
                      cluster_extra={"heartbeat_s": 0.2})
    cl.ring_path = path
    with cl:
        yield cl


def test_the_status_says_which_heads_each_member_holds(split_cluster):
    """What the cluster page shows of a split stage: each member's heads ([first, last] of the 4),
    the uneven split giving the first member the extra head; a plain stage has none."""
    heads = {n["rank"]: n["heads"] for n in status(split_cluster)["nodes"] if n["rank"] > 0}
    members = len(split_cluster.ring_path.split("+")) if "+" in split_cluster.ring_path else 1
    want = {2: {1: [0, 1], 2: [2, 3], 3: None}, 3: {1: [0, 1], 2: [2, 2], 3: [3, 3], 4: None}}[members]
    assert heads == want, heads


def test_the_status_says_the_split_is_the_layer_mapping(split_cluster):
    """`plan --from-cluster` and the page print the leader's plan: a layer_mapping is what placed it."""
    assert status(split_cluster)["placement"]["partition"] == "layer_mapping"


def test_a_member_loads_only_its_share_never_the_whole_blocks_first(split_cluster):
    """A worker whose configs make it a member loads its part of the blocks before it dials the
    leader, as a plain worker loads its blocks: its memory never holds the whole blocks."""
    ranks = [n["rank"] for n in status(split_cluster)["nodes"] if n.get("heads")]
    assert len(ranks) >= 2, ranks
    for r in ranks:
        loads = [ln for ln in log_of(split_cluster, r).splitlines() if f"layers for worker {r} (" in ln]
        assert loads and all(" member " in ln for ln in loads), (r, loads)


@pytest.mark.parametrize("case", list(CASES))
def test_split_stage_gives_the_tokens_of_one_process(split_cluster, reference, case):
    with split_cluster.client() as c:
        got = c.generate(PROMPT, CASES[case])
    assert_same(got, reference(PROMPT, CASES[case]), case)
    log = log_of(split_cluster, 0)
    assert split_cluster.ring_path in log, f"the leader's log does not show {split_cluster.ring_path!r}:\n{log[-2000:]}"


def test_reference_tokens_vary(reference):
    """The fixture's point: greedy must not repeat one token, or equality would prove little."""
    ids = reference(PROMPT, CASES["greedy"])["token_ids"]
    assert len(set(ids)) >= 6, ids


def test_batched_sessions_through_the_split_stage(split_cluster, reference):
    """Several clients at once: the scheduler batches their rows, the members exchange all of a
    step's rows in one PARTIAL per c_proj, and each answer is its own one-process answer."""
    jobs = [(PROMPT, CASES["greedy"]), ([464, 2068, 7586], CASES["sampling"]),
            ([40, 1101, 257, 2746, 286], CASES["top_k"]), (PROMPT[:2], SamplingParams("greedy", max_tokens=9))]
    results, errors = [None] * len(jobs), []

    def run(i, prompt, params):
        try:
            with split_cluster.client() as c:
                results[i] = c.generate(prompt, params)
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for (prompt, params), got in zip(jobs, results):
        assert_same(got, reference(prompt, params), f"batched {params.strategy} {prompt}")
    assert status(split_cluster)["max_live_sessions"] >= 2, "the answers never shared a step"


def test_prefix_reuse_through_the_split_stage(split_cluster, reference):
    """A second turn reuses the kept caches of every stage, the members' too (they fork what member
    0 is told to fork), and answers as one process computing the whole prompt."""
    first = [11, 22, 33] + PROMPT
    with split_cluster.client() as c:
        one = c.generate(first, CASES["greedy"])
        second = first + one["token_ids"] + [13, 198]
        two = c.generate(second, CASES["greedy"])
    assert_same(one, reference(first, CASES["greedy"]), "turn 1")
    assert_same(two, reference(second, CASES["greedy"]), "turn 2")
    assert two["cached_tokens"] > 0, two


def test_stop_sequence_ends_the_answer_and_the_members_free_it(split_cluster, reference):
    with split_cluster.client() as c:
        full = c.generate(PROMPT, CASES["greedy"])
        stop = full["text"][len(full["text"]) // 2:][:3]
        got = c.generate(PROMPT, CASES["greedy"], stop=[stop])
    assert got["finish_reason"] == "stop", got
    assert stop not in got["text"] and full["text"].startswith(got["text"]), (stop, got["text"], full["text"])
    n = len(got["token_ids"])
    assert 0 < n < len(full["token_ids"]) and got["token_ids"] == full["token_ids"][:n]
    # every member drops the finished sessions as member 0 does (the kept prefixes aside)
    def agree():
        st = status(split_cluster)
        counts = [n["sessions"] for n in st["nodes"] if n["rank"] > 0]
        return st["live_sessions"] == 0 and len(set(counts)) == 1 and counts[0] == st["prefix_kept"]
    time.sleep(0.6)
    wait_until("every worker holds the caches the leader keeps", agree, 10, 0.1,
               detail=lambda: status(split_cluster)["nodes"])


@pytest.mark.parametrize("victim", [2, 1], ids=["the second member", "the first member (the ring's hop)"])
def test_a_member_killed_mid_answer_rejoins_and_the_answer_is_unchanged(weights, reference, tmp_path, victim):
    """Kill a member of the split stage while an answer streams: the whole stage drops out of the
    ring, the answer waits; the member restarts, the ring (and the member links) are rebuilt, the
    session is replayed, and the answer is one process's."""
    mapping = {0: [0, 0], 1: [1, 3], 2: [1, 3], 3: [4, 4]}
    cl = LocalCluster(weights, nodes=4, layer_mapping=mapping, workdir=str(tmp_path), ready_timeout=READY_S,
                      cluster_extra={"heartbeat_s": 0.2, "rejoin_grace_s": 60, "link_delay_ms": 15})
    with cl:
        kill_member_mid_answer(cl, victim, reference)
        log = log_of(cl, 0)
        assert "replaying 1 interrupted session" in log, log[-3000:]


def test_a_replan_names_the_split_stage_in_the_ring(weights, tmp_path):
    """Drain a member (the leader re-plans over two), bring it back (the layer_mapping's split stage
    again): the re-plan's line names the ring as the ring-up line does, 0 -> 1+2 -> 0."""
    mapping = {0: [0, 0], 1: [1, 4], 2: [1, 4]}
    cl = LocalCluster(weights, nodes=3, layer_mapping=mapping, workdir=str(tmp_path), ready_timeout=READY_S,
                      cluster_extra={"heartbeat_s": 0.2})
    with cl:
        left = subprocess.run([sys.executable, "-m", "nanopipe", "leave", "--rank", "2", "--config-dir",
                               cl.config_dir], capture_output=True, text=True, timeout=300, env=cl.env)
        assert left.returncode == 0, (left.stdout, left.stderr)
        wait_until("the drained member to stop", lambda: cl.procs[2].poll() is not None, timeout=READY_S)
        cl.start_rank(2)
        wait_log(cl, 0, "Re-planned (rank 2 (node2) joined)", timeout=READY_S)
        line = [ln for ln in log_of(cl, 0).splitlines() if "Re-planned (rank 2 (node2) joined)" in ln][0]
        assert line.endswith("ring 0 -> 1+2 -> 0"), line


def test_member_links_use_the_clusters_secret(weights, reference, tmp_path):
    """With auth_token set the members link up through the same HMAC handshake as every other link,
    and the answer is one process's; a stranger without the token, or a rank that is not a later
    member of the stage, cannot open a member link to member 0."""
    mapping = {0: [0, 1], 1: [2, 4], 2: [2, 4]}
    cl = LocalCluster(weights, nodes=3, layer_mapping=mapping, workdir=str(tmp_path), ready_timeout=READY_S,
                      cluster_extra={"auth_token": "s3cret", "heartbeat_s": 0.2})
    with cl:
        with cl.client() as c:
            assert_same(c.generate(PROMPT, CASES["greedy"]), reference(PROMPT, CASES["greedy"]), "with a token")
        addr = worker_addr(cl, 1)
        sock, _, reply = handshake(addr, token="wrong", role="member", rank=2, extra={"epoch": 1})
        sock.close()
        assert reply.msg is Msg.REJECT, reply
        sock, _, reply = handshake(addr, token="s3cret", role="member", rank=0, extra={"epoch": 1})
        assert reply.msg is Msg.REJECT and "later members" in reply.meta.get("reason", ""), reply
        sock.close()
        wait_log(cl, 1, "Rejected a member link", timeout=10)
        with cl.client() as c:          # the stage still answers
            assert_same(c.generate(PROMPT, CASES["sampling"]), reference(PROMPT, CASES["sampling"]), "after")


def test_member_links_over_tls(weights, reference, tmp_path):
    """tls_cert/tls_key: member links are TLS like every link (net.TLSStream, which a member's sender
    thread and its reader share); two long prompts at once send partials of up to 400 rows (over
    the size a member sends inline, so the sender thread carries them)."""
    from helpers import self_signed_cert
    cert, key = self_signed_cert(str(tmp_path))
    mapping = {0: [0, 1], 1: [2, 4], 2: [2, 4]}
    cl = LocalCluster(weights, nodes=3, layer_mapping=mapping, workdir=str(tmp_path / "cl"), ready_timeout=READY_S,
                      cluster_extra={"tls_cert": cert, "tls_key": key, "heartbeat_s": 0.2})
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50000, 200).tolist() for _ in range(2)]
    params = SamplingParams("greedy", max_tokens=4)
    with cl:
        results, errors = [None, None], []

        def run(i):
            try:
                with cl.client() as c:
                    results[i] = c.generate(prompts[i], params)
            except Exception as e:
                errors.append(e)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
    for i in range(2):
        assert_same(results[i], reference(prompts[i], params), f"TLS, 200-token prompt {i}")


def kill_member_mid_answer(cl, victim: int, reference):
    """Kill split-stage member `victim` (SIGKILL) at the answer's 5th token, check the answer waits,
    restart it, and check the answer then completes as one process's (the session replayed)."""
    box, seen, killed = {}, [], threading.Event()

    def on_token(t, _text):
        if t is not None:
            seen.append(t)
            if len(seen) == 5:
                cl.kill_rank(victim, signal.SIGKILL)
                killed.set()

    def run():
        try:
            with cl.client(timeout=120) as c:
                box["result"] = c.generate(PROMPT, LONG, on_token=on_token)
        except Exception as e:
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert killed.wait(60), "the answer never reached 5 tokens"
    wait_log(cl, 0, f"Worker {victim} is down", timeout=10)
    assert "result" not in box, "the answer finished without the killed member"
    cl.start_rank(victim)
    t.join(120)
    assert not t.is_alive(), "the answer hung after the member came back"
    assert "error" not in box, box.get("error")
    assert_same(box["result"], reference(PROMPT, LONG), "after a member died and came back")
