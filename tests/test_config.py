"""The YAML configs: the shipped ones load, and every mistake is a ConfigError naming file and key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nanopipe.config import ConfigError, load_cluster_config, load_model_config, load_weights_config

SHIPPED = Path(__file__).resolve().parent.parent / "configs"


def shipped(name: str) -> dict:
    return yaml.safe_load((SHIPPED / name).read_text())


def write(tmp_path, name: str, data) -> str:
    (tmp_path / name).write_text(data if isinstance(data, str) else yaml.safe_dump(data))
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
        edit(data, data["models"]["gpt2"])
        return data
    return make


MODEL_MISTAKES = {
    "missing key": (_model(lambda d, m: m.pop("num_layers")), "missing key 'num_layers'"),
    "wrong type": (_model(lambda d, m: m.update(num_layers="twelve")), "key 'num_layers' must be int"),
    "bool is not int": (_model(lambda d, m: m.update(num_nodes=True)), "key 'num_nodes' must be int"),
    "unknown model": (_model(lambda d, m: d.update(default_model="gpt5")), "no model 'gpt5'"),
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


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "cluster_config.yaml", "port: [1, 2\nhost_ip: {")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_cluster_config(str(tmp_path))
    assert str(e.value).startswith(path)
