"""The YAML configs: the shipped ones load, and every mistake is a ConfigError naming file and key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nanopipe.config import ConfigError, check_agree, load_cluster_config, load_model_config, load_weights_config

SHIPPED = Path(__file__).resolve().parent.parent / "configs"


def shipped(name: str) -> dict:
    return yaml.safe_load((SHIPPED / name).read_text())


def write(tmp_path, name: str, data) -> str:
    (tmp_path / name).write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return str(tmp_path / name)


# ---------------------------------------------------------------------------------------------
# the shipped configs


def test_shipped_model_config():
    mc = load_model_config(str(SHIPPED))
    assert (mc.name, mc.num_layers, mc.n_head, mc.num_nodes, mc.partition) == ("gpt2", 12, 12, 3, "even")
    assert mc.weights_model_name == "gpt2" and mc.max_new_tokens == 50
    d = mc.decoding_defaults()
    assert d["active_decoding_strategy"] == "top_p"
    assert d["decoding_strategies"]["top_p"] == {"temperature": 0.8, "p": 0.9}


@pytest.mark.parametrize("name, layers, heads", [("gpt2-medium", 24, 16), ("gpt2-large", 36, 20),
                                                 ("gpt2-xl", 48, 25)])
def test_shipped_model_config_other_sizes(name, layers, heads):
    mc = load_model_config(str(SHIPPED), name)
    assert (mc.num_layers, mc.n_head) == (layers, heads)


def test_shipped_cluster_config():
    cc = load_cluster_config(str(SHIPPED))
    assert cc.num_workers == 2
    assert [(n.rank, n.host, n.ip, n.port) for n in cc.nodes] == [
        (0, "mini1", "127.0.0.1", 65432), (1, "mini2", "127.0.0.1", 65433), (2, "pi1", "127.0.0.1", 65434)]
    assert cc.leader.host == "mini1" and cc.rank_of("pi1") == 2 and cc.node(1).host == "mini2"
    assert cc.max_sessions == 16


def test_shipped_weights_config():
    src = load_weights_config(str(SHIPPED), "gpt2")
    assert src.filename == "gpt2.safetensors" and src.url.endswith("/model.safetensors")
    for name in ("gpt2-medium", "gpt2-large", "gpt2-xl"):
        assert load_weights_config(str(SHIPPED), name).filename == f"{name}.safetensors"


def test_cluster_lookups_name_the_problem():
    cc = load_cluster_config(str(SHIPPED))
    with pytest.raises(ConfigError, match=r"no rank 5; ranks are 0\.\.2"):
        cc.node(5)
    with pytest.raises(ConfigError, match="host 'pi9' is not in host_ip/workers"):
        cc.rank_of("pi9")


# ---------------------------------------------------------------------------------------------
# mistakes in model_config.yaml


def _model(edit):
    def make():
        data = shipped("model_config.yaml")
        edit(data, data["gpt2"])
        return data
    return make


MODEL_MISTAKES = {
    "missing key": (_model(lambda d, m: m.pop("num_layers")), "missing key 'num_layers'"),
    "wrong type": (_model(lambda d, m: m.update(num_layers="twelve")), "key 'num_layers' must be int"),
    "bool is not int": (_model(lambda d, m: m.update(num_nodes=True)), "key 'num_nodes' must be int"),
    "unknown model": (_model(lambda d, m: d.update(default_model="gpt5")),
                      "default_model 'gpt5' is not one of the models"),
    "active strategy not listed": (_model(lambda d, m: m.update(active_decoding_strategy="beam")),
                                   "active_decoding_strategy 'beam'"),
    "strategy params not a mapping": (_model(lambda d, m: m["decoding_strategies"].update(top_k=5)),
                                      "decoding_strategies.top_k"),
    "zero nodes": (_model(lambda d, m: m.update(num_nodes=0)), "'num_nodes' must be >= 1"),
    "models not a mapping": (_model(lambda d, m: d.update(models=["gpt2"])), "key 'models' must be dict"),
}


@pytest.mark.parametrize("case", MODEL_MISTAKES)
def test_model_config_mistakes(tmp_path, case):
    make, match = MODEL_MISTAKES[case]
    path = write(tmp_path, "model_config.yaml", make())
    with pytest.raises(ConfigError, match=match) as e:
        load_model_config(str(tmp_path))
    assert str(e.value).startswith(path)


def test_model_config_unknown_model_lists_known_ones():
    with pytest.raises(ConfigError, match="no model 'gpt3'; known: gpt2, gpt2-medium"):
        load_model_config(str(SHIPPED), "gpt3")


# ---------------------------------------------------------------------------------------------
# mistakes in cluster_config.yaml


def _cluster(edit):
    def make():
        data = shipped("cluster_config.yaml")
        data["workers"] = [{"rank": r, "host": h} for r, h in enumerate(data["workers"], start=1)]  # the long form
        edit(data)
        return data
    return make


CLUSTER_MISTAKES = {
    "missing port": (_cluster(lambda d: d.pop("port")), "missing key 'port'"),
    "port not int": (_cluster(lambda d: d.update(port="65432")), "key 'port' must be int"),
    "unknown server host": (_cluster(lambda d: d.update(server="mini9")), "server names host 'mini9'"),
    "unknown worker host": (_cluster(lambda d: d["workers"][1].update(host="pi9")),
                            r"workers\[1\] names host 'pi9', which is not in host_ip"),
    "duplicate port": (_cluster(lambda d: d["workers"][0].update(port=65432)),
                       "ranks 0 and 1 both listen on 127.0.0.1:65432"),
    "num_workers mismatch": (_cluster(lambda d: d.update(num_workers=3)),
                             "num_workers is 3 but 'workers' lists 2"),
    "ranks not 1..N": (_cluster(lambda d: d["workers"][1].update(rank=3)),
                       r"worker ranks must be 1\.\.2, each once; got \[1, 3\]"),
    "rank repeated": (_cluster(lambda d: d["workers"][1].update(rank=1)), r"got \[1, 1\]"),
    "worker without host": (_cluster(lambda d: d["workers"][0].pop("host")), r"workers\[0\]: missing key 'host'"),
    "worker not a mapping": (_cluster(lambda d: d["workers"].__setitem__(0, 7)), r"workers\[0\]: expected"),
    "top level a list": (lambda: ["port", 1], "expected a mapping at the top level"),
    "a yes/no key quoted": (_cluster(lambda d: d.update(split_lm_head="yes")),
                            r"key 'split_lm_head' must be bool, got 'yes' \(write split_lm_head: true or "
                            r"split_lm_head: false, without quotes\)"),
}


@pytest.mark.parametrize("case", CLUSTER_MISTAKES)
def test_cluster_config_mistakes(tmp_path, case):
    make, match = CLUSTER_MISTAKES[case]
    path = write(tmp_path, "cluster_config.yaml", make())
    with pytest.raises(ConfigError, match=match) as e:
        load_cluster_config(str(tmp_path))
    assert str(e.value).startswith(path)


def test_workers_may_be_plain_host_names(tmp_path):
    data = shipped("cluster_config.yaml")
    data["workers"] = ["mini2", "pi1"]
    write(tmp_path, "cluster_config.yaml", data)
    assert [n.port for n in load_cluster_config(str(tmp_path)).nodes] == [65432, 65433, 65434]


# ---------------------------------------------------------------------------------------------
# mistakes in model_weights.yaml, and files that are not there or not YAML


@pytest.mark.parametrize("data, name, match", [
    ({"gpt2": {"filename": "gpt2.safetensors"}}, "gpt2", "gpt2: missing key 'url'"),
    ({"gpt2": {"url": "http://x", "filename": 5}}, "gpt2", "gpt2: key 'filename' must be str"),
    ({"gpt2": "http://x"}, "gpt2", "gpt2: expected a mapping with url and filename"),
    ({"gpt2": {"url": "http://x", "filename": "f"}}, "gpt3", "no entry for model 'gpt3'; known: gpt2"),
])
def test_weights_config_mistakes(tmp_path, data, name, match):
    path = write(tmp_path, "model_weights.yaml", data)
    with pytest.raises(ConfigError, match=match) as e:
        load_weights_config(str(tmp_path), name)
    assert str(e.value).startswith(path)


@pytest.mark.parametrize("loader", [load_model_config, load_cluster_config, load_weights_config])
def test_missing_file_says_where_to_point(tmp_path, loader):
    with pytest.raises(ConfigError, match="not found; pass --config-dir"):
        loader(str(tmp_path))


def test_the_guides_file_names_load_too(tmp_path):
    """A folder copied from the guide: its cluster file is cluster_config_syncps.yaml and its model
    file lives in model_parallelism/ (as in src/smolcluster/configs/)."""
    (tmp_path / "model_parallelism").mkdir()
    write(tmp_path, "cluster_config_syncps.yaml", shipped("cluster_config.yaml"))
    write(tmp_path, "model_parallelism/model_config.yaml", shipped("model_config.yaml"))
    assert [n.host for n in load_cluster_config(str(tmp_path)).nodes] == ["mini1", "mini2", "pi1"]
    assert load_model_config(str(tmp_path)).name == "gpt2"
    write(tmp_path, "cluster_config.yaml", shipped("cluster_config.yaml"))
    with pytest.raises(ConfigError, match="cluster_config_syncps.yaml .the guide's name for it. are both there; "
                                          "keep one"):
        load_cluster_config(str(tmp_path))


def test_a_missing_cluster_file_names_the_guides_name_too(tmp_path):
    with pytest.raises(ConfigError, match=r"with cluster_config.yaml \(or the guide's cluster_config_syncps.yaml\)"):
        load_cluster_config(str(tmp_path))


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "cluster_config.yaml", "port: [1, 2\nhost_ip: {")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_cluster_config(str(tmp_path))
    assert str(e.value).startswith(path)


# ---------------------------------------------------------------------------------------------
# both layouts of model_config.yaml and model_weights.yaml


ENTRY = {"hf_model_name": "gpt2", "weights_model_name": "gpt2", "num_layers": 12, "num_nodes": 3}


def test_model_config_entries_under_models_still_load(tmp_path):
    write(tmp_path, "model_config.yaml", {"default_model": "b", "models": {"a": ENTRY, "b": dict(ENTRY, num_nodes=2)}})
    assert (load_model_config(str(tmp_path)).name, load_model_config(str(tmp_path)).num_nodes) == ("b", 2)
    assert load_model_config(str(tmp_path), "a").num_nodes == 3


def test_weights_entries_at_the_top_level_still_load(tmp_path):
    write(tmp_path, "model_weights.yaml", {"gpt2": {"url": "http://x/m.safetensors", "filename": "g.safetensors"}})
    assert load_weights_config(str(tmp_path), "gpt2").filename == "g.safetensors"


def test_shipped_configs_are_in_the_guides_layout():
    assert "models" not in shipped("model_config.yaml") and "gpt2" in shipped("model_config.yaml")
    assert list(shipped("model_weights.yaml")) == ["models"]


@pytest.mark.parametrize("data, match", [
    ({"models": {"a": ENTRY}, "b": ENTRY}, r"model 'b' is at the top level but other models are under 'models:'"),
    ({"models": ENTRY}, r"'models:' holds model settings \(hf_model_name"),
    ({"num_layers": 12, "gpt2": ENTRY}, r"'num_layers' is at the top level; it belongs inside a model entry"),
    ({"gpt2": ENTRY, "nonsense": 3}, r"top-level key 'nonsense' is neither a model entry"),
])
def test_model_config_mixing_layouts_shows_both_shapes(tmp_path, data, match):
    path = write(tmp_path, "model_config.yaml", data)
    with pytest.raises(ConfigError, match=match) as e:
        load_model_config(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(path)
    assert "the two accepted shapes are" in msg and "the guide's: model entries at the top level" in msg
    assert "entries under 'models:'" in msg


@pytest.mark.parametrize("data, match", [
    ({"models": {"a": {"url": "u", "filename": "f"}}, "b": {"url": "u", "filename": "f"}},
     r"has both a 'models:' section and top-level entries \(b\)"),
    ({"url": "u", "filename": "f"}, r"url, filename at the top level"),
])
def test_weights_config_mixing_layouts_shows_both_shapes(tmp_path, data, match):
    path = write(tmp_path, "model_weights.yaml", data)
    with pytest.raises(ConfigError, match=match) as e:
        load_weights_config(str(tmp_path), "a")
    msg = str(e.value)
    assert msg.startswith(path) and "the two accepted shapes are" in msg
    assert "the guide's: entries under 'models:'" in msg and "or entries at the top level" in msg


def test_one_model_is_the_default_several_need_a_choice(tmp_path):
    write(tmp_path, "model_config.yaml", {"only": ENTRY})
    assert load_model_config(str(tmp_path)).name == "only"
    write(tmp_path, "model_config.yaml", {"a": ENTRY, "b": ENTRY})
    with pytest.raises(ConfigError, match=r"2 models \(a, b\) and no default_model; add `default_model: NAME` "
                                          r"to the file or pass --model NAME"):
        load_model_config(str(tmp_path))
    assert load_model_config(str(tmp_path), "b").name == "b"            # --model picks
    write(tmp_path, "model_config.yaml", {"default_model": "b", "a": ENTRY, "b": ENTRY})
    assert load_model_config(str(tmp_path)).name == "b"                 # default_model picks
    assert load_model_config(str(tmp_path), "a").name == "a"            # --model wins


def test_an_entry_without_decoding_settings_gets_the_guides_defaults(tmp_path):
    write(tmp_path, "model_config.yaml", {"gpt2_large": dict(ENTRY, num_layers=36, num_nodes=6)})
    mc = load_model_config(str(tmp_path))
    assert (mc.max_new_tokens, mc.active_decoding_strategy) == (50, "greedy")
    # the guide's temperature and p; k is nanopipe's one top_k default, as in SamplingParams and the shipped file
    assert mc.decoding_strategies["top_k"] == {"temperature": 1.0, "k": 50}
    assert mc.decoding_strategies["top_p"] == {"temperature": 1.0, "p": 0.9}


# ---------------------------------------------------------------------------------------------
# no mistake passes silently: unknown keys (with the closest known key) and values out of range


def _cluster_with(**changes):
    data = shipped("cluster_config.yaml")
    data.update(changes)
    return data


UNKNOWN_KEYS = {
    "nodes speed_gpbs": ("cluster_config.yaml", lambda: _cluster_with(nodes={"pi1": {"speed_gpbs": 9}}),
                         "cluster_config.yaml: nodes.pi1: unknown key 'speed_gpbs' (did you mean 'speed_gbps'?)"),
    "nodse": ("cluster_config.yaml", lambda: _cluster_with(nodse={"pi1": {"speed_gbps": 9}}),
              "cluster_config.yaml: unknown key 'nodse' (did you mean 'nodes'?)"),
    "cluster auth_tokn": ("cluster_config.yaml", lambda: _cluster_with(auth_tokn="change-me"),
                          "cluster_config.yaml: unknown key 'auth_tokn' (did you mean 'auth_token'?)"),
    "cluster max_sesions": ("cluster_config.yaml", lambda: _cluster_with(max_sesions=4),
                            "cluster_config.yaml: unknown key 'max_sesions' (did you mean 'max_sessions'?)"),
    "cluster rejoin_grace": ("cluster_config.yaml", lambda: _cluster_with(rejoin_grace=5),
                             "cluster_config.yaml: unknown key 'rejoin_grace' (did you mean 'rejoin_grace_s'?)"),
    "worker entry prot": ("cluster_config.yaml",
                          lambda: _cluster_with(workers=[{"host": "mini2", "prot": 7001}, "pi1"]),
                          "cluster_config.yaml: workers[0]: unknown key 'prot' (did you mean 'port'?)"),
    "model num_layer": ("model_config.yaml", _model(lambda d, m: m.update(num_layer=12)),
                        "model_config.yaml: gpt2: unknown key 'num_layer' (did you mean 'num_layers'?)"),
    "model default_modle": ("model_config.yaml", _model(lambda d, m: d.update(default_modle="gpt2")),
                            "model_config.yaml: unknown key 'default_modle' (did you mean 'default_model'?)"),
    "decoding tempurature": ("model_config.yaml",
                             _model(lambda d, m: m["decoding_strategies"].update(sampling={"tempurature": 1})),
                             "model_config.yaml: gpt2.decoding_strategies.sampling: unknown key 'tempurature' "
                             "(did you mean 'temperature'?)"),
    "decoding k in top_p": ("model_config.yaml",
                            _model(lambda d, m: m["decoding_strategies"]["top_p"].update(k=5)),
                            "model_config.yaml: gpt2.decoding_strategies.top_p: unknown key 'k' "
                            "(known: temperature, p, top_p)"),
    "strategy topk": ("model_config.yaml", _model(lambda d, m: m["decoding_strategies"].update(topk={"k": 5})),
                      "model_config.yaml: gpt2: decoding_strategies: unknown strategy 'topk' "
                      "(did you mean 'top_k'?)"),
    "weights filname": ("model_weights.yaml",
                        lambda: {"models": {"gpt2": {"url": "http://x", "filname": "g.safetensors"}}},
                        "model_weights.yaml: models.gpt2: unknown key 'filname' (did you mean 'filename'?)"),
}


@pytest.mark.parametrize("case", UNKNOWN_KEYS)
def test_unknown_key_is_an_error_naming_file_key_and_closest_known_key(tmp_path, case):
    name, make, message = UNKNOWN_KEYS[case]
    write(tmp_path, name, make())
    loader = {"cluster_config.yaml": load_cluster_config, "model_config.yaml": load_model_config,
              "model_weights.yaml": load_weights_config}[name]
    with pytest.raises(ConfigError) as e:
        loader(str(tmp_path))
    assert str(e.value) == f"{tmp_path}/{message}"


BAD_VALUES = {
    "port 0": (lambda: _cluster_with(port=0), "'port' must be between 1 and 65535, got 0"),
    "port too big": (lambda: _cluster_with(port=70000), "'port' must be between 1 and 65535, got 70000"),
    "worker port past 65535": (lambda: _cluster_with(port=65535), "workers[0]: rank 1 would listen on port"),
    "max_sessions 0": (lambda: _cluster_with(max_sessions=0), "'max_sessions' must be >= 1, got 0"),
    "heartbeat 0": (lambda: _cluster_with(heartbeat_s=0), "'heartbeat_s' must be a number > 0, got 0"),
    "negative grace": (lambda: _cluster_with(rejoin_grace_s=-1), "'rejoin_grace_s' must be a number >= 0"),
    "pipeline_depth 0": (lambda: _cluster_with(pipeline_depth=0), "'pipeline_depth' must be >= 1"),
    "link_mbps nan": (lambda: _cluster_with(link_mbps=float("nan")), "'link_mbps' must be a number >= 0"),
    "prefix_cache_mb negative": (lambda: _cluster_with(prefix_cache_mb=-1), "'prefix_cache_mb' must be a number >= 0"),
    "prefix_cache_mb text": (lambda: _cluster_with(prefix_cache_mb="lots"), "prefix_cache_mb"),
    "ip not a string": (lambda: _cluster_with(host_ip={"mini1": 10, "mini2": "127.0.0.1", "pi1": "127.0.0.1"}),
                        "host_ip.mini1 must be an address"),
    "host_ip lists an unused host": (
        lambda: _cluster_with(host_ip={"mini1": "127.0.0.1", "mini2": "127.0.0.1", "pi1": "127.0.0.1",
                                       "pi2": "127.0.0.1"}),
        "host_ip lists pi2, which is neither the server nor in workers"),
    "worker host misspelled": (lambda: _cluster_with(workers=["mini2", "pi2"]),
                               "names host 'pi2', which is not in host_ip (known: mini1, mini2, pi1) "
                               "(did you mean 'pi1'?)"),
    "tls_key alone": (lambda: _cluster_with(tls_key="k.pem"), "tls_key is set but tls_cert is not"),
    "cors origin not a string": (lambda: _cluster_with(cors_origins=[5]), "cors_origins[0] must be an origin"),
    "empty auth_token": (lambda: _cluster_with(auth_token=""), "'auth_token' is empty"),
    "nodes: unknown host": (lambda: _cluster_with(nodes={"pi5": {"speed_gbps": 9}}),
                            "nodes.pi5: no host 'pi5' in host_ip (did you mean 'pi1'?)"),
    "nodes: speed 0": (lambda: _cluster_with(nodes={"pi1": {"speed_gbps": 0}}),
                       "nodes.pi1: 'speed_gbps' must be a number > 0, got 0"),
    "nodes: not a mapping": (lambda: _cluster_with(nodes={"pi1": 9}), "nodes.pi1: expected a mapping"),
}


def test_node_overrides_load(tmp_path):
    write(tmp_path, "cluster_config.yaml", _cluster_with(nodes={"pi1": {"speed_gbps": 9, "memory_mb": 3000}}))
    assert load_cluster_config(str(tmp_path)).node_overrides == {"pi1": {"speed_gbps": 9.0, "memory_mb": 3000.0}}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_cluster_values_checked_at_load(tmp_path, case, monkeypatch):
    monkeypatch.delenv("NANOPIPE_TOKEN", raising=False)
    make, message = BAD_VALUES[case]
    path = write(tmp_path, "cluster_config.yaml", make())
    with pytest.raises(ConfigError) as e:
        load_cluster_config(str(tmp_path))
    assert str(e.value).startswith(path) and message in str(e.value), str(e.value)


def test_prefix_cache_mb_sets_the_budget_and_defaults_to_a_share_of_free_memory(tmp_path):
    write(tmp_path, "cluster_config.yaml", _cluster_with(prefix_cache_mb=1.5))
    assert load_cluster_config(str(tmp_path)).prefix_cache_bytes() == int(1.5 * 2**20)
    write(tmp_path, "cluster_config.yaml", _cluster_with(prefix_cache_mb=0))
    assert load_cluster_config(str(tmp_path)).prefix_cache_bytes() == 0, "0 turns prefix reuse off"
    write(tmp_path, "cluster_config.yaml", _cluster_with())
    from nanopipe.placement import usable_memory_bytes
    room = usable_memory_bytes()
    got = load_cluster_config(str(tmp_path)).prefix_cache_bytes()
    assert 0 < got <= max(room, 256 << 20), f"default budget {got} bytes, this node can allocate {room}"


MODEL_VALUES = {
    "temperature 0": (_model(lambda d, m: m["decoding_strategies"]["sampling"].update(temperature=0)),
                      "gpt2.decoding_strategies.sampling: 'temperature' must be a number > 0, got 0"),
    "k 0": (_model(lambda d, m: m["decoding_strategies"]["top_k"].update(k=0)), "'k' must be >= 1, got 0"),
    "p above 1": (_model(lambda d, m: m["decoding_strategies"]["top_p"].update(p=1.5)),
                  "'p' must be a number > 0 and <= 1, got 1.5"),
    "k and top_k": (_model(lambda d, m: m["decoding_strategies"]["top_k"].update(top_k=3)),
                    "give 'k' or 'top_k'"),
    "active topp": (_model(lambda d, m: m.update(active_decoding_strategy="topp")),
                    "active_decoding_strategy 'topp' is not one of decoding_strategies (greedy, sampling, top_p, "
                    "top_k) (did you mean 'top_p'?)"),
    "objective misspelled": (_model(lambda d, m: m.update(placement_objective="throughpt")),
                             "unknown placement_objective 'throughpt' (did you mean 'throughput'?)"),
    "partition misspelled": (_model(lambda d, m: m.update(partition="evne")),
                             "unknown partition 'evne' (did you mean 'even'?)"),
    "more nodes than layers": (_model(lambda d, m: m.update(num_nodes=13)),
                               "num_nodes is 13 but the model has 12 layers"),
    "mapping with balanced": (_model(lambda d, m: m.update(partition="balanced", layer_mapping={0: [0, 11]})),
                              "layer_mapping is given but partition is 'balanced'"),
    "mapping without layer_mapping": (_model(lambda d, m: m.update(partition="mapping")),
                                      "partition is 'mapping' but there is no layer_mapping"),
    "mapping with a gap in a list": (
        _model(lambda d, m: m.update(layer_mapping={0: [0, 1, 2], 1: [3, 4, 6], 2: [7, 8, 9, 10, 11]})),
        "gpt2: layer_mapping rank 1: [3, 4, 6] skips layer 5"),
    "mapping leaves a layer out": (
        _model(lambda d, m: m.update(layer_mapping={0: [0, 1, 2], 1: [3, 4, 5], 2: [7, 8, 9, 10, 11]})),
        "gpt2: layer_mapping: layer 6 is held by no rank"),
    "mapping holds a layer twice": (
        _model(lambda d, m: m.update(layer_mapping={0: [0, 1, 2, 3], 1: [3, 4, 5, 6], 2: [7, 11]})),
        "gpt2: layer_mapping: ranks 0 and 1 both hold layer 3"),
    "mapping shares layers unevenly": (
        _model(lambda d, m: m.update(layer_mapping={0: [0, 3], 1: [4, 11], 2: [4, 9]})),
        "gpt2: layer_mapping: ranks 1 and 2 both hold layers 4-9 but not the same layers"),
    "mapping for too few ranks": (_model(lambda d, m: m.update(layer_mapping={0: [0, 5], 1: [6, 11]})),
                                  "gpt2: layer_mapping has no entry for rank 2"),
    "empty hf_model_name": (_model(lambda d, m: m.update(hf_model_name=" ")), "'hf_model_name' is empty"),
    "n_head 0": (_model(lambda d, m: m.update(n_head=0)), "'n_head' must be >= 1, got 0"),
    "a typo in another entry": (_model(lambda d, m: d["gpt2-xl"].update(num_nodse=6)),
                                "gpt2-xl: unknown key 'num_nodse' (did you mean 'num_nodes'?)"),
}


@pytest.mark.parametrize("case", MODEL_VALUES)
def test_model_values_checked_at_load(tmp_path, case):
    make, message = MODEL_VALUES[case]
    path = write(tmp_path, "model_config.yaml", make())
    with pytest.raises(ConfigError) as e:
        load_model_config(str(tmp_path))
    assert str(e.value).startswith(path) and message in str(e.value), str(e.value)


@pytest.mark.parametrize("entry, message", [
    ({"url": "http://x", "filename": "f", "sha256": "abc"}, "'sha256' must be 64 hex digits"),
    ({"url": "http://x", "filename": "f", "size": -1}, "'size' must be >= 0"),
    ({"url": "", "filename": "f"}, "'url' is empty"),
])
def test_weights_values_checked_at_load(tmp_path, entry, message):
    path = write(tmp_path, "model_weights.yaml", {"models": {"gpt2": entry}})
    with pytest.raises(ConfigError) as e:
        load_weights_config(str(tmp_path), "gpt2")
    assert str(e.value).startswith(path) and message in str(e.value), str(e.value)


def test_num_nodes_must_match_the_cluster():
    mc, cc = load_model_config(str(SHIPPED), "gpt2-large"), load_cluster_config(str(SHIPPED))
    with pytest.raises(ConfigError, match=r"gpt2-large: num_nodes=4 but .*cluster_config.yaml has 3 nodes "
                                          r"\(server \+ 2 workers\); make them agree"):
        check_agree(mc, cc)
    check_agree(load_model_config(str(SHIPPED)), cc)


def test_known_strategies_are_decodings_built_ins():
    """The strategies config accepts (sampling_params, no numpy) are those decoding.py registers, and
    each key a strategy's section may hold sets a field that strategy reads."""
    from nanopipe.decoding import STRATEGIES, make_params
    from nanopipe.sampling_params import SECTION_KEYS, STRATEGY_USES, section_keys
    assert set(STRATEGY_USES) == set(STRATEGIES)
    assert section_keys("top_k") == ("temperature", "k", "top_k") and section_keys("greedy") == ()
    for name in STRATEGY_USES:                         # each allowed key sets a field the strategy reads
        keys = section_keys(name)
        for k in keys:
            value = 5 if k in ("k", "top_k") else 0.5
            params = make_params({"active_decoding_strategy": name, "decoding_strategies": {name: {k: value}}})
            assert SECTION_KEYS[k] in STRATEGY_USES[name], (name, k)
            assert getattr(params, SECTION_KEYS[k]) == value, (name, k)
            assert params.strategy == name


