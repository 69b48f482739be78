"""The three YAML files in configs/, read into small frozen dataclasses.

    model_config.yaml    which model, how many nodes, how to split it, decoding defaults
    cluster_config.yaml  who is where: host_ip map, ports, which rank runs on which host
    model_weights.yaml   where each model's weights come from

Config is data: nothing here is global; commands read it once and pass it on. Every key and value
is checked here, once, at load: a missing, mistyped, misspelled or out-of-range key is a
ConfigError naming the file and the key, e.g.

    configs/cluster_config.yaml: unknown key 'auth_tokn' (did you mean 'auth_token'?)

The keys each file may hold are listed once, in the *_KEYS tables below: a new key goes there and
into its loader.
"""
from __future__ import annotations

import difflib
import math
import os
import string
from dataclasses import dataclass, field

import yaml

from . import partition as _partition
from .logs import shown
from .sampling_params import DEFAULT_DECODING, KNOB_RANGES, SECTION_KEYS, STRATEGY_USES, section_keys

DEFAULT_CONFIG_DIR = "configs"

# model_config.yaml: the top level holds model entries (any name) and these keys.
MODEL_FILE_KEYS = ("default_model", "models")
MODEL_KEYS = ("hf_model_name", "weights_model_name", "num_layers", "num_nodes", "max_new_tokens",
              "active_decoding_strategy", "decoding_strategies", "n_head", "partition", "layer_mapping",
              "placement_objective")
OBJECTIVES = ("throughput", "latency")     # what `partition: auto` minimises (placement.solve)
# decoding_strategies: the strategies, the keys each section may hold, and the settings of an entry
# that leaves them out are sampling_params.py's (STRATEGY_USES, section_keys, DEFAULT_DECODING); a
# strategy registered with decoding.register can be named here as soon as it is registered.
# cluster_config.yaml, and one entry of its `workers` list.
CLUSTER_KEYS = ("host_ip", "port", "server", "num_workers", "workers", "bind", "max_sessions", "rejoin_grace_s",
                "heartbeat_s", "auth_token", "tls_cert", "tls_key", "api_token", "cors_origins", "pipeline_depth",
                "link_delay_ms", "link_mbps", "nodes", "prefix_cache_mb", "split_stages",
                "split_lm_head")
WORKER_KEYS = ("rank", "host", "port")
# cluster_config.yaml `nodes: {HOST: {...}}`: a node's capacity, instead of (or over) what it measures
NODE_KEYS = ("speed_gbps", "speed8_gbps", "memory_mb")
# model_weights.yaml: entries under `models:`, each with these keys.
WEIGHTS_FILE_KEYS = ("models",)
WEIGHTS_KEYS = ("url", "filename", "sha256", "size")


class ConfigError(ValueError):
    """A config file is missing, malformed, or has a missing, unknown or mistyped key."""


class ConfigNotFound(ConfigError):
    """The config file is not there at all (a command may then use built-in defaults; a broken
    file is never replaced by defaults)."""


# The guide keeps two of its files under other names; a folder copied from the guide works as it is.
GUIDE_FILE_NAMES = {"cluster_config.yaml": "cluster_config_syncps.yaml",
                    "model_config.yaml": os.path.join("model_parallelism", "model_config.yaml")}


def config_path(config_dir: str, name: str) -> str:
    """config_dir/name, or the guide's name for that file when only the guide's is there.

    configs/cluster_config.yaml, else configs/cluster_config_syncps.yaml; both there is an error
    (one of them would be silently ignored)."""
    path = os.path.join(config_dir, name)
    guide = GUIDE_FILE_NAMES.get(name)
    if guide is None or not os.path.exists(os.path.join(config_dir, guide)):
        return path
    if os.path.exists(path):
        raise ConfigError(f"{path} and {os.path.join(config_dir, guide)} (the guide's name for it) are both "
                          "there; keep one")
    return os.path.join(config_dir, guide)


MAX_CONFIG_BYTES = 1 << 20      # the shipped files are a few KB; a config never needs megabytes
MAX_CONFIG_VALUES = 100_000     # values in a config with every alias written out (the shipped ones: < 300)


