"""tools/planning.py: the layer plan and each rank's weights, worked out without click (the CLI prints them).

Config folders are written by localcluster.write_configs; the remote header comes from a real HTTP
server on 127.0.0.1 (tests/httpserver.py).
"""
from __future__ import annotations

import os
import re

import pytest
import yaml

from nanopipe.config import ConfigError, Configs, load_model_config
from nanopipe.partition import PartitionError, stage_bytes
from nanopipe.tools.localcluster import write_configs
from nanopipe.tools.planning import SetupError, model_shape, plan_ranges, plan_table, planning_shape, setup_rank
from nanopipe.weights import init_weights

try:
    from tests.httpserver import FileServer
except ImportError:   # pytest run with tests/ itself on sys.path
    from httpserver import FileServer

L, C, H, V = 4, 48, 4, 100      # n_embd 48 is no GPT-2 size: only the file can tell it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("w") / "tiny.safetensors")
    init_weights(path, n_layer=L, n_embd=C, n_head=H, n_ctx=32, n_vocab=V)
    return path


def configs(tmp_path, weights, **kw) -> str:
    d = str(tmp_path / "cfg")
    write_configs(d, weights=weights, nodes=kw.pop("nodes", 3), n_layer=L, n_head=H, **kw)
    return d


def edit_model(config_dir, **fields):
    path = os.path.join(config_dir, "model_config.yaml")
    with open(path) as f:
        data = yaml.safe_load(f)
    data["models"]["local"].update(fields)
    with open(path, "w") as f:
        yaml.safe_dump(data, f)


def test_plan_table_names_the_nodes_and_sizes_each_stage(tmp_path, tiny):
    d = configs(tmp_path, tiny)
    p = plan_table(Configs(d), weights_path=tiny)
    assert p.ranges == [(0, 2), (2, 3), (3, 4)] and p.names == ["node0", "node1", "node2"]
    assert p.bytes_per_rank == [stage_bytes(hi - lo, C, V, 32, rank0=(r == 0)) for r, (lo, hi) in enumerate(p.ranges)]
    more = plan_table(Configs(d), weights_path=tiny, nodes=4)
    assert more.names == ["node0", "node1", "node2", "node3"], "a node the cluster file does not have"


def test_plan_table_for_disagreeing_configs_says_to_pass_nodes(tmp_path, tiny):
    d = configs(tmp_path, tiny)
    edit_model(d, num_nodes=2)
    with pytest.raises(SetupError, match=r"\(or pass --nodes N to plan for another size\)"):
        plan_table(Configs(d), weights_path=tiny)
    assert plan_table(Configs(d), weights_path=tiny, nodes=2).ranges == [(0, 2), (2, 4)]


def test_plan_and_setup_under_the_guides_file_names_name_the_guides_file(tmp_path, tiny):
    """A folder with the guide's names (cluster_config_syncps.yaml, model_parallelism/model_config.yaml)
    plans as it is, and a disagreement names the model file that is there, not one that is not."""
    d = configs(tmp_path, tiny)
    edit_model(d, num_nodes=2)
    os.rename(os.path.join(d, "cluster_config.yaml"), os.path.join(d, "cluster_config_syncps.yaml"))
    os.mkdir(os.path.join(d, "model_parallelism"))
    guide_model = os.path.join(d, "model_parallelism", "model_config.yaml")
    os.rename(os.path.join(d, "model_config.yaml"), guide_model)
    with pytest.raises(SetupError, match=re.escape(f"{guide_model}: local: num_nodes=2 but")):
        plan_table(Configs(d), weights_path=tiny)
    assert plan_table(Configs(d), weights_path=tiny, nodes=2).ranges == [(0, 2), (2, 4)]
    with pytest.raises(ConfigError, match=re.escape(f"{guide_model}: local: num_nodes=2 but")):
        setup_rank(Configs(d), tiny, 1, log=lambda _line: None)