def test_config_and_requests_check_the_one_table_of_knob_ranges(tmp_path, monkeypatch):
    """model_config.yaml's sections and a request's fields are checked against one table
    (sampling_params.KNOB_RANGES): narrow a range there and both refuse what it leaves out."""
    import nanopipe.sampling_params as sp
    write(tmp_path, "model_config.yaml", _model(lambda d, m: m["decoding_strategies"]["top_p"].update(p=0.9))())
    assert load_model_config(str(tmp_path)).decoding_strategies["top_p"]["p"] == 0.9
    assert sp.SamplingParams("top_p", top_p=0.9).validate().top_p == 0.9
    monkeypatch.setitem(sp.KNOB_RANGES, "top_p", sp.Range(0.0, above=True, hi=0.5))
    monkeypatch.setitem(sp.KNOB_RANGES, "top_k", sp.Range(60))
    with pytest.raises(ConfigError, match="'p' must be a number > 0 and <= 0.5, got 0.9"):
        load_model_config(str(tmp_path))
    with pytest.raises(sp.DecodingError, match=r"top_p: must be a number in \(0, 0.5\] \(got 0.9\)"):
        sp.SamplingParams("top_p", top_p=0.9).validate()
    write(tmp_path, "model_config.yaml", _model(lambda d, m: (m["decoding_strategies"]["top_p"].update(p=0.4),
                                                              m["decoding_strategies"]["top_k"].update(k=50)))())
    with pytest.raises(ConfigError, match="'k' must be >= 60, got 50"):
        load_model_config(str(tmp_path))
    with pytest.raises(sp.DecodingError, match="top_k: must be an integer >= 60"):
        sp.SamplingParams("top_k", top_k=50, top_p=0.4).validate()


