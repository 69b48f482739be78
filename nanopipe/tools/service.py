"""`nanopipe service`: a systemd unit that starts a node (or the web app) at boot, restarts it on
failure, and runs it as you, from this checkout, with this venv and this configs/ folder.

    unit_for(rank=1, host="mini2", configs=Configs("configs"))   # ("nanopipe-rank1.service", "[Unit]\\n...")

    [Service]
    User=pi
    WorkingDirectory=/home/pi/nanopipe            # where weights/ is (nodes read and pull weights there)
    ExecStart=/home/pi/nanopipe/.venv/bin/nanopipe join --rank 1 --host mini2 --config-dir /home/pi/nanopipe/configs
    Restart=on-failure

The standard library and config.py only: it runs before anything heavy, often under sudo.
"""
from __future__ import annotations

import getpass
import os
import shlex
import sys

from ..config import ConfigError, Configs

RESTART_SEC = 5         # a node that failed waits this long before systemd starts it again
STOP_TIMEOUT_S = 30     # SIGTERM first (a node stops cleanly on it), SIGKILL after this long


class ServiceError(RuntimeError):
    """The unit cannot be made or written; the message says what to do."""


def nanopipe_command() -> list:
    """How to run nanopipe from this venv: its bin/nanopipe script if there is one, else its python -m."""
    script = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "nanopipe")
    return [script] if os.access(script, os.X_OK) else [os.path.abspath(sys.executable), "-m", "nanopipe"]


def service_user(user: str | None) -> str:
    """--user, else who ran sudo (so `sudo nanopipe service --install` does not run the node as root), else me."""
    return user or os.environ.get("SUDO_USER") or getpass.getuser()


def unit_for(*, rank: int | None, host: str | None, web: bool, port: int = 8000, configs: Configs,
             user: str | None = None, workdir: str | None = None, weights: str | None = None) -> tuple:
    """(unit file name, unit text) for rank `rank` of the cluster in `configs`, or for the web app.
    `weights`: the node's weights file (passed on as an absolute --weights; it must exist)."""
    config_dir = os.path.abspath(configs.dir)
    workdir = os.path.abspath(workdir or os.getcwd())
    if web == (rank is not None):
        raise ServiceError("give --rank R for a node (0 the leader, 1.. a worker) or --web for the web app")
    if weights is not None and web:
        raise ServiceError("--weights is for a node (--rank R); the web app holds no weights")
    if weights is not None and not os.path.isfile(weights):
        raise ServiceError(f"--weights {weights}: no such file here; the service would fail at every start")
    try:
        cc = configs.cluster
    except ConfigError as e:
        raise ServiceError(f"{e}; the unit runs with --config-dir {config_dir}, so it must hold the configs") from None
    nanopipe = nanopipe_command()
    config = ["--config-dir", config_dir]
    if web:
        name, what = "nanopipe-web.service", f"nanopipe web chat in front of the leader ({cc.leader.host})"
        args = ["web", "--host", host or "127.0.0.1", "--port", str(port)] + config
    else:
        if rank < 0 or rank >= len(cc.nodes):
            raise ServiceError(f"{cc.path}: no rank {rank}; ranks are 0 (the leader) to {len(cc.nodes) - 1}")
        node = cc.node(rank)
        if host is not None and host != node.host:
            raise ServiceError(f"{cc.path}: rank {rank} runs on host '{node.host}', not '{host}'; "
                               f"pass --host {node.host} (or the rank that '{host}' runs)")
        name = f"nanopipe-rank{rank}.service"
        if rank == 0:
            what, args = f"nanopipe leader (rank 0, {node.host})", ["serve", "--rank", "0"] + config
        else:
            what = f"nanopipe worker rank {rank} ({node.host})"
            args = ["join", "--rank", str(rank), "--host", node.host] + config
        if weights is not None:
            args += ["--weights", os.path.abspath(weights)]
    lines = [
        "[Unit]",
        f"Description={what}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={service_user(user)}",
        f"WorkingDirectory={workdir}",
        "Environment=PYTHONUNBUFFERED=1",
        f"ExecStart={shlex.join(nanopipe + args)}",
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return name, "\n".join(lines)


def install_unit(name: str, text: str, unit_dir: str = "/etc/systemd/system") -> str:
    """Write the unit into unit_dir (atomically); returns its path."""
    path = os.path.join(unit_dir, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except PermissionError:
        raise ServiceError(f"cannot write {path}: permission denied; run it with sudo "
                           f"(`sudo {shlex.join(nanopipe_command())} service ... --install`), or print the unit "
                           "without --install and copy it there yourself") from None
    except OSError as e:
        raise ServiceError(f"cannot write {path}: {e.strerror or e}") from None
    return path