class _BoundedLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a document whose aliases expand past MAX_CONFIG_VALUES values.

    An alias (`*a`) repeats what its anchor (`&a`) names; yaml.safe_dump writes them for a value
    used twice, so they are allowed. But aliases of aliases multiply: nine lines of
    `&b [*a, *a, *a, *a, *a, *a, *a, *a, *a]` expand to 9**9 values (a "billion laughs" bomb) that
    anything walking or printing the config would go through. The size is counted on the composed
    graph, where each anchor is one node however often it is used, so the count itself is cheap.
    """

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node


def _check_expanded_size(root) -> int:
    """Values in a composed YAML document with every alias written out: [&a [1, 2], *a] -> 7
    (the outer list, two inner lists, four numbers). Refuses more than MAX_CONFIG_VALUES, and an
    alias inside its own anchor (&a [*a]: never ends), with a yaml error pointing at it."""
    size, open_ = {}, set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            open_.discard(id(node))
            size[id(node)] = 1 + sum(size[id(k)] for k in _children(node))
            if size[id(node)] > MAX_CONFIG_VALUES:
                raise yaml.composer.ComposerError(
                    None, None, f"aliases here expand to more than {MAX_CONFIG_VALUES} values; a nanopipe config "
                    "needs a few hundred: write the values out instead of nesting aliases", node.start_mark)
            continue
        if id(node) in size:
            continue
        open_.add(id(node))
        stack.append((node, True))
        for kid in _children(node):
            if id(kid) in open_:
                raise yaml.composer.ComposerError(
                    None, None, "an alias inside its own anchor (a value that contains itself)", kid.start_mark)
            if id(kid) not in size:
                stack.append((kid, False))
    return size[id(root)]


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _load_yaml(config_dir: str, name: str) -> tuple:
    path = config_path(config_dir, name)
    try:
        with open(path) as f:
            if os.fstat(f.fileno()).st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; a nanopipe config is a few KB: "
                                  "is this the right file?")
            data = yaml.load(f, Loader=_BoundedLoader)
    except FileNotFoundError:
        guide = f" (or the guide's {GUIDE_FILE_NAMES[name]})" if name in GUIDE_FILE_NAMES else ""
        raise ConfigNotFound(f"{path}: not found; pass --config-dir pointing at a folder with {name}{guide}; "
                             "the repository's configs/ is an example") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not text ({e.reason} at byte {e.start}); a config is a UTF-8 YAML file") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a nanopipe config") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data, path


def _names(names, most: int = 10) -> str:
    """Names from a config file for a message, at most `most` of them, each cut:
    _names(["mini1", "mini2"]) -> "mini1, mini2"; 30 hosts -> "h0, h1, ..., h9, ... (30 in all)"."""
    names = [str(n) for n in names]
    text = ", ".join(shown(n, 40).strip("'\"") for n in names[:most])
    return text if len(names) <= most else f"{text}, ... ({len(names)} in all)"


def did_you_mean(word, known) -> str:
    """" (did you mean 'auth_token'?)" for a near miss, else the list of what is known."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(str(word), known, n=1)
    if close:
        return f" (did you mean {shown(close[0])}?)"
    return f" (known: {_names(known)})" if known else ""


def _check_keys(d: dict, known, where: str):
    """Refuse any key of `d` not in `known`: a misspelled key must never be silently ignored."""
    for key in d:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {shown(key)}{did_you_mean(key, known)}")


def _get(d: dict, key: str, kind, where: str, default=...):
    """d[key] checked against `kind` (a type or tuple of types); `default` makes it optional."""
    if key not in d or d[key] is None:
        if default is ...:
            raise ConfigError(f"{where}: missing key {shown(key)}")
        return default
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        hint = (f" (write {key}: true or {key}: false, without quotes)" if kinds == (bool,) else "")
        raise ConfigError(f"{where}: key {shown(key)} must be {names}, got {shown(value)}{hint}")
    return value


def _int(d: dict, key: str, where: str, default=..., lo: int | None = None, hi: int | None = None):
    """An int key within [lo, hi]."""
    value = _get(d, key, int, where, default)
    if value is not None and (lo is not None and value < lo or hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"{where}: {shown(key)} must be {bound}, got {shown(value)}")
    return value


def _real(d: dict, key: str, where: str, default=..., lo: float = 0.0, above: bool = False,
          hi: float | None = None):
    """A number key (int or float), finite, >= lo (> lo with above=True) and <= hi."""
    value = _get(d, key, (int, float), where, default)
    if value is None:
        return None
    value = float(value)
    low_ok = value > lo if above else value >= lo
    if not (math.isfinite(value) and low_ok and (hi is None or value <= hi)):
        bound = f"{'>' if above else '>='} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
        raise ConfigError(f"{where}: {shown(key)} must be a number {bound}, got {shown(d[key])}")
    return value


def _str(d: dict, key: str, where: str, default=...):
    """A non-empty string key."""
    value = _get(d, key, str, where, default)
    if value is not None and not value.strip():
        raise ConfigError(f"{where}: {shown(key)} is empty")
    return value


# ---------------------------------------------------------------------------------------------
# model_config.yaml


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hf_model_name: str
    weights_model_name: str
    num_layers: int
    num_nodes: int
    max_new_tokens: int
    active_decoding_strategy: str
    decoding_strategies: dict
    n_head: int | None = None
    partition: str | None = None     # None: even, or auto when the nodes' measurements differ (leader.py)
    layer_mapping: dict | None = None
    placement_objective: str = "throughput"

    def decoding_defaults(self) -> dict:
        """The dict sampling_params.make_params() takes as defaults."""
        return {"active_decoding_strategy": self.active_decoding_strategy, "max_new_tokens": self.max_new_tokens,
                "decoding_strategies": self.decoding_strategies}


