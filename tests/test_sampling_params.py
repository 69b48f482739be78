"""sampling_params.py owns what a request may ask of the sampler: the fields, their ranges, their
defaults and the strategy names. Everything that lists, sends or reads sampling settings takes them
from there, so a strategy registered in decoding.py can be named everywhere at once, model_config.yaml
included."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import yaml

from nanopipe.config import ConfigError, load_model_config
from nanopipe.decoding import draw, make_params, register, sample, softmax, unregister
from nanopipe.sampling_params import (
    DEFAULT_DECODING,
    FIELDS,
    STRATEGY_USES,
    DecodingError,
    SamplingParams,
    request_params,
    section_keys,
)

SHIPPED = Path(__file__).resolve().parent.parent / "configs"
ENTRY = {"hf_model_name": "x", "weights_model_name": "gpt2", "num_layers": 2, "num_nodes": 1}


def test_importing_it_needs_no_numpy():
    """config.py imports it on any node, before numpy may load: it must hold no numpy."""
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "numpy":
                    raise ImportError("numpy is blocked in this test")
        sys.meta_path.insert(0, Block())
        import nanopipe.config
        from nanopipe.sampling_params import request_params
        p = request_params(None, temperature=0.8, top_k=40, max_tokens=3)
        print(p.strategy, p.temperature, p.top_k, p.max_tokens, "numpy" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["top_k", "0.8", "40", "3", "False"]


def test_the_fields_are_samplingparams_fields():
    assert {"strategy", *FIELDS} == {f.name for f in fields(SamplingParams)}
    assert len(set(FIELDS)) == len(FIELDS)


@pytest.fixture
def min_p():
    """A strategy registered the way decoding.py's docstring shows, removed again afterwards."""
    @register("min_p", uses=("temperature", "top_p"))
    def fn(logits, rng, params):
        probs = softmax(logits, params.temperature)
        ids = np.flatnonzero(probs >= params.top_p * probs.max())
        return draw(ids, probs[ids], rng)
    yield "min_p"
    unregister("min_p")


def write_config(folder: Path, decoding: dict) -> Path:
    (folder / "model_config.yaml").write_text(yaml.safe_dump({"tiny": dict(ENTRY, **decoding)}))
    return folder


def test_a_registered_strategy_can_be_named_in_model_config(tmp_path, min_p):
    write_config(tmp_path, {"active_decoding_strategy": "min_p",
                            "decoding_strategies": {"greedy": {}, "min_p": {"temperature": 0.7, "p": 0.2}}})
    mc = load_model_config(str(tmp_path))
    assert mc.active_decoding_strategy == "min_p"
    params = make_params(mc.decoding_defaults())
    assert (params.strategy, params.temperature, params.top_p) == ("min_p", 0.7, 0.2)
    # it runs: among logits [2, 1, -5] only tokens with p >= 0.2 * p_max survive; -5 never comes
    logits = np.array([2.0, 1.0, -5.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert {sample(logits, params, rng) for _ in range(50)} <= {0, 1}
    # a section key for a knob the strategy does not read is refused, naming the ones it may hold
    write_config(tmp_path, {"active_decoding_strategy": "min_p", "decoding_strategies": {"min_p": {"k": 5}}})
    with pytest.raises(ConfigError, match=r"decoding_strategies.min_p: unknown key 'k'"):
        load_model_config(str(tmp_path))
    assert section_keys("min_p") == ("temperature", "p", "top_p")


def test_an_unregistered_strategy_is_refused_in_model_config(tmp_path):
    assert "min_p" not in STRATEGY_USES
    write_config(tmp_path, {"active_decoding_strategy": "min_p", "decoding_strategies": {"min_p": {}}})
    with pytest.raises(ConfigError, match=r"decoding_strategies: unknown strategy 'min_p'"):
        load_model_config(str(tmp_path))


def test_one_top_k_default_everywhere():
    """SamplingParams, an entry without decoding settings, the shipped file and `generate --help`."""
    from click.testing import CliRunner

    from nanopipe.tools.cli import main
    k = SamplingParams().top_k
    assert DEFAULT_DECODING["decoding_strategies"]["top_k"]["k"] == k
    shipped = yaml.safe_load((SHIPPED / "model_config.yaml").read_text())
    ks = {name: entry["decoding_strategies"]["top_k"].get("k") for name, entry in shipped.items()
          if isinstance(entry, dict) and "decoding_strategies" in entry}
    assert ks and set(ks.values()) == {k}, ks
    text = " ".join(CliRunner().invoke(main, ["generate", "--help"], terminal_width=200).output.split())
    # the help names where the default lives rather than a number that could drift from the file
    assert "--top-k INTEGER top_k: sample from the K likeliest. [default: the model's decoding defaults in " \
           "model_config.yaml]" in text, text


def test_every_route_and_the_wire_accept_every_field():
    from nanopipe.cluster.client_protocol import CLIENT_FIELDS
    from nanopipe.tools.cli import generate
    from nanopipe.web.chat import CHAT_FIELDS
    from nanopipe.web.openai import CHAT_COMPLETION_FIELDS, COMPLETION_FIELDS
    for known in (CLIENT_FIELDS, CHAT_FIELDS, COMPLETION_FIELDS, CHAT_COMPLETION_FIELDS):
        assert set(FIELDS) <= set(known), sorted(set(FIELDS) - set(known))
    assert {"strategy", *FIELDS} <= {p.name for p in generate.params}


def test_what_a_request_sends_resolves_to_the_same_params():
    """The sampling fields a client sends (sent_fields) mean the same params on the leader."""
    p = request_params(None, temperature=0.9, top_k=5, seed=3, stop=["x"], repetition_penalty=1.2,
                       logit_bias={"7": -100})
    assert request_params(None, **p.sent_fields()) == p


@pytest.mark.parametrize("value", ["x" * 100_000, list(range(50_000)), {"a": [[[1] * 1000] * 10]}],
                         ids=["long text", "long list", "nested"])
def test_a_bad_value_is_quoted_short_in_the_error(value):
    """A request may send anything, of any size: its error quotes the value cut short, never whole."""
    with pytest.raises(DecodingError) as e:
        request_params(DEFAULT_DECODING, temperature=value)
    assert "temperature" in str(e.value) and len(str(e.value)) < 300, str(e.value)[:400]
