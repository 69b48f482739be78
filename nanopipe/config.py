"""The three YAML files in configs/, read into small frozen dataclasses.

    model_config.yaml    which model, how many nodes, how to split it, decoding defaults
    cluster_config.yaml  who is where: host_ip map, ports, which rank runs on which host
    model_weights.yaml   where each model's weights come from

Config is data: nothing here is global; commands read it once and pass it on. A missing or
mistyped key is a ConfigError naming the file and the key.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import yaml

DEFAULT_CONFIG_DIR = "configs"


class ConfigError(ValueError):
    """A config file is missing, malformed, or has a missing or mistyped key."""


def _load_yaml(config_dir: str, name: str) -> tuple:
    path = os.path.join(config_dir, name)
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; pass --config-dir pointing at a folder with {name} "
                          "(the repository's configs/ is an example)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data, path


def _get(d: dict, key: str, kind, where: str, default=...):
    """d[key] checked against `kind` (a type or tuple of types); `default` makes it optional."""
    if key not in d or d[key] is None:
        if default is ...:
            raise ConfigError(f"{where}: missing key '{key}'")
        return default
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{where}: key '{key}' must be {names}, got {value!r}")
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
    partition: str = "even"
    layer_mapping: dict | None = None

    def decoding_defaults(self) -> dict:
        """The dict decoding.make_params() takes as defaults."""
        return {"active_decoding_strategy": self.active_decoding_strategy, "max_new_tokens": self.max_new_tokens,
                "decoding_strategies": self.decoding_strategies}


def load_model_config(config_dir: str = DEFAULT_CONFIG_DIR, name: str | None = None) -> ModelConfig:
    data, path = _load_yaml(config_dir, "model_config.yaml")
    models = _get(data, "models", dict, path)
    name = name or _get(data, "default_model", str, path, default=None) or next(iter(models), None)
    if name not in models:
        raise ConfigError(f"{path}: no model '{name}'; known: {', '.join(map(str, models))}")
    m = models[name]
    where = f"{path}: models.{name}"
    if not isinstance(m, dict):
        raise ConfigError(f"{where}: expected a mapping")
    strategies = _get(m, "decoding_strategies", dict, where)
    for s, params in strategies.items():
        if params is not None and not isinstance(params, dict):
            raise ConfigError(f"{where}.decoding_strategies.{s}: expected a mapping of parameters")
    cfg = ModelConfig(
        name=name,
        hf_model_name=_get(m, "hf_model_name", str, where),
        weights_model_name=_get(m, "weights_model_name", str, where),
        num_layers=_get(m, "num_layers", int, where),
        num_nodes=_get(m, "num_nodes", int, where),
        max_new_tokens=_get(m, "max_new_tokens", int, where),
        active_decoding_strategy=_get(m, "active_decoding_strategy", str, where),
        decoding_strategies={k: dict(v or {}) for k, v in strategies.items()},
        n_head=_get(m, "n_head", int, where, default=None),
        partition=_get(m, "partition", str, where, default="even"),
        layer_mapping=_get(m, "layer_mapping", dict, where, default=None),
    )
    if cfg.active_decoding_strategy not in cfg.decoding_strategies:
        raise ConfigError(f"{where}: active_decoding_strategy '{cfg.active_decoding_strategy}' is not one of "
                          f"decoding_strategies ({', '.join(cfg.decoding_strategies)})")
    for key in ("num_layers", "num_nodes", "max_new_tokens"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{where}: '{key}' must be >= 1")
    return cfg


# ---------------------------------------------------------------------------------------------
# model_weights.yaml


@dataclass(frozen=True)
class WeightsSource:
    name: str
    url: str
    filename: str
    sha256: str | None = None
    size: int | None = None


def load_weights_config(config_dir: str = DEFAULT_CONFIG_DIR, name: str = "gpt2") -> WeightsSource:
    data, path = _load_yaml(config_dir, "model_weights.yaml")
    if name not in data:
        raise ConfigError(f"{path}: no entry for model '{name}'; known: {', '.join(map(str, data))}")
    where = f"{path}: {name}"
    entry = data[name]
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with url and filename")
    return WeightsSource(name=name, url=_get(entry, "url", str, where), filename=_get(entry, "filename", str, where),
                         sha256=_get(entry, "sha256", str, where, default=None),
                         size=_get(entry, "size", int, where, default=None))


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
    link_delay_ms: float = 0.0       # a simulated link on every hop (benchmarks): latency ...
    link_mbps: float = 0.0           # ... and bandwidth (0 = no limit)
    path: str = ""

    def depth(self) -> int:
        """How many batches the leader keeps in flight round the ring.

        Stages on separate machines work at the same time, so with one batch per machine every
        stage has work (sessions are split into that many groups). Stages that share a machine
        share its cores: splitting then only makes more, smaller matmuls, which cost more per row
        (measured on 2 cores, 8 streams on a 3-node loopback cluster: 46 tok/s split three ways).
        So the default is the number of distinct hosts; `pipeline_depth` overrides it.
        """
        if self.pipeline_depth:
            return self.pipeline_depth
        return len({n.ip for n in self.nodes})

    def link_sleep(self, nbytes: int):
        """Wait as long as a hop over the simulated link would take: latency + bytes / bandwidth."""
        t = self.link_delay_ms / 1000 + (nbytes * 8 / (self.link_mbps * 1e6) if self.link_mbps > 0 else 0.0)
        if t > 0:
            time.sleep(t)

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
            raise ConfigError(f"{self.path}: host '{host}' is not in host_ip/workers; "
                              f"known: {', '.join(n.host for n in self.nodes)}")
        return ranks[0]


def load_cluster_config(config_dir: str = DEFAULT_CONFIG_DIR) -> ClusterConfig:
    data, path = _load_yaml(config_dir, "cluster_config.yaml")
    host_ip = _get(data, "host_ip", dict, path)
    port = _get(data, "port", int, path)
    server = _get(data, "server", str, path)
    workers = _get(data, "workers", list, path)
    num_workers = _get(data, "num_workers", int, path)
    if num_workers != len(workers):
        raise ConfigError(f"{path}: num_workers is {num_workers} but 'workers' lists {len(workers)}")

    def ip_of(host, where):
        if host not in host_ip:
            raise ConfigError(f"{path}: {where} names host '{host}', which is not in host_ip "
                              f"(known: {', '.join(map(str, host_ip))})")
        return str(host_ip[host])

    nodes = [Node(0, server, ip_of(server, "server"), port)]
    for i, w in enumerate(workers):
        where = f"{path}: workers[{i}]"
        if isinstance(w, str):
            w = {"host": w}
        if not isinstance(w, dict):
            raise ConfigError(f"{where}: expected a host name or a mapping with host (and optional rank, port)")
        rank = _get(w, "rank", int, where, default=i + 1)
        host = _get(w, "host", str, where)
        nodes.append(Node(rank, host, ip_of(host, f"workers[{i}]"), _get(w, "port", int, where, default=port + rank)))
    ranks = sorted(n.rank for n in nodes)
    if ranks != list(range(len(nodes))):
        raise ConfigError(f"{path}: worker ranks must be 1..{len(nodes) - 1}, each once; got {ranks[1:]}")
    nodes.sort(key=lambda n: n.rank)
    seen = {}
    for n in nodes:
        key = (n.ip, n.port)
        if key in seen:
            raise ConfigError(f"{path}: ranks {seen[key]} and {n.rank} both listen on {n.ip}:{n.port}; "
                              "give one of them its own 'port'")
        seen[key] = n.rank
    token = os.environ.get("NANOPIPE_TOKEN") or _get(data, "auth_token", str, path, default=None)
    origins = _get(data, "cors_origins", list, path, default=[])
    return ClusterConfig(
        port=port, nodes=tuple(nodes), bind=_get(data, "bind", str, path, default=None),
        max_sessions=_get(data, "max_sessions", int, path, default=16),
        rejoin_grace_s=float(_get(data, "rejoin_grace_s", (int, float), path, default=30.0)),
        heartbeat_s=float(_get(data, "heartbeat_s", (int, float), path, default=1.0)),
        auth_token=token, tls_cert=_get(data, "tls_cert", str, path, default=None),
        tls_key=_get(data, "tls_key", str, path, default=None),
        api_token=_get(data, "api_token", str, path, default=None),
        cors_origins=tuple(str(o) for o in origins), path=path,
        pipeline_depth=_get(data, "pipeline_depth", int, path, default=None),
        link_delay_ms=float(_get(data, "link_delay_ms", (int, float), path, default=0.0)),
        link_mbps=float(_get(data, "link_mbps", (int, float), path, default=0.0)),
    )
