"""A whole cluster on this machine: a leader and N-1 workers as real processes on 127.0.0.1.

`nanopipe demo`, `nanopipe bench --nodes N`, `nanopipe trace` and the tests use it:

    with LocalCluster("weights/x.safetensors", nodes=3) as cl:
        with cl.client() as c:
            c.generate("Hello", max_tokens=5)

It writes a config folder of its own (free ports, every host 127.0.0.1; or the `configs` it is
given, as `nanopipe demo` does) and runs exactly the commands a user runs on real machines:
`nanopipe serve --rank 0` and `nanopipe join --rank R`. It cleans up after itself:

- the leader starts first and the workers once it listens, so no worker dials a closed port;
- on Linux each node gets SIGTERM when the process that started it dies, even by SIGKILL
  (prctl PR_SET_PDEATHSIG), so no node outlives its cluster;
- stop() removes the temporary folder it made (its configs and the nodes' logs).
"""
from __future__ import annotations

import copy
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import yaml

from ..cluster.leader_client import ClientError, LeaderClient
from ..sampling_params import DEFAULT_DECODING
from ..weights import read_config


def free_ports(n: int, host: str = "127.0.0.1") -> list:
    """n distinct ports that were free a moment ago."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((host, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def write_configs(config_dir: str, *, weights: str, nodes: int, n_layer: int, partition: str = "even",
                  layer_mapping: dict | None = None, n_head: int | None = None, host: str = "127.0.0.1",
                  cluster_extra: dict | None = None, max_new_tokens: int = 20, hosts: list | None = None,
                  weights_url: str | None = None) -> dict:
    """Write model_config.yaml, cluster_config.yaml and model_weights.yaml for a local cluster.

    model_weights.yaml points at `weights_url` (default: the weights file itself, as a file:// url).
    """
    os.makedirs(config_dir, exist_ok=True)
    ports = free_ports(nodes, host)
    names = [f"node{r}" for r in range(nodes)]
    ips = hosts or [host] * nodes
    model = {"hf_model_name": "synthetic", "weights_model_name": "local", "num_layers": n_layer,
             "num_nodes": nodes, "partition": partition, "max_new_tokens": max_new_tokens,
             "active_decoding_strategy": DEFAULT_DECODING["active_decoding_strategy"],
             "decoding_strategies": copy.deepcopy(DEFAULT_DECODING["decoding_strategies"])}
    if n_head:
        model["n_head"] = n_head
    if layer_mapping:
        model["layer_mapping"] = layer_mapping
    cluster = {"host_ip": dict(zip(names, ips)), "server": names[0], "port": ports[0], "num_workers": nodes - 1,
               "workers": [{"rank": r, "host": names[r], "port": ports[r]} for r in range(1, nodes)],
               "max_sessions": 16, "rejoin_grace_s": 30}
    cluster.update(cluster_extra or {})
    files = {"model_config.yaml": {"default_model": "local", "models": {"local": model}},
             "cluster_config.yaml": cluster,
             "model_weights.yaml": {"local": {"url": weights_url or "file://" + os.path.abspath(weights),
                                              "filename": os.path.basename(weights)}}}
    write_yaml_files(config_dir, files)
    return cluster


def write_yaml_files(config_dir: str, files: dict):
    """{"cluster_config.yaml": {...}, ...} -> one YAML file each in config_dir."""
    os.makedirs(config_dir, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(config_dir, name), "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)


def _linux_prctl():
    """libc's prctl, looked up in the parent: the child between fork and exec should only call it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


PR_SET_PDEATHSIG = 1


def die_with_parent():
    """A Popen preexec_fn: on Linux, SIGTERM this child when its parent dies (even by SIGKILL), so a
    killed `nanopipe demo` or test run leaves no node behind. None where it cannot work: other
    systems, and threads other than the main one (the kernel signals the child when the *thread*
    that forked it ends, not the process)."""
    prctl = _linux_prctl()
    if prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def preexec():
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:      # the parent died before prctl: nobody will signal us
            os._exit(1)
    return preexec


class LocalCluster:
    """A leader and nodes-1 workers as real `nanopipe serve` / `join` processes on 127.0.0.1.

    `with LocalCluster(weights, nodes=3) as cl:` starts them and returns once the ring is up;
    `cl.client()` dials the leader with the cluster's own secret; `cl.logs()` is every node's log
    tail (for failure messages); leaving the block stops every node.
    """

    def __init__(self, weights: str, nodes: int = 3, *, workdir: str | None = None, partition: str = "even",
                 layer_mapping: dict | None = None, cluster_extra: dict | None = None, n_head: int | None = None,
                 env: dict | None = None, quiet: bool = True, ready_timeout: float = 120.0,
                 pull_ranks: tuple = (), weights_url: str | None = None, configs: dict | None = None,
                 wrap: dict | None = None):
        """`pull_ranks` start without --weights, as on a fresh machine: each looks for
        weights/<filename> under `workdir` (its working directory) and pulls what it lacks from the
        url in model_weights.yaml (`weights_url`; pulling a slice needs an HTTP server with Range).

        `configs` ({file name: data} for the three YAML files) replaces the generated ones.
        `wrap` ({rank: [argv prefix]}) runs that rank's command through a wrapper, e.g. one that
        puts it into a cgroup first (tests/cgroups.py).
        Without `workdir`, the cluster works in a temporary folder that stop() removes."""
        self.weights = os.path.abspath(weights)
        self.nodes = nodes
        self.owns_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="nanopipe-cluster-")
        self.config_dir = os.path.join(self.workdir, "configs")
        try:
            if configs is not None:
                write_yaml_files(self.config_dir, configs)
                self.cluster = configs["cluster_config.yaml"]
            else:
                cfg = read_config(self.weights, n_head)[0]
                self.cluster = write_configs(self.config_dir, weights=self.weights, nodes=nodes, n_layer=cfg.n_layer,
                                             partition=partition, layer_mapping=layer_mapping, n_head=n_head,
                                             cluster_extra=cluster_extra, weights_url=weights_url)
        except BaseException:
            if self.owns_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        self.pull_ranks = tuple(pull_ranks)
        self.wrap = dict(wrap or {})
        self.env = dict(os.environ, **(env or {}))
        # the secret its processes use: NANOPIPE_TOKEN wins over auth_token, as in config.py
        self.token = self.env.get("NANOPIPE_TOKEN") or self.cluster.get("auth_token")
        self.tls_ca = self.cluster.get("tls_cert")     # the pinned certificate is the CA
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.quiet = quiet
        self.ready_timeout = ready_timeout
        self.procs: dict = {}

    @property
    def leader_addr(self) -> str:
        return f"127.0.0.1:{self.cluster['port']}"

    def log_path(self, rank: int) -> str:
        return os.path.join(self.workdir, f"rank{rank}.log")

    def command(self, rank: int) -> list:
        base = [sys.executable, "-m", "nanopipe"]
        common = ["--config-dir", self.config_dir]
        if rank not in self.pull_ranks:
            common += ["--weights", self.weights]
        if rank == 0:
            return base + ["serve", "--rank", "0"] + common
        return base + ["join", "--rank", str(rank), "--host", self.host_of(rank)] + common

    def host_of(self, rank: int) -> str:
        """Rank's name in host_ip (node<R> in the generated configs)."""
        return self.cluster["server"] if rank == 0 else self.cluster["workers"][rank - 1]["host"]

    def start_rank(self, rank: int):
        out = None if not self.quiet else open(self.log_path(rank), "ab")
        try:
            self.procs[rank] = subprocess.Popen(self.wrap.get(rank, []) + self.command(rank), stdout=out,
                                                stderr=subprocess.STDOUT if out else None, env=self.env,
                                                cwd=self.workdir, preexec_fn=die_with_parent())
        finally:
            if out is not None:
                out.close()     # the child holds its own copy
        return self.procs[rank]

    def kill_rank(self, rank: int, sig=signal.SIGKILL):
        p = self.procs.get(rank)
        if p and p.poll() is None:
            p.send_signal(sig)
            p.wait(10)

    def start(self):
        """The leader, then (once it listens) the workers; returns when the ring is up."""
        try:
            self.start_rank(0)
            self.wait_leader()
            for rank in range(1, self.nodes):
                self.start_rank(rank)
            self.wait_ready()
        except BaseException:
            self.stop()     # `with` never calls __exit__ when __enter__ fails: don't leave nodes running
            raise
        return self

    def wait_leader(self, timeout: float | None = None):
        """Until the leader takes clients (it listens once its weights are loaded)."""
        deadline = time.time() + (timeout or self.ready_timeout)
        while time.time() < deadline:
            p = self.procs[0]
            if p.poll() is not None:
                raise RuntimeError(f"the leader exited with code {p.returncode}:\n{self.logs()}")
            try:
                self.client(timeout=2).close()
                return
            except ClientError:
                time.sleep(0.05)
        raise TimeoutError(f"the leader did not listen within {timeout or self.ready_timeout}s\n{self.logs()}")

    def wait_ready(self, timeout: float | None = None):
        deadline = time.time() + (timeout or self.ready_timeout)
        last = None
        while time.time() < deadline:
            for rank, p in self.procs.items():
                if p.poll() is not None and rank == 0:
                    raise RuntimeError(f"the leader exited with code {p.returncode}:\n{self.logs()}")
            try:
                with self.client(timeout=2) as c:
                    last = c.status()
                if last["ready"]:
                    return last
            except ClientError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"cluster not ready after {timeout or self.ready_timeout}s; status {last}\n{self.logs()}")

    def client(self, timeout: float = 5.0) -> LeaderClient:
        return LeaderClient.connect(self.leader_addr, token=self.token, timeout=timeout, tls_ca=self.tls_ca)

    def logs(self) -> str:
        parts = []
        for rank in sorted(self.procs):
            try:
                with open(self.log_path(rank), errors="replace") as f:
                    parts.append(f"--- rank {rank} ---\n{f.read()[-4000:]}")
            except OSError:
                pass
        return "\n".join(parts)

    def stop(self):
        """SIGTERM every node (SIGKILL what is still up 5 s later), then remove the temporary folder."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
