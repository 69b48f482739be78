"""The cluster, end to end: real `nanopipe serve` / `nanopipe join` processes on 127.0.0.1.

Every test here compares the cluster with the single process. The claim under test is the one
nanopipe/engine.py makes: the ring is only a different place to run blocks[lo:hi], so

    cluster.generate(prompt, params)["token_ids"] == Engine.generate(prompt, params)["token_ids"]

token for token, for every split of the layers and every decoding strategy, while several clients
share the ring. The model is tiny and synthetic (7 layers, so 3 or 4 nodes split it unevenly);
a cluster starts in about a second, so each group of tests gets a fresh one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from helpers import run_nanopipe, status, wait_freed, wait_status, workers

from nanopipe.cluster.leader_client import ClientError
from nanopipe.decoding import SamplingParams
from nanopipe.engine import Engine
from nanopipe.tools.cli import main
from nanopipe.tools.localcluster import LocalCluster, write_configs
from nanopipe.weights import init_weights

SHAPE = dict(n_layer=7, n_embd=64, n_head=4, n_ctx=256)      # 7 layers: 3 nodes get 3,2,2; 4 nodes 2,2,2,1
PROMPT = [15496, 995, 11, 616]                                # "Hello world, my"
HEARTBEAT_S = 0.2                                             # workers report their caches this often
READY_S = 30                                                  # a cluster starts in ~1 s; fail well before 120 s

CASES = {
    "greedy": SamplingParams("greedy", max_tokens=12),
    "sampling": SamplingParams("sampling", temperature=0.8, max_tokens=12, seed=1),
    "top_k": SamplingParams("top_k", temperature=0.9, top_k=20, max_tokens=12, seed=2),
    "top_p": SamplingParams("top_p", temperature=0.8, top_p=0.9, max_tokens=12, seed=3),
}

# name -> LocalCluster arguments, and the layers [lo, hi) each rank must report holding
SPLITS = {      # the layers each node reports: [first, last], inclusive, as "0-3" is written
    "2 nodes 4,3": (dict(nodes=2), [[0, 3], [4, 6]]),
    "3 nodes 3,2,2": (dict(nodes=3), [[0, 2], [3, 4], [5, 6]]),
    "4 nodes 2,2,2,1": (dict(nodes=4), [[0, 1], [2, 3], [4, 5], [6, 6]]),
    "3 nodes mapping 1,4,2": (dict(nodes=3, layer_mapping={0: [0, 0], 1: [1, 4], 2: [5, 6]}),
                              [[0, 0], [1, 4], [5, 6]]),
}


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("cluster") / "tiny7.safetensors")
    init_weights(path, **SHAPE, seed=0)
    return path


@pytest.fixture(scope="module")
def reference(weights):
    """reference(prompt, params, **kw) -> the single-process result, computed once per question."""
    engine = Engine.load(weights)
    memo = {}

    def run(prompt, params, echo=False, top_logprobs=0):
        key = (tuple(prompt), params, echo, top_logprobs)
        if key not in memo:
            memo[key] = engine.generate(list(prompt), params, echo=echo, top_logprobs=top_logprobs)
        return memo[key]
    return run


@pytest.fixture(scope="module", params=list(SPLITS))
def split_cluster(request, weights):
    kwargs, layers = SPLITS[request.param]
    cl = LocalCluster(weights, ready_timeout=READY_S, **kwargs)
    cl.expected_layers = layers
    with cl:            # a start that fails raises with every node's log in the message
        yield cl


@pytest.fixture(scope="module")
def cluster(weights):
    """3 nodes with quick heartbeats, shared by the client, CLI, cache and bad-request tests."""
    with LocalCluster(weights, ready_timeout=READY_S, nodes=3, cluster_extra={"heartbeat_s": HEARTBEAT_S}) as cl:
        yield cl


def assert_same(got: dict, want: dict, what: str):
    """Token ids equal; logprobs within 1e-4 (the largest difference is in the message)."""
    assert got["token_ids"] == want["token_ids"], \
        f"{what}: cluster gave {got['token_ids']}, single process {want['token_ids']}"
    diff = float(np.max(np.abs(np.subtract(got["logprobs"], want["logprobs"]))))
    assert diff <= 1e-4, f"{what}: logprobs differ from the single process by up to {diff:.3g}"
    assert got["finish_reason"] == want["finish_reason"]


def concurrently(jobs: list, cl: LocalCluster) -> tuple:
    """Run each (prompt, params) on its own LeaderClient, all released at once.
    Returns (results, streamed token ids) in job order; re-raises the first error."""
    results, streams, errors = [None] * len(jobs), [None] * len(jobs), []
    barrier = threading.Barrier(len(jobs))

    def run(i, prompt, params):
        try:
            with cl.client() as c:
                seen = []
                barrier.wait(10)
                results[i] = c.generate(prompt, params, on_token=lambda t, _text: t is not None and seen.append(t))
                streams[i] = seen
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results, streams


# ---------------------------------------------------------------------------------------------
# the cluster's output is the single process's, for every split


def test_split_layers_as_planned(split_cluster):
    st = status(split_cluster)
    assert st["ready"]
    assert [n["layers"] for n in st["nodes"]] == split_cluster.expected_layers
    assert all(n["status"] == "up" for n in st["nodes"])


def test_every_node_reports_its_kernel_choice(split_cluster):
    """Each node decides once at start how `linear` runs a few rows; conftest pins it to 4 for every
    process (NANOPIPE_GEMV_ROWS), so each node must report 4 in /status and say so in its log."""
    st = wait_status(split_cluster, lambda st: all(n.get("gemv_rows") is not None for n in st["nodes"]), 10,
                    "every node's gemv_rows")
    assert [n["gemv_rows"] for n in st["nodes"]] == [4] * len(st["nodes"]), st["nodes"]
    logs = split_cluster.logs()
    assert logs.count("linear: a gemv per row for steps of 2-4 rows, one gemm above (pinned by "
                      "NANOPIPE_GEMV_ROWS)") == len(st["nodes"]), logs


@pytest.mark.parametrize("case", list(CASES))
def test_split_matches_single_process(split_cluster, reference, case):
    params = CASES[case]
    with split_cluster.client() as c:
        got = c.generate(PROMPT, params)
    assert_same(got, reference(PROMPT, params), f"{case} on {split_cluster.nodes} nodes")
    assert got["tokens_generated"] == params.max_tokens


def test_split_echo_and_top_logprobs(split_cluster, reference):
    """The prompt's own logprobs and the top-3 alternatives also come out as in one process."""
    params = CASES["greedy"]
    with split_cluster.client() as c:
        got = c.generate(PROMPT, params, echo=True, top_logprobs=3)
    want = reference(PROMPT, params, echo=True, top_logprobs=3)
    assert_same(got, want, "greedy with echo")
    assert len(got["prompt_logprobs"]) == len(PROMPT) - 1
    np.testing.assert_allclose(got["prompt_logprobs"], want["prompt_logprobs"], atol=1e-4, rtol=0)
    assert [[e["id"] for e in pos] for pos in got["top_logprobs"]] == \
           [[e["id"] for e in pos] for pos in want["top_logprobs"]]
    np.testing.assert_allclose([[e["logprob"] for e in pos] for pos in got["top_logprobs"]],
                               [[e["logprob"] for e in pos] for pos in want["top_logprobs"]], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# the CLI against a cluster


def test_cli_generate_leader_json_matches_single_process(cluster, weights):
    args = ["generate", "Hello world, my", "--json", "--config-dir", cluster.config_dir, "--weights", weights,
            "--strategy", "top_k", "--temperature", "0.9", "--top-k", "20", "--seed", "5", "--max-tokens", "10",
            "--echo", "--top-logprobs", "2"]
    runner = CliRunner()
    alone = runner.invoke(main, args)
    assert alone.exit_code == 0, alone.output
    remote = runner.invoke(main, args + ["--leader", cluster.leader_addr])
    assert remote.exit_code == 0, remote.output
    a, r = json.loads(alone.output), json.loads(remote.output)
    assert sorted(r) == sorted(a), f"keys differ: only alone {set(a) - set(r)}, only cluster {set(r) - set(a)}"
    assert r["token_ids"] == a["token_ids"] and len(a["token_ids"]) == 10
    assert r["text"] == a["text"] and r["prompt_ids"] == a["prompt_ids"] == PROMPT
    np.testing.assert_allclose(r["logprobs"], a["logprobs"], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# many clients at once


JOBS = [
    ([15496, 995], SamplingParams("greedy", max_tokens=14)),
    ([464, 2068, 7586, 21831], SamplingParams("sampling", temperature=1.0, max_tokens=10, seed=11)),
    ([40, 1101, 257], SamplingParams("top_k", temperature=0.7, top_k=5, max_tokens=16, seed=12)),
    ([2061, 318, 262, 3139, 286], SamplingParams("top_p", temperature=0.9, top_p=0.8, max_tokens=8, seed=13)),
    ([15496, 995], SamplingParams("sampling", temperature=1.2, max_tokens=12, seed=14)),   # same prompt as job 0
    ([1026] * 40, SamplingParams("greedy", max_tokens=6)),                                 # a longer prefill
]


def test_concurrent_clients_get_their_own_tokens(cluster, reference):
    """On one machine (all hosts 127.0.0.1) the default is one batch at a time holding every session."""
    results, streams = concurrently(JOBS, cluster)
    assert status(cluster)["max_batches_in_flight"] == 1
    for i, ((prompt, params), got) in enumerate(zip(JOBS, results)):
        assert_same(got, reference(prompt, params), f"client {i} ({params.strategy})")
        assert streams[i] == got["token_ids"], f"client {i} was streamed tokens that are not its own"
        assert got["prompt_ids"] == prompt
    assert len({r["session"] for r in results}) == len(JOBS)


def test_pipelined_batches_in_flight_give_each_client_its_own_answer(weights, reference):
    """pipeline_depth=3 (the default when the 3 nodes are 3 machines): the sessions are split into
    groups that are round the ring at the same time. Each client still gets exactly its own answer."""
    with LocalCluster(weights, ready_timeout=READY_S, nodes=3, cluster_extra={"pipeline_depth": 3}) as cl:
        results, streams = concurrently(JOBS, cl)
        in_flight = status(cl)["max_batches_in_flight"]
    assert in_flight > 1, "the groups never were round the ring at the same time"
    for i, ((prompt, params), got) in enumerate(zip(JOBS, results)):
        assert_same(got, reference(prompt, params), f"pipelined client {i} ({params.strategy})")
        assert streams[i] == got["token_ids"]


def test_bounded_sessions_queue_and_complete(weights, reference):
    """max_sessions=2: five requests at once, three wait their turn, all come out right."""
    seen_live = []
    with LocalCluster(weights, ready_timeout=READY_S, nodes=3, cluster_extra={"max_sessions": 2}) as cl:
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                seen_live.append(status(cl)["live_sessions"])
                stop.wait(0.01)                 # a sample every 10 ms until the jobs are done
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            jobs = JOBS[:5]
            results, _ = concurrently(jobs, cl)
        finally:
            stop.set()
            watcher.join(10)
        for i, ((prompt, params), got) in enumerate(zip(jobs, results)):
            assert_same(got, reference(prompt, params), f"queued client {i}")
    assert max(seen_live) <= 2, f"more than max_sessions=2 live at once: {max(seen_live)}"


# ---------------------------------------------------------------------------------------------
# caches are freed everywhere


def test_worker_caches_fill_then_free(cluster, reference):
    long = SamplingParams("greedy", max_tokens=200)
    before = {n["rank"]: n["compute_ms"] for n in workers(status(cluster))}
    box = {}

    def run():
        with cluster.client() as c:
            box["result"] = c.generate(PROMPT, long)
    t = threading.Thread(target=run)
    t.start()
    try:
        busy = wait_status(cluster, lambda st: all(n["sessions"] == st["prefix_kept"] + 1 and n["kv_cache_bytes"] > 0
                                                   for n in workers(st)),
                          10, "a cache on every worker during the generation")
    finally:
        t.join(60)
    assert busy["live_sessions"] == 1 and busy["kv_cache_bytes"] > 0
    assert_same(box["result"], reference(PROMPT, long), "long greedy")
    st = wait_freed(cluster)
    assert all(n["compute_ms"] > before[n["rank"]] for n in workers(st)), "the workers did no work"


def test_caches_freed_after_concurrent_generations(cluster):
    concurrently(JOBS[:4], cluster)
    wait_freed(cluster)


class _HangUp(Exception):
    """Raised from on_token: the client walks away after its first token, mid-generation."""


def test_client_disconnect_cancels_and_frees(cluster):
    max_tokens = 240
    before = status(cluster)["tokens"]
    c = cluster.client()

    def hang_up(tok, _text):
        raise _HangUp

    try:
        with pytest.raises(_HangUp):
            c.generate(PROMPT, SamplingParams("greedy", max_tokens=max_tokens), on_token=hang_up)
    finally:
        c.close()   # gone after the first TOKEN, mid-generation
    st = wait_freed(cluster)
    made = st["tokens"] - before
    assert 1 <= made < max_tokens, f"{made} tokens made for a client that left after 1 of {max_tokens}"


def test_stop_string_ends_the_session_and_frees_every_cache(cluster, reference):
    from nanopipe.tokenizer import get_tokenizer
    tok = get_tokenizer()
    full = reference(PROMPT, SamplingParams("greedy", max_tokens=40))
    assert full["finish_reason"] == "length", "the weights must not end on <|endoftext|> for this test"
    text = tok.decode(full["token_ids"])
    stop = next(s for s in (tok.decode(full["token_ids"][i:i + 2]) for i in range(3, 30))
                if s.strip() and "\ufffd" not in s)          # two tokens' text, from the 4th token on
    params = SamplingParams("greedy", max_tokens=40, stop=(stop,))
    before = status(cluster)["tokens"]
    pieces = []
    with cluster.client() as c:
        got = c.generate(PROMPT, params, on_token=lambda _t, piece: pieces.append(piece))
    assert_same(got, reference(PROMPT, params), "greedy with a stop string")
    assert got["finish_reason"] == "stop" and got["stop"] == stop
    assert got["text"] == "".join(pieces) == text[:text.index(stop)], "the stop string is never sent"
    assert len(got["token_ids"]) < 40
    st = wait_freed(cluster)            # the FREE went round at once: every stage holds no session
    assert st["tokens"] - before == len(got["token_ids"]), "tokens were made after the stop"


# ---------------------------------------------------------------------------------------------
# bad requests are refused, and the leader keeps serving


@pytest.mark.parametrize("prompt, fields, name", [
    (PROMPT, dict(strategy="sampling", temperature=0.0, max_tokens=5), "temperature"),
    ([], dict(strategy="greedy", max_tokens=5), "prompt"),
    ("", dict(strategy="greedy", max_tokens=5), "prompt"),
    ([15496, 50257], dict(strategy="greedy", max_tokens=5), "prompt token ids"),
    ([15496, -1], dict(strategy="greedy", max_tokens=5), "prompt token ids"),
    (PROMPT, dict(strategy="greedy", max_tokens=SHAPE["n_ctx"]), "max_tokens"),
    (PROMPT, dict(strategy="top_k", temperature=1.0, top_k=0, max_tokens=5), "top_k"),
    (PROMPT, dict(strategy="beam", max_tokens=5), "strategy"),
    (PROMPT, dict(strategy="greedy", top_k=40, max_tokens=5), "top_k"),
    (PROMPT, dict(max_tokens=5, stop=[""]), "stop"),
    (PROMPT, dict(max_tokens=5, logit_bias={"99999": 1}), "logit_bias"),
], ids=["temperature-0", "empty-ids", "empty-text", "id-too-big", "id-negative", "past-n_ctx", "top_k-0",
        "unknown-strategy", "greedy-with-top_k", "empty-stop", "bias-id-too-big"])
def test_bad_request_is_invalid_and_leader_keeps_serving(cluster, reference, prompt, fields, name):
    with cluster.client() as c:
        with pytest.raises(ClientError) as e:
            c.generate(prompt, **fields)
        assert e.value.kind == "invalid"
        assert name in str(e.value), f"the message should name {name!r}: {e.value}"
        assert e.value.field == name.split()[0], "the field travels on the error, not only in its text"
        got = c.generate(PROMPT, CASES["greedy"])       # the same connection still works
    assert_same(got, reference(PROMPT, CASES["greedy"]), "after a bad request")


# ---------------------------------------------------------------------------------------------
# a worker stays lean


PROBE = """
import atexit, json, os, sys
out = os.environ["NANOPIPE_PROBE_OUT"]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["nanopipe"] + sys.argv[1:]
from nanopipe.tools.cli import main
main()
"""


class ProbedCluster(LocalCluster):
    """Worker 1 runs `nanopipe join` inside PROBE, which writes sys.modules when the process exits."""

    def command(self, rank: int) -> list:
        cmd = super().command(rank)
        return cmd if rank == 0 else [sys.executable, "-c", PROBE] + cmd[3:]


def test_worker_never_imports_tiktoken_flask_torch_or_prometheus(weights, reference, tmp_path):
    out = tmp_path / "modules.json"
    cl = ProbedCluster(weights, ready_timeout=READY_S, nodes=2, env={"NANOPIPE_PROBE_OUT": str(out)})
    with cl:
        with cl.client() as c:
            got = c.generate(PROMPT, CASES["top_p"])
        assert_same(got, reference(PROMPT, CASES["top_p"]), "through the probed worker")
        wait_status(cl, lambda st: workers(st)[0]["compute_ms"] > 0, 5, "worker 1 reporting the work it did")
        cl.kill_rank(1, signal.SIGTERM)          # a clean exit runs the probe's atexit
        assert cl.procs[1].returncode == 0, cl.logs()
    modules = json.loads(out.read_text())
    assert "nanopipe.cluster.worker" in modules and "numpy" in modules       # the dump is the worker's
    heavy = sorted(m for m in modules if m.split(".")[0] in ("tiktoken", "flask", "torch", "prometheus_client"))
    assert heavy == [], f"a worker imported {heavy}"


# ---------------------------------------------------------------------------------------------
# bad configurations refused at start (`nanopipe plan` on the shipped configs: test_cli_engine.py)


@pytest.fixture
def config_dir(tmp_path, weights) -> str:
    """A valid 3-node config folder (nothing runs on it)."""
    d = str(tmp_path / "configs")
    write_configs(d, weights=weights, nodes=3, n_layer=SHAPE["n_layer"])
    return d


def edit_yaml(path: str, change):
    with open(path) as f:
        data = yaml.safe_load(f)
    change(data)
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def assert_refused(proc: subprocess.CompletedProcess, *needles):
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"should have failed:\n{out}"
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, f"{needle!r} missing from:\n{out}"


def test_join_unknown_host_refused(config_dir, weights):
    proc = run_nanopipe("join", "--rank", "1", "--host", "nosuchhost", "--config-dir", config_dir, "--weights", weights)
    assert_refused(proc, "nosuchhost", os.path.join(config_dir, "cluster_config.yaml"))


def test_join_unknown_rank_refused(config_dir, weights):
    proc = run_nanopipe("join", "--rank", "9", "--host", "node1", "--config-dir", config_dir, "--weights", weights)
    assert_refused(proc, "rank 9", "cluster_config.yaml")


def test_two_ranks_on_one_port_refused(config_dir, weights):
    path = os.path.join(config_dir, "cluster_config.yaml")
    edit_yaml(path, lambda c: c["workers"][1].update(port=c["workers"][0]["port"]))
    proc = run_nanopipe("serve", "--rank", "0", "--config-dir", config_dir, "--weights", weights)
    assert_refused(proc, path, "ranks 1 and 2", "both listen on")


def test_num_nodes_disagreeing_with_cluster_refused(config_dir, weights):
    edit_yaml(os.path.join(config_dir, "model_config.yaml"), lambda m: m["models"]["local"].update(num_nodes=2))
    proc = run_nanopipe("serve", "--rank", "0", "--config-dir", config_dir, "--weights", weights)
    assert_refused(proc, "num_nodes=2", "3 nodes")


def test_worker_with_other_model_size_exits_and_leader_carries_on(weights, reference, tmp_path):
    other = str(tmp_path / "wide.safetensors")
    init_weights(other, **dict(SHAPE, n_embd=32), seed=0)
    cl = LocalCluster(weights, ready_timeout=READY_S, nodes=2)
    try:
        cl.start_rank(0)
        cl.wait_leader(30)
        assert not status(cl)["ready"], "no worker yet, yet the leader says ready"
        bad = run_nanopipe("join", "--rank", "1", "--host", "node1", "--config-dir", cl.config_dir, "--weights", other,
                      cwd=cl.workdir)
        assert_refused(bad, other, "n_embd=32", "n_embd=64")
        assert cl.procs[0].poll() is None, f"the leader died:\n{cl.logs()}"
        cl.start_rank(1)                        # the right weights this time
        cl.wait_ready(30)
        with cl.client() as c:
            got = c.generate(PROMPT, CASES["sampling"])
        assert_same(got, reference(PROMPT, CASES["sampling"]), "after the bad worker left")
    finally:
        cl.stop()


def test_every_rank_inherits_the_blas_kernel_setting(cluster):
    """.ci/blas-kernels reruns these tests under OPENBLAS_CORETYPE=Haswell, Zen, SkylakeX: every
    rank must run the kernel the single process it is compared with runs, or cluster == one
    process would compare two kernels' roundings. (With the variable unset, all agree it is unset.)"""
    if not os.path.exists(f"/proc/{os.getpid()}/environ"):
        pytest.skip("reads /proc/<pid>/environ, which only Linux has")
    for rank, proc in cluster.procs.items():
        with open(f"/proc/{proc.pid}/environ", "rb") as f:
            env = dict(kv.split("=", 1) for kv in f.read().decode(errors="replace").split("\0") if "=" in kv)
        assert env.get("OPENBLAS_CORETYPE") == os.environ.get("OPENBLAS_CORETYPE"), f"rank {rank}"