def test_plan_ranges_follows_the_layer_mapping_only_for_its_node_count(tmp_path, tiny):
    d = configs(tmp_path, tiny)
    edit_model(d, layer_mapping={0: [0, 0], 1: [1, 2], 2: [3, 3]})
    mc = load_model_config(d)
    cfg = model_shape(Configs(d), tiny)
    assert plan_ranges(mc, cfg) == [(0, 1), (1, 3), (3, 4)]
    with pytest.raises(PartitionError, match="layer_mapping is for 3 nodes, not 2"):
        plan_ranges(mc, cfg, nodes=2)
    other = plan_ranges(mc, cfg, nodes=2, partition="balanced")       # another strategy: the mapping is ignored
    assert len(other) == 2 and other[0][0] == 0 and other[-1][1] == L and other[0][1] == other[1][0]


def test_the_layer_mapping_hint_names_a_flag_that_works(tmp_path, tiny):
    # the error for another node count says which --partition to pass; passing it plans that split
    d = configs(tmp_path, tiny)
    edit_model(d, layer_mapping={0: [0, 0], 1: [1, 2], 2: [3, 3]})
    mc = load_model_config(d)
    cfg = model_shape(Configs(d), tiny)
    with pytest.raises(PartitionError, match=re.escape("pass --partition even or balanced")):
        plan_ranges(mc, cfg, nodes=2)
    assert plan_ranges(mc, cfg, nodes=2, partition="even") == [(0, 2), (2, 4)]


def test_plan_says_the_split_is_the_layer_mapping(tmp_path, tiny):
    known = {"speed_gbps": 5, "speed8_gbps": 5, "memory_mb": 1000}      # every node's figures: a prediction
    d = configs(tmp_path, tiny, cluster_extra={"nodes": {f"node{r}": known for r in range(3)}})
    edit_model(d, layer_mapping={0: [0, 0], 1: [1, 2], 2: [3, 3]}, partition="even")
    p = plan_table(Configs(d), weights_path=tiny)
    assert p.ranges == [(0, 1), (1, 3), (3, 4)]
    split = [ln for ln in p.lines if ln.startswith("Split:")]
    assert split and split[0].startswith("Split: layer_mapping"), p.lines


def test_model_shape_reads_the_file_else_the_config(tmp_path, tiny, monkeypatch):
    d = configs(tmp_path, tiny)
    assert (model_shape(Configs(d), tiny).n_embd, model_shape(Configs(d), tiny).n_vocab) == (C, V)
    monkeypatch.chdir(tmp_path)         # weights/tiny.safetensors is not here: the config's layer count
    shape = model_shape(Configs(d), None)
    assert (shape.n_layer, shape.n_head) == (L, H)


def test_a_worker_plans_its_balanced_slice_from_the_remote_header(tmp_path, tiny, monkeypatch):
    """No weights here, a model of no known GPT-2 size, the balanced split: two Range requests read
    n_embd and n_vocab from the remote file's header; the even split asks for nothing."""
    with open(tiny, "rb") as f:
        server = FileServer({"/tiny.safetensors": f.read()}).start()
    try:
        d = configs(tmp_path, tiny, partition="balanced", weights_url=server.url("/tiny.safetensors"))
        monkeypatch.chdir(tmp_path)
        assert model_shape(Configs(d), None).n_embd != C, "without the header the shape is a guess"
        shape = planning_shape(Configs(d))
        assert (shape.n_layer, shape.n_embd, shape.n_vocab) == (L, C, V)
        assert [r for _, r in server.requests] == ["bytes=0-7", f"bytes=8-{8 + _header_len(tiny) - 1}"]
        edit_model(d, partition="even")
        server.requests.clear()
        planning_shape(Configs(d))
        assert server.requests == [], "the even split needs only the layer count"
    finally:
        server.stop()


def _header_len(path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def test_setup_rank_with_a_missing_weights_file_says_how_to_make_one(tmp_path, tiny):
    d = configs(tmp_path, tiny)
    lines = []
    with pytest.raises(SetupError, match=r"nope.safetensors: no such weights file; run `nanopipe pull local` or "
                                         r"`nanopipe init-weights .*nope.safetensors` for synthetic weights"):
        setup_rank(Configs(d), str(tmp_path / "nope.safetensors"), 1, log=lines.append)
    assert lines == ["Checking for model weights (local)..."]
    s = setup_rank(Configs(d), tiny, 2, log=lines.append)
    assert (s.ranges, s.weights_path, s.cfg.n_embd) == ([(0, 2), (2, 3), (3, 4)], tiny, C)
    assert lines[-1] == f"Model weights ready at: {tiny}"