_MODEL_LAYOUTS = """the two accepted shapes are
  the guide's: model entries at the top level      or entries under 'models:'
    default_model: gpt2     # needed with 2+ models   default_model: gpt2
    gpt2:                                           models:
      hf_model_name: gpt2                             gpt2:
      num_layers: 12                                    hf_model_name: gpt2
      ...                                               num_layers: 12"""

_WEIGHTS_LAYOUTS = """the two accepted shapes are
  the guide's: entries under 'models:'     or entries at the top level
    models:                                  gpt2:
      gpt2:                                    url: https://...
        url: https://...                       filename: gpt2.safetensors
        filename: gpt2.safetensors"""


def _model_entries(data: dict, path: str) -> tuple:
    """(entries, prefix) from either layout of model_config.yaml; prefix names where they sit."""
    if "models" in data:
        models = _get(data, "models", dict, path)
        for key, value in data.items():
            if key in MODEL_FILE_KEYS:
                continue
            if isinstance(value, dict):
                raise ConfigError(f"{path}: model {shown(key)} is at the top level but other models are under "
                                  f"'models:'; use one layout for all; {_MODEL_LAYOUTS}")
            _check_keys({key: value}, MODEL_FILE_KEYS, path)
        if any(key in MODEL_KEYS for key in models):
            settings = ", ".join(k for k in models if k in MODEL_KEYS)
            raise ConfigError(f"{path}: 'models:' holds model settings ({settings}) rather than named model "
                              f"entries; {_MODEL_LAYOUTS}")
        return models, "models."
    entries = {}
    for key, value in data.items():
        if key in MODEL_FILE_KEYS:
            continue
        if isinstance(value, dict):
            entries[key] = value
        elif key in MODEL_KEYS:
            raise ConfigError(f"{path}: {shown(key)} is at the top level; it belongs inside a model entry "
                              f"(indent it under the model's name); {_MODEL_LAYOUTS}")
        elif difflib.get_close_matches(str(key), MODEL_FILE_KEYS, n=1):
            raise ConfigError(f"{path}: unknown key {shown(key)}{did_you_mean(key, MODEL_FILE_KEYS)}")
        else:
            raise ConfigError(f"{path}: top-level key {shown(key)} is neither a model entry (a mapping of settings) "
                              f"nor one of {', '.join(MODEL_FILE_KEYS)}; {_MODEL_LAYOUTS}")
    return entries, ""


def _decoding_strategies(value: dict, where: str) -> dict:
    """Check each strategy's section: a known strategy, known keys, values in range."""
    out = {}
    for name, params in value.items():
        here = f"{where}.decoding_strategies.{_names([name])}"
        if name not in STRATEGY_USES:
            raise ConfigError(f"{where}: decoding_strategies: unknown strategy {shown(name)}"
                              f"{did_you_mean(name, STRATEGY_USES)}")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ConfigError(f"{here}: expected a mapping of parameters, e.g. {{temperature: 1.0}}")
        _check_keys(params, section_keys(name), here)
        if "k" in params and "top_k" in params or "p" in params and "top_p" in params:
            raise ConfigError(f"{here}: give 'k' or 'top_k' ('p' or 'top_p'), not both")
        for key in params:          # each in its knob's range (sampling_params.KNOB_RANGES), top_k an integer
            knob = KNOB_RANGES[SECTION_KEYS[key]]
            if SECTION_KEYS[key] == "top_k":
                _int(params, key, here, default=None, lo=int(knob.lo), hi=knob.hi)
            else:
                _real(params, key, here, default=None, lo=knob.lo, above=knob.above, hi=knob.hi)
        out[name] = dict(params)
    return out


