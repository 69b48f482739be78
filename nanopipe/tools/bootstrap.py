"""Where the `nanopipe` command starts (and `python -m nanopipe`): the environment that numpy reads
once, set before numpy loads; then the CLI, whose modules import numpy at the top like any other.

OpenBLAS reads OPENBLAS_THREAD_TIMEOUT (how long its idle threads spin before they sleep) when numpy
loads it, and never again. Whether to shorten the spin depends on the command and the configs (do
several ranks of the cluster run on this machine?), so it is decided here, from the command line,
by a module that imports only the standard library and config.py (YAML, no numpy):

    nanopipe serve --config-dir configs   -> prepare_env: 3 ranks on 127.0.0.1, this machine: spin short
                                          -> import tools/cli.py (numpy loads now) and run the command

tests/test_cli_habits.py starts the command and checks numpy loads only after the environment is set.
"""
from __future__ import annotations

import os
import platform
import socket
import sys

from ..config import DEFAULT_CONFIG_DIR, ConfigError, Configs

NODE_COMMANDS = ("serve", "join")       # the commands that run a rank of a cluster


def main(argv: list | None = None):
    """The `nanopipe` console script: prepare_env, then the click group (tools/cli.py)."""
    args = sys.argv[1:] if argv is None else list(argv)
    configs = prepare_env(args)
    from .cli import main as cli  # numpy loads here, after prepare_env: the one import that must wait
    return cli.main(args=args, obj=configs)


def prepare_env(argv: list) -> Configs | None:
    """For `serve` and `join`: shorten OpenBLAS's spin when this machine runs several ranks (see
    shares_cores). Returns the Configs it read (the command goes on with them: each file read once),
    or None for the other commands, which set nothing. A broken config sets nothing here: the
    command then says what is wrong with it."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in NODE_COMMANDS:
        return None
    configs = Configs(option_value(argv, "--config-dir") or DEFAULT_CONFIG_DIR)
    try:
        if shares_cores(configs, option_value(argv, "--leader") if command == "join" else None):
            spin_short()
    except ConfigError:
        pass
    return configs


def option_value(argv: list, name: str) -> str | None:
    """The value of option `name` in argv, written `--name VALUE` or `--name=VALUE`; None if absent."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    return None


def shares_cores(configs: Configs, leader: str | None = None) -> bool:
    """True when several ranks of the cluster run on this machine: two nodes of cluster_config.yaml
    at one address of this machine, or (`join --leader HOST:PORT`) the leader on this machine.

    After each call, OpenBLAS threads spin for 2**OPENBLAS_THREAD_TIMEOUT timer ticks before they
    sleep (default 2**28, about 0.1 s). With one process per machine that is what you want. When
    several stages share a machine (the shipped configs, `nanopipe demo`, the tests), an idle
    stage's spinning threads steal the cores from the busy one; too short a spin costs too, a
    wake-up per call (the figures: docs/PERFORMANCE.md, "A cluster on loopback").
    """
    if leader is not None:
        cc = configs.cluster_or_none()
        addr = cc.resolve(leader) if cc is not None else leader
        return is_this_machine(addr.rpartition(":")[0] or addr)
    cc = configs.cluster_or_none()
    if cc is None:
        return False
    ips = [n.ip for n in cc.nodes]
    return any(ips.count(ip) > 1 and is_this_machine(ip) for ip in set(ips))


def spin_short():
    """OpenBLAS's short spin for a machine shared by several ranks; an explicit OPENBLAS_THREAD_TIMEOUT
    wins. On ARM the timer ticks some 50x slower than on x86, so there the short setting stays."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20" if x86 else "4")


def is_this_machine(host: str) -> bool:
    """True if `host` names an address of this machine: loopback, or one a socket can bind to."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return False
    for *_, sa in infos:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((sa[0], 0))
            return True
        except OSError:
            continue
    return False
