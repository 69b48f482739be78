"""Shared fixtures: synthetic GPT-2 weights written once per test session.

    tiny_weights   4 layers, n_embd 64, 4 heads, n_ctx 128, the real 50257-token vocabulary (~14 MB):
                   small enough for every unit test, real enough to run the tokenizer's ids
    small_weights  gpt2-small's exact shapes (~550 MB, a few seconds to write): for tests marked slow
    tiny_engine    one Engine on tiny_weights, shared by every test that only generates with it
    cluster        3 real nodes (`nanopipe serve` + 2 `nanopipe join`) on tiny_weights, one per test
                   module; a module that needs other settings defines its own `cluster`
    leader, app, client   the web app on a fake leader (helpers.FakeLeader, checked against the real
                   LeaderClient): scripted tokens, no processes; a module may define its own

Helpers the test files share (polling, cluster status, logs, ports, certificates) are in helpers.py.
"""
from __future__ import annotations

import os

import pytest

from nanopipe.model import GPTConfig
from nanopipe.weights import init_weights

# Every test process and every node a test starts (they inherit the environment) runs a step of 2-4
# rows as one gemv per row and more as one gemm (model.linear): pinned rather than measured, so the
# kernels and hence the exact floats never depend on how loaded the machine was at start.
os.environ.setdefault("NANOPIPE_GEMV_ROWS", "4")
# and a lone prompt prefills up to 96 rows a step (batching.Batcher._grow_chunks), 64 with company
os.environ.setdefault("NANOPIPE_PREFILL_ROWS", "96")
# and the LM head takes 2-4 rows through wte in slices (model.head), more as one gemm
os.environ.setdefault("NANOPIPE_HEAD_ROWS", "4")
# and the loader keeps block matrices column-major and wte as stored (kernels.choose_layout)
os.environ.setdefault("NANOPIPE_BLOCK_ORDER", "F")
os.environ.setdefault("NANOPIPE_HEAD_ORDER", "C")

TINY = GPTConfig(n_layer=4, n_embd=64, n_head=4, n_ctx=128, n_vocab=50257)


@pytest.fixture(scope="session")
def tiny_config() -> GPTConfig:
    """The shape of tiny_weights."""
    return TINY


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    init_weights(str(path), n_layer=TINY.n_layer, n_embd=TINY.n_embd, n_head=TINY.n_head, n_ctx=TINY.n_ctx,
                 n_vocab=TINY.n_vocab, seed=0)
    return str(path)


@pytest.fixture(scope="session")
def small_weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("small") / "gpt2-small.safetensors"
    init_weights(str(path), size="gpt2", seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_engine(tiny_weights):
    """One Engine on the tiny weights; tests only generate with it, never change its weights."""
    from nanopipe.engine import Engine
    return Engine.load(tiny_weights)


@pytest.fixture(scope="module")
def cluster(tiny_weights):
    """A LocalCluster of 3 nodes on tiny_weights, up until the module's last test has run."""
    from nanopipe.tools.localcluster import LocalCluster
    with LocalCluster(tiny_weights, nodes=3, ready_timeout=60) as cl:
        yield cl


# The web app against a fake leader (helpers.FakeLeader): no processes, every error path scriptable.

@pytest.fixture
def leader():
    """A FakeLeader: the cluster behind the web app's CLIENT_FACTORY, scripted."""
    from helpers import FakeLeader
    return FakeLeader()


@pytest.fixture
def app(leader):
    """The web app with `leader` as its cluster."""
    from helpers import DEFAULTS

    from nanopipe.web.app import create_app
    return create_app({"TESTING": True, "CLIENT_FACTORY": leader.connect, "LEADER": "10.0.0.1:65432",
                       "MODEL_NAME": "gpt2", "MODEL_DEFAULTS": DEFAULTS})


@pytest.fixture
def client(app):
    """A Flask test client of `app`."""
    return app.test_client()