def _model_entry(name, m, where: str) -> ModelConfig:
    if not isinstance(m, dict):
        raise ConfigError(f"{where}: expected a mapping of the model's settings")
    _check_keys(m, MODEL_KEYS, where)
    strategies = _get(m, "decoding_strategies", dict, where, default=None)
    strategies = (_decoding_strategies(strategies, where) if strategies is not None
                  else {k: dict(v) for k, v in DEFAULT_DECODING["decoding_strategies"].items()})
    cfg = ModelConfig(
        name=str(name),
        hf_model_name=_str(m, "hf_model_name", where),
        weights_model_name=_str(m, "weights_model_name", where),
        num_layers=_int(m, "num_layers", where, lo=1),
        num_nodes=_int(m, "num_nodes", where, lo=1),
        max_new_tokens=_int(m, "max_new_tokens", where, default=DEFAULT_DECODING["max_new_tokens"], lo=1),
        active_decoding_strategy=_str(m, "active_decoding_strategy", where,
                                      default=DEFAULT_DECODING["active_decoding_strategy"]),
        decoding_strategies=strategies,
        n_head=_int(m, "n_head", where, default=None, lo=1),
        partition=_str(m, "partition", where, default=None),
        layer_mapping=_get(m, "layer_mapping", dict, where, default=None),
        placement_objective=_str(m, "placement_objective", where, default="throughput"),
    )
    if cfg.placement_objective not in OBJECTIVES:
        raise ConfigError(f"{where}: unknown placement_objective {shown(cfg.placement_objective)}"
                          f"{did_you_mean(cfg.placement_objective, OBJECTIVES)}")
    if cfg.active_decoding_strategy not in cfg.decoding_strategies:
        raise ConfigError(f"{where}: active_decoding_strategy {shown(cfg.active_decoding_strategy)} is not one of "
                          f"decoding_strategies ({', '.join(cfg.decoding_strategies)})"
                          f"{did_you_mean(cfg.active_decoding_strategy, cfg.decoding_strategies)}")
    if cfg.num_nodes > cfg.num_layers and cfg.layer_mapping is None:      # (a mapping may split layers)
        raise ConfigError(f"{where}: num_nodes is {cfg.num_nodes} but the model has {cfg.num_layers} layers; "
                          "every node needs at least one layer")
    if cfg.partition is not None and cfg.partition not in _partition.STRATEGIES:
        raise ConfigError(f"{where}: unknown partition {shown(cfg.partition)}"
                          f"{did_you_mean(cfg.partition, _partition.STRATEGIES)}")
    if cfg.layer_mapping is not None:
        if cfg.partition not in (None, "even", "mapping"):
            raise ConfigError(f"{where}: layer_mapping is given but partition is {shown(cfg.partition)}, which would "
                              "ignore it; remove one of the two (with a layer_mapping, partition may be left out)")
        try:
            _partition.from_mapping(cfg.layer_mapping, cfg.num_layers, cfg.num_nodes, n_head=cfg.n_head)
        except _partition.PartitionError as e:
            raise ConfigError(f"{where}: {e}") from None
    elif cfg.partition == "mapping":
        raise ConfigError(f"{where}: partition is 'mapping' but there is no layer_mapping")
    return cfg


def load_model_config(config_dir: str = DEFAULT_CONFIG_DIR, name: str | None = None) -> ModelConfig:
    """The model entry `name` (else default_model, else the only entry), every entry checked.

    Two layouts are accepted: the guide's, model entries at the top level under any name
    (`causal_gpt2: {hf_model_name: ..., ...}`), and entries under `models:`.
    """
    data, path = _load_yaml(config_dir, "model_config.yaml")
    entries, prefix = _model_entries(data, path)
    if not entries:
        raise ConfigError(f"{path}: no model entries; {_MODEL_LAYOUTS}")
    models = {key: _model_entry(key, m, f"{path}: {prefix}{_names([key])}") for key, m in entries.items()}
    default = _str(data, "default_model", path, default=None)
    if default is not None and default not in models:
        raise ConfigError(f"{path}: default_model {shown(default)} is not one of the models "
                          f"({_names(models)}){did_you_mean(default, models)}")
    name = name or default
    if name is None:
        if len(models) > 1:
            raise ConfigError(f"{path}: {len(models)} models ({_names(models)}) and no default_model; "
                              "add `default_model: NAME` to the file or pass --model NAME")
        name = next(iter(models))
    if name not in models:
        raise ConfigError(f"{path}: no model {shown(name)}; known: {_names(models)}")
    return models[name]


# ---------------------------------------------------------------------------------------------
# model_weights.yaml


@dataclass(frozen=True)
class WeightsSource:
    name: str
    url: str
    filename: str
    sha256: str | None = None
    size: int | None = None


def _weights_entries(data: dict, path: str) -> tuple:
    """(entries, prefix) from either layout of model_weights.yaml."""
    if "models" in data and isinstance(data["models"], dict) and not set(data["models"]) & set(WEIGHTS_KEYS):
        others = [k for k in data if k != "models"]
        if others:
            raise ConfigError(f"{path}: has both a 'models:' section and top-level entries "
                              f"({_names(others)}); use one layout for all; {_WEIGHTS_LAYOUTS}")
        return data["models"], "models."
    if set(data) & set(WEIGHTS_KEYS):
        raise ConfigError(f"{path}: {', '.join(k for k in WEIGHTS_KEYS if k in data)} at the top level; "
                          f"they belong inside an entry named after the model; {_WEIGHTS_LAYOUTS}")
    return data, ""


WEIGHTS_DIR = "weights"      # where every node keeps its weights files, relative to where it runs