# ---------------------------------------------------------------------------------------------
# hostile YAML: alias bombs, huge values, things that are not YAML text


def alias_bomb(key: str = "auth_token") -> str:
    """About 1 KB that expands to 9**9 (387 million) strings: each line repeats the one before nine times."""
    words = ", ".join(['"lol lol lol lol lol lol lol lol lol lol lol lol lol lol lol lol lol lol lol lol"'] * 9)
    lines = [f"{key}: [&a [{words}],"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"  &{name} [{', '.join('*' + prev for _ in range(9))}],")
    lines[-1] = lines[-1].rstrip(",") + "]"
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name, loader", [("cluster_config.yaml", "load_cluster_config"),
                                          ("model_config.yaml", "load_model_config"),
                                          ("model_weights.yaml", "load_weights_config")])
def test_alias_bomb_is_refused_quickly_naming_the_file(tmp_path, name, loader):
    """In a child process capped at 2 GB and 60 s: before the cap, expanding the bomb took 80 s and
    ended in a MemoryError; now it is refused at once (the child says how long it took)."""
    import subprocess
    import sys
    import textwrap
    for other in ("cluster_config.yaml", "model_config.yaml", "model_weights.yaml"):
        (tmp_path / other).write_text((SHIPPED / other).read_text())
    bomb = alias_bomb("auth_token" if name == "cluster_config.yaml" else "gpt2")
    assert 900 <= len(bomb) <= 1200
    (tmp_path / name).write_text(bomb + (SHIPPED / name).read_text().replace("auth_token:", "#"))
    script = textwrap.dedent(f"""
        import resource, time
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from nanopipe import config
        t = time.monotonic()
        try:
            config.{loader}({str(tmp_path)!r})
        except config.ConfigError as e:
            print(f"{{time.monotonic() - t:.3f}}", e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout, done.stderr[-1500:]
    seconds, message = done.stdout.split(" ", 1)
    assert float(seconds) < 2.0, done.stdout
    assert str(tmp_path / name) in message and "aliases here expand to more than 100000 values" in message
    assert len(message) < 600, message


def test_an_alias_used_a_few_times_still_loads(tmp_path):
    """yaml.safe_dump writes an anchor and aliases for a value used twice: that stays valid."""
    path = write(tmp_path, "model_config.yaml", {"default_model": "a", "a": ENTRY, "b": ENTRY})
    assert "*id001" in open(path).read()
    assert load_model_config(str(tmp_path)).num_layers == 12


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    write(tmp_path, "model_weights.yaml", "gpt2: &x {url: x, filename: y, size: [*x]}\n")
    with pytest.raises(ConfigError, match="alias inside its own anchor"):
        load_weights_config(str(tmp_path))


@pytest.mark.parametrize("text, says", [
    ("host_ip: {mini1: 10.0.0.1}\nport: " + "x" * 100_000 + "\n", "must be int, got 'xxxx"),
    ("host_ip: {mini1: 10.0.0.1}\nport: [" + ", ".join(["1"] * 50_000) + "]\n", "must be int, got [1, 1, 1, 1, ...]"),
    ("host_ip: {mini1: [" + ", ".join(["1"] * 50_000) + "]}\n", "host_ip.mini1 must be an address"),
    ("[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("\x00\x01\xff\xfe binary", "not"),
    ("a" * 2_000_000 + ": 1\n", "larger than 1048576 bytes"),
])
def test_hostile_cluster_config_is_a_short_clear_error(tmp_path, text, says):
    path = tmp_path / "cluster_config.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape") if "\xff" not in text else text.encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_cluster_config(str(tmp_path))
    assert str(path) in str(e.value) and says in str(e.value) and len(str(e.value)) < 600, str(e.value)[:1000]


# ---------------------------------------------------------------------------------------------
# the cluster on the wire (what a leader tells `nanopipe join --leader`), and one command's configs


def test_a_cluster_goes_over_the_wire_and_back_whole_without_its_secrets(tmp_path, monkeypatch):
    import dataclasses
    import json

    from nanopipe.config import ClusterConfig
    monkeypatch.delenv("NANOPIPE_TOKEN", raising=False)
    write(tmp_path, "cluster_config.yaml", _cluster_with(
        nodes={"pi1": {"speed_gbps": 9, "memory_mb": 3000}}, bind="0.0.0.0", max_sessions=4, heartbeat_s=0.5,
        rejoin_grace_s=5, pipeline_depth=2, link_delay_ms=1.5, link_mbps=100, prefix_cache_mb=64,
        auth_token="s3cret", api_token="web-secret", cors_origins=["http://x"]))
    cc = load_cluster_config(str(tmp_path))
    sent = json.dumps(cc.to_wire())
    assert "s3cret" not in sent and "web-secret" not in sent and "http://x" not in sent, sent
    back = ClusterConfig.from_wire(json.loads(sent), "the leader at 10.0.0.1:65432")
    assert back.path == "the leader at 10.0.0.1:65432" and back.auth_token is None and back.api_token is None
    assert dataclasses.replace(back, path=cc.path, auth_token=cc.auth_token, api_token=cc.api_token,
                               cors_origins=cc.cors_origins) == cc
    assert cc.to_wire(for_host="mini2")["node_overrides"] == {}          # only the joining node's entry
    assert cc.to_wire(for_host="pi1")["node_overrides"] == {"pi1": {"speed_gbps": 9.0, "memory_mb": 3000.0}}


def _wire(**changes):
    wire = load_cluster_config(str(SHIPPED)).to_wire()
    wire.update(changes)
    return {k: v for k, v in wire.items() if v is not ...}


BAD_WIRE = {
    "not a mapping": ([1, 2], "the cluster must be a mapping"),
    "no nodes": (_wire(nodes=...), "missing key 'nodes'"),
    "unknown field": (_wire(max_sesions=3), "unknown key 'max_sesions' (did you mean 'max_sessions'?)"),
    "node not a list": (_wire(nodes=[[0, "mini1", "127.0.0.1", 65432], "mini2"]),
                        "nodes[1]: expected [rank, host, ip, port], got 'mini2'"),
    "node port a string": (_wire(nodes=[[0, "mini1", "127.0.0.1", "65432"]]),
                           "nodes[0]: key 'port' must be int, got '65432'"),
    "ranks out of order": (_wire(nodes=[[1, "mini2", "127.0.0.1", 65433]]), "nodes[0]: rank 1 in place 0"),
    "empty host": (_wire(nodes=[[0, " ", "127.0.0.1", 65432]]), "nodes[0]: 'host' is empty"),
    "max_sessions 0": (_wire(max_sessions=0), "'max_sessions' must be >= 1, got 0"),
    "heartbeat a bool": (_wire(heartbeat_s=True), "key 'heartbeat_s' must be int or float, got True"),
    "depth a float": (_wire(pipeline_depth=2.5), "key 'pipeline_depth' must be int, got 2.5"),
    "negative cache": (_wire(prefix_cache_mb=-1), "'prefix_cache_mb' must be a number >= 0, got -1"),
    "override of no node": (_wire(node_overrides={"pi5": {"memory_mb": 1}}), "node_overrides.pi5: no host 'pi5'"),
    "override key": (_wire(node_overrides={"pi1": {"speed": 1}}),
                     "node_overrides.pi1: unknown key 'speed' (did you mean 'speed_gbps'?)"),
}


@pytest.mark.parametrize("case", BAD_WIRE)
def test_a_cluster_from_the_wire_is_checked_like_the_yaml_naming_the_field(case):
    from nanopipe.config import ClusterConfig
    data, message = BAD_WIRE[case]
    with pytest.raises(ConfigError) as e:
        ClusterConfig.from_wire(data, "the leader at 10.0.0.1:65432")
    assert str(e.value).startswith("the leader at 10.0.0.1:65432: ") and message in str(e.value), str(e.value)


def test_configs_read_each_file_once_and_only_when_asked(tmp_path, monkeypatch):
    import nanopipe.config as config
    reads = []
    real = config._load_yaml
    monkeypatch.setattr(config, "_load_yaml", lambda d, name: reads.append(name) or real(d, name))
    configs = config.Configs(str(SHIPPED))
    assert reads == []
    for _ in range(3):
        assert configs.model.name == "gpt2" and configs.cluster.leader.host == "mini1"
        assert configs.weights().filename == configs.weights("gpt2").filename
        assert configs.cluster_or_none() is configs.cluster
    assert sorted(reads) == ["cluster_config.yaml", "model_config.yaml", "model_weights.yaml"], reads
    empty = config.Configs(str(tmp_path))
    for _ in range(2):
        assert empty.cluster_or_none() is None
        with pytest.raises(config.ConfigNotFound):
            empty.model  # noqa: B018 (the property reads the file)
    assert reads[3:] == ["cluster_config.yaml", "model_config.yaml"], reads    # a missing file is looked for once


def test_a_split_stage_is_spelled_by_giving_two_ranks_the_same_layers(tmp_path):
    make = _model(lambda d, m: m.update(layer_mapping={0: [0, 3], 1: [4, 11], 2: [4, 11]}))
    write(tmp_path, "model_config.yaml", make())
    mc = load_model_config(str(tmp_path))
    assert mc.layer_mapping == {0: [0, 3], 1: [4, 11], 2: [4, 11]}