def weights_file(name, folder: str = WEIGHTS_DIR, what: str = "weights file name") -> str:
    """`folder/name`, for a file name that came from outside (a config, a leader, a server), once it
    is certain to be a plain file name: the one rule for turning such a name into a path.

        weights_file("gpt2.safetensors")               -> "weights/gpt2.safetensors"
        weights_file("../../escape/evil.safetensors")  -> ConfigError (it names a path, not a file)

    Refused (ConfigError saying why; `what` says where the name came from): anything but a string,
    empty, "." or "..", a separator of either system ("/" or "\\"), a drive or stream (":"), NUL or
    another control character, more than 255 characters. Nothing is cleaned up quietly: a name
    that needs cleaning is not one a real config or leader sends.
    """
    shown = repr(name) if not isinstance(name, str) else repr(name[:80] + ("..." if len(name) > 80 else ""))
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what} {shown} must be a non-empty file name")
    bad = ("is a directory name" if name in (".", "..") else
           "holds a path separator" if "/" in name or "\\" in name else
           "holds ':' (a drive or stream on Windows)" if ":" in name else
           "holds a control character" if any(ord(c) < 32 or ord(c) == 127 for c in name) else
           "is longer than 255 characters" if len(name) > 255 else None)
    if bad is not None:
        raise ConfigError(f"{what} {shown} {bad}; it must be a plain file name inside {folder}/ "
                          "(e.g. gpt2.safetensors)")
    return os.path.join(folder, name)


def _weights_entry(name, entry, where: str) -> WeightsSource:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with url and filename")
    _check_keys(entry, WEIGHTS_KEYS, where)
    src = WeightsSource(name=str(name), url=_str(entry, "url", where), filename=_str(entry, "filename", where),
                        sha256=_str(entry, "sha256", where, default=None),
                        size=_int(entry, "size", where, default=None, lo=0))
    weights_file(src.filename, what=f"{where}: 'filename'")
    if src.sha256 is not None and not (len(src.sha256) == 64 and all(c in string.hexdigits for c in src.sha256)):
        raise ConfigError(f"{where}: 'sha256' must be 64 hex digits, got {shown(src.sha256)}")
    return src


def load_weights_config(config_dir: str = DEFAULT_CONFIG_DIR, name: str = "gpt2") -> WeightsSource:
    """Where model `name`'s weights come from; every entry of the file is checked.

    Two layouts are accepted: the guide's, entries under `models:`, and entries at the top level.
    """
    data, path = _load_yaml(config_dir, "model_weights.yaml")
    entries, prefix = _weights_entries(data, path)
    sources = {key: _weights_entry(key, e, f"{path}: {prefix}{_names([key])}") for key, e in entries.items()}
    if name not in sources:
        raise ConfigError(f"{path}: no entry for model {shown(name)}; known: {_names(sources)}")
    return sources[name]


# ---------------------------------------------------------------------------------------------
# cluster_config.yaml


@dataclass(frozen=True)
class Node:
    rank: int
    host: str          # the name in host_ip
    ip: str
    port: int          # where this node listens: the leader's port, or a worker's data port


@dataclass(frozen=True)
class ClusterConfig:
    port: int
    nodes: tuple                     # Node per rank, rank 0 first
    bind: str | None = None          # None: bind each node's own address from host_ip
    max_sessions: int = 16
    rejoin_grace_s: float = 30.0
    heartbeat_s: float = 1.0
    auth_token: str | None = field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    api_token: str | None = field(default=None, repr=False)
    cors_origins: tuple = ()
    pipeline_depth: int | None = None  # batches in flight round the ring; None: see depth()
    link_delay_ms: float = 0.0       # a simulated link on every hop (benchmarks; cluster.node.LinkModel): latency ...
    link_mbps: float = 0.0           # ... and bandwidth (0 = no limit)
    node_overrides: dict = field(default_factory=dict)   # host -> {speed_gbps, speed8_gbps, memory_mb}
    prefix_cache_mb: float | None = None   # kept KV caches per stage (nanopipe/prefix.py); None: see below
    split_stages: bool = True        # partition auto may make workers a split stage (cluster/split_plan.py)
    # a ring that ends in a split stage: its members MAY run the LM head, each for its share of the
    # vocabulary (cluster/group.py): partition auto puts it there if predicted sooner than on rank 0
    # (cluster/split_plan.py), a layer_mapping does; False keeps it on rank 0. Only the leader reads it.
    split_lm_head: bool = True
    path: str = ""

    def prefix_cache_bytes(self) -> int:
        """This node's budget for finished sessions' KV caches kept for reuse: prefix_cache_mb
        (0 turns reuse off), or unset, 1/8 of the memory this node can allocate now."""
        if self.prefix_cache_mb is not None:
            return int(self.prefix_cache_mb * 2**20)
        from .prefix import default_prefix_cache_bytes
        return default_prefix_cache_bytes()

    def depth(self) -> int:
        """How many batches the leader keeps in flight round the ring.

        Stages on separate machines work at the same time, so with one batch per machine every
        stage has work (sessions are split into that many groups). Stages that share a machine
        share its cores: splitting then only makes more, smaller matmuls, which cost more per row
        (on 2 cores, about 3x slower than one batch: docs/PERFORMANCE.md, "Concurrency").
        So the default is the number of distinct hosts; `pipeline_depth` overrides it.
        """
        if self.pipeline_depth:
            return self.pipeline_depth
        return len({n.ip for n in self.nodes})

    @property
    def num_workers(self) -> int:
        return len(self.nodes) - 1

    @property
    def leader(self) -> Node:
        return self.nodes[0]

    def node(self, rank: int) -> Node:
        if not 0 <= rank < len(self.nodes):
            raise ConfigError(f"{self.path}: no rank {rank}; ranks are 0..{len(self.nodes) - 1}")
        return self.nodes[rank]

    def rank_of(self, host: str) -> int:
        ranks = [n.rank for n in self.nodes if n.host == host]
        if not ranks:
            raise ConfigError(f"{self.path}: host {shown(host)} is not in host_ip/workers; "
                              f"known: {_names(n.host for n in self.nodes)}")
        return ranks[0]

    def resolve(self, addr: str) -> str:
        """A --leader HOST:PORT whose HOST is a name in host_ip (`mini1:65432`, as the README writes
        it) -> that host's address; a name alone gets the leader's port; anything else as given.

            resolve("mini1:65432") -> "10.10.0.1:65432"     resolve("mini1") -> "10.10.0.1:65432"
            resolve("10.0.0.9:7000") -> "10.0.0.9:7000"
        """
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit():
            host, port = addr, None
        ips = {n.host: n.ip for n in self.nodes}
        if host not in ips:
            return addr
        return f"{ips[host]}:{port if port is not None else self.leader.port}"

    def to_wire(self, for_host: str | None = None) -> dict:
        """The cluster as the leader tells it to a worker that joins with only its address
        (`nanopipe join --leader`); ClusterConfig.from_wire reads it back. JSON-able, and never the
        secrets or this machine's own files (auth_token, api_token, tls_cert, tls_key, cors_origins):
        the worker has its own. `for_host`: send only that node's entry of node_overrides.

            {"nodes": [[0, "mini1", "10.10.0.1", 65432], [1, "mini2", "10.10.0.2", 65433]],
             "port": 65432, "bind": None, "max_sessions": 16, ...}
        """
        overrides = self.node_overrides if for_host is None else \
            {h: o for h, o in self.node_overrides.items() if h == for_host}
        return {"nodes": [[n.rank, n.host, n.ip, n.port] for n in self.nodes], "port": self.port, "bind": self.bind,
                "max_sessions": self.max_sessions, "rejoin_grace_s": self.rejoin_grace_s,
                "heartbeat_s": self.heartbeat_s, "pipeline_depth": self.pipeline_depth,
                "link_delay_ms": self.link_delay_ms, "link_mbps": self.link_mbps,
                "node_overrides": {h: dict(o) for h, o in overrides.items()}, "prefix_cache_mb": self.prefix_cache_mb}

    @classmethod
    def from_wire(cls, data, where: str) -> ClusterConfig:
        """The ClusterConfig a leader sent (to_wire's dict), checked as cluster_config.yaml is:
        a missing, unknown, mistyped or out-of-range field is a ConfigError naming `where` (who sent
        it) and the field. The secrets are not in it: the caller adds its own (dataclasses.replace)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: the cluster must be a mapping, got {shown(data)}")
        _check_keys(data, WIRE_KEYS, where)
        nodes = []
        for i, entry in enumerate(_get(data, "nodes", list, where)):
            here = f"{where}: nodes[{i}]"
            if not isinstance(entry, list) or len(entry) != 4:
                raise ConfigError(f"{here}: expected [rank, host, ip, port], got {shown(entry)}")
            n = dict(zip(("rank", "host", "ip", "port"), entry))
            node = Node(_int(n, "rank", here, lo=0), _str(n, "host", here), _str(n, "ip", here),
                        _int(n, "port", here, lo=1, hi=65535))
            if node.rank != i:
                raise ConfigError(f"{here}: rank {node.rank} in place {i}; the nodes go by rank, 0 (the leader) first")
            nodes.append(node)
        if not nodes:
            raise ConfigError(f"{where}: 'nodes' is empty; a cluster has at least its leader")
        return cls(
            port=_int(data, "port", where, lo=1, hi=65535), nodes=tuple(nodes),
            bind=_str(data, "bind", where, default=None),
            max_sessions=_int(data, "max_sessions", where, default=16, lo=1),
            rejoin_grace_s=_real(data, "rejoin_grace_s", where, default=30.0),
            heartbeat_s=_real(data, "heartbeat_s", where, default=1.0, above=True),
            pipeline_depth=_int(data, "pipeline_depth", where, default=None, lo=1),
            link_delay_ms=_real(data, "link_delay_ms", where, default=0.0),
            link_mbps=_real(data, "link_mbps", where, default=0.0),
            node_overrides=_node_overrides(data, where, {n.host for n in nodes}, key="node_overrides"),
            prefix_cache_mb=_real(data, "prefix_cache_mb", where, default=None), path=where)


# what ClusterConfig.to_wire sends: the cluster without its secrets and local files
WIRE_KEYS = ("nodes", "port", "bind", "max_sessions", "rejoin_grace_s", "heartbeat_s", "pipeline_depth",
             "link_delay_ms", "link_mbps", "node_overrides", "prefix_cache_mb")


def load_cluster_config(config_dir: str = DEFAULT_CONFIG_DIR) -> ClusterConfig:
    """Who is where. The guide's file works as written:

        host_ip: {mini1: "10.10.0.1", mini2: "10.10.0.2", pi5: "192.168.50.2"}
        port: 65432
        num_workers: 2
        workers: [mini2, pi5]        # or mappings {rank, host, port}
        server: mini1
    """
    data, path = _load_yaml(config_dir, "cluster_config.yaml")
    _check_keys(data, CLUSTER_KEYS, path)
    host_ip = _get(data, "host_ip", dict, path)
    for host, ip in host_ip.items():
        if not isinstance(ip, str) or not ip.strip():
            raise ConfigError(f"{path}: host_ip.{_names([host])} must be an address (a string such as \"10.10.0.2\"), "
                              f"got {shown(ip)}")
    port = _int(data, "port", path, lo=1, hi=65535)
    server = _str(data, "server", path)
    workers = _get(data, "workers", list, path)
    num_workers = _int(data, "num_workers", path, lo=0)
    if num_workers != len(workers):
        raise ConfigError(f"{path}: num_workers is {num_workers} but 'workers' lists {len(workers)}")

    def ip_of(host, where):
        if host not in host_ip:
            raise ConfigError(f"{path}: {where} names host {shown(host)}, which is not in host_ip "
                              f"(known: {_names(host_ip)}){did_you_mean(host, host_ip)}")
        return str(host_ip[host])

    nodes = [Node(0, server, ip_of(server, "server"), port)]
    for i, w in enumerate(workers):
        where = f"{path}: workers[{i}]"
        if isinstance(w, str):
            w = {"host": w}
        if not isinstance(w, dict):
            raise ConfigError(f"{where}: expected a host name or a mapping with host (and optional rank, port)")
        _check_keys(w, WORKER_KEYS, where)
        rank = _int(w, "rank", where, default=i + 1, lo=1)
        host = _str(w, "host", where)
        wport = _get(w, "port", int, where, default=None)
        if wport is None and port + rank > 65535:
            raise ConfigError(f"{where}: rank {rank} would listen on port {port} + {rank} = {port + rank}, above "
                              "65535; give it its own 'port' or lower 'port'")
        nodes.append(Node(rank, host, ip_of(host, f"workers[{i}]"),
                          _int(w, "port", where, lo=1, hi=65535) if wport is not None else port + rank))
    ranks = sorted(n.rank for n in nodes)
    if ranks != list(range(len(nodes))):
        raise ConfigError(f"{path}: worker ranks must be 1..{len(nodes) - 1}, each once; got {shown(ranks[1:])}")
    nodes.sort(key=lambda n: n.rank)
    unused = [str(h) for h in host_ip if h not in {n.host for n in nodes}]
    if unused:
        raise ConfigError(f"{path}: host_ip lists {_names(unused)}, which is neither the server nor in workers; "
                          "add it to workers (and num_workers) or remove it from host_ip")
    seen = {}
    for n in nodes:
        key = (n.ip, n.port)
        if key in seen:
            raise ConfigError(f"{path}: ranks {seen[key]} and {n.rank} both listen on {n.ip}:{n.port}; "
                              "give one of them its own 'port'")
        seen[key] = n.rank
    token = os.environ.get("NANOPIPE_TOKEN") or _str(data, "auth_token", path, default=None)
    origins = _get(data, "cors_origins", list, path, default=[])
    for i, o in enumerate(origins):
        if not isinstance(o, str) or not o.strip():
            raise ConfigError(f"{path}: cors_origins[{i}] must be an origin such as \"http://localhost:8000\", "
                              f"got {shown(o)}")
    tls_cert, tls_key = _str(data, "tls_cert", path, default=None), _str(data, "tls_key", path, default=None)
    if tls_key and not tls_cert:
        raise ConfigError(f"{path}: tls_key is set but tls_cert is not; TLS needs the certificate (tls_cert), "
                          "the key alone does nothing")
    return ClusterConfig(
        port=port, nodes=tuple(nodes), bind=_str(data, "bind", path, default=None),
        max_sessions=_int(data, "max_sessions", path, default=16, lo=1),
        rejoin_grace_s=_real(data, "rejoin_grace_s", path, default=30.0),
        heartbeat_s=_real(data, "heartbeat_s", path, default=1.0, above=True),
        auth_token=token, tls_cert=tls_cert, tls_key=tls_key,
        api_token=_str(data, "api_token", path, default=None),
        cors_origins=tuple(origins), path=path,
        pipeline_depth=_int(data, "pipeline_depth", path, default=None, lo=1),
        link_delay_ms=_real(data, "link_delay_ms", path, default=0.0),
        link_mbps=_real(data, "link_mbps", path, default=0.0),
        node_overrides=_node_overrides(data, path, {n.host for n in nodes}),
        prefix_cache_mb=_real(data, "prefix_cache_mb", path, default=None),
        split_stages=_get(data, "split_stages", bool, path, default=True),
        split_lm_head=_get(data, "split_lm_head", bool, path, default=True),
    )


def _node_overrides(data: dict, path: str, hosts: set, key: str = "nodes") -> dict:
    """`nodes: {pi5: {speed_gbps: 9, memory_mb: 3000}}`: what a node would measure, given instead
    (a node's own figures are replaced key by key; see placement.measure). On the wire the key is
    `node_overrides` (`nodes` there is the list of nodes)."""
    nodes = _get(data, key, dict, path, default={})
    out = {}
    for host, entry in nodes.items():
        where = f"{path}: {key}.{_names([host])}"
        if host not in hosts:
            raise ConfigError(f"{where}: no host {shown(host)} in host_ip{did_you_mean(host, sorted(hosts))}")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping such as {{speed_gbps: 9, memory_mb: 3000}}")
        _check_keys(entry, NODE_KEYS, where)
        out[str(host)] = {k: _real(entry, k, where, above=True) for k in NODE_KEYS if k in entry}
    return out


def check_agree(mc: ModelConfig, cc: ClusterConfig, model_path: str = "model_config.yaml"):
    """model_config.yaml's num_nodes must be the cluster's size: one rank per node."""
    if mc.num_nodes != len(cc.nodes):
        raise ConfigError(f"{model_path}: {mc.name}: num_nodes={mc.num_nodes} but {cc.path} has {len(cc.nodes)} "
                          f"nodes (server + {cc.num_workers} workers); make them agree")


# ---------------------------------------------------------------------------------------------
# one command's configs


class Configs:
    """The configs one command works from: each file read once, when first needed, then passed on
    as this object (the CLI keeps it in click's context; planning and the setup of a node take it).

        configs = Configs("configs")                 # nothing read yet
        configs.model                                # model_config.yaml's entry (--model, else the default)
        configs.cluster                              # cluster_config.yaml
        configs.cluster_or_none()                    # None without a cluster file (a broken one: ConfigError)
        configs.weights()                            # model_weights.yaml's entry for the model's weights

    A file that failed to load fails the same way when asked again, without being read again.
    """

    def __init__(self, config_dir: str = DEFAULT_CONFIG_DIR, model_name: str | None = None):
        self.dir = config_dir
        self.model_name = model_name
        self._loaded: dict = {}         # what -> the config, or the ConfigError loading it raised

    def for_model(self, model_name: str | None) -> Configs:
        """These configs with model entry `model_name` chosen (what is read already is kept)."""
        if model_name == self.model_name:
            return self
        other = Configs(self.dir, model_name)
        other._loaded = {k: v for k, v in self._loaded.items() if k != "model"}
        return other

    def _once(self, what, load):
        if what not in self._loaded:
            try:
                self._loaded[what] = load()
            except ConfigError as e:
                self._loaded[what] = e
        got = self._loaded[what]
        if isinstance(got, ConfigError):
            raise got
        return got

    @property
    def model(self) -> ModelConfig:
        return self._once("model", lambda: load_model_config(self.dir, self.model_name))

    @property
    def cluster(self) -> ClusterConfig:
        return self._once("cluster", lambda: load_cluster_config(self.dir))

    def cluster_or_none(self) -> ClusterConfig | None:
        """cluster_config.yaml if the folder has one, else None; a broken one is an error."""
        try:
            return self.cluster
        except ConfigNotFound:
            return None

    def weights(self, name: str | None = None) -> WeightsSource:
        """Where model `name`'s weights come from (default: the model's weights_model_name)."""
        name = name or self.model.weights_model_name
        return self._once(("weights", name), lambda: load_weights_config(self.dir, name))

    def path(self, name: str) -> str:
        """Where file `name` is read from (config_path): for messages."""
        return config_path(self.dir, name)
