"""`nanopipe demo`: the cluster of configs/ on this one machine, with the web chat in front.

It runs what a user runs on real machines (`nanopipe serve`, `nanopipe join --rank R`, the web
app) with the config folder's model, decoding defaults, layer plan and ports; only the addresses
become 127.0.0.1, and a port that is taken becomes a free one (it says which). It owns what it
starts:

- Ctrl-C, SIGTERM (`kill PID`) and SIGHUP (a closed terminal) stop every node and the web app;
  on Linux the nodes also die with the demo when it is SIGKILLed (localcluster.die_with_parent).
- The web chat runs in the demo's own process, bound before any node starts: a web port that is
  taken is an error at start, never a second demo quietly serving the first one's page.
- A node that dies is started again (up to --restarts times): the leader reports the rank down,
  a generation in flight waits up to rejoin_grace_s, and the answer resumes, as on real machines.

    $ nanopipe demo
    gpt2 on 3 nodes, every address 127.0.0.1; top_p decoding (temperature=0.8, p=0.9), up to 50 new tokens
    Node   Rank  Layers  Count  Listens on
    mini1     0  0-3         4  127.0.0.1:65432
    ...
"""
from __future__ import annotations

import os
import signal
import socket
import time

from ..cluster.worker import DRAINED_LINE
from ..partition import format_plan
from .localcluster import LocalCluster, free_ports

HOST = "127.0.0.1"
POLL_S = 0.2            # how often the demo looks at its nodes and their logs
WEB_GRACE_S = 5.0       # on stopping, replies in flight get this long to finish before they are ended


class DemoError(Exception):
    """The demo cannot start (a port, the configs, the nodes): the message says what to do."""


class Stopped(Exception):
    """A signal asked the demo to stop."""


def port_free(port: int, host: str = HOST) -> bool:
    """Can a server bind host:port now? (SO_REUSEADDR, as the nodes and the web app bind.)"""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def choose_ports(wanted: list, names: list, avoid: set = frozenset()) -> tuple:
    """The configured ports where they are free, a free port for each that is not.

    Returns (ports, notes), e.g. ([65432, 40117, 65434], ["port 65433 (mini2, rank 1) is in use;
    using 40117"]).
    """
    ports, notes = [], []
    for rank, (port, name) in enumerate(zip(wanted, names)):
        if port in ports or port in avoid or not port_free(port):
            new = next(p for p in free_ports(8) if p not in ports and p not in wanted and p not in avoid)
            notes.append(f"port {port} ({name}, rank {rank}) is in use; using {new}")
            port = new
        ports.append(port)
    return ports, notes


def demo_configs(mc, cc, weights: str, ranges: list, ports: list) -> dict:
    """The three YAML files of the demo's cluster, from the user's ModelConfig and ClusterConfig.

    Everything but the addresses (all 127.0.0.1), the ports (`ports`) and the plan is theirs; the
    plan is written as an explicit layer_mapping (inclusive [first, last]) so the nodes run exactly
    the `ranges` the demo printed. Relative TLS paths become absolute: the nodes run elsewhere.
    """
    n = len(ranges)
    names = [cc.nodes[r].host if r < len(cc.nodes) else f"node{r}" for r in range(n)]
    model = {"hf_model_name": mc.hf_model_name, "weights_model_name": mc.weights_model_name,
             "num_layers": mc.num_layers, "num_nodes": n, "partition": "even",
             "layer_mapping": {r: [lo, hi - 1] for r, (lo, hi) in enumerate(ranges)},
             "max_new_tokens": mc.max_new_tokens, "active_decoding_strategy": mc.active_decoding_strategy,
             "decoding_strategies": {k: dict(v) for k, v in mc.decoding_strategies.items()}}
    if mc.n_head:
        model["n_head"] = mc.n_head
    cluster = {"host_ip": {name: HOST for name in names}, "server": names[0], "port": ports[0],
               "num_workers": n - 1,
               "workers": [{"rank": r, "host": names[r], "port": ports[r]} for r in range(1, n)],
               "max_sessions": cc.max_sessions, "rejoin_grace_s": cc.rejoin_grace_s, "heartbeat_s": cc.heartbeat_s}
    optional = {"pipeline_depth": cc.pipeline_depth, "api_token": cc.api_token,
                "cors_origins": list(cc.cors_origins) or None,
                "link_delay_ms": cc.link_delay_ms or None, "link_mbps": cc.link_mbps or None,
                "tls_cert": cc.tls_cert and os.path.abspath(cc.tls_cert),
                "tls_key": cc.tls_key and os.path.abspath(cc.tls_key)}
    if cc.auth_token and cc.auth_token != os.environ.get("NANOPIPE_TOKEN"):
        optional["auth_token"] = cc.auth_token      # NANOPIPE_TOKEN reaches the nodes by the environment
    cluster.update({k: v for k, v in optional.items() if v is not None})
    return {"model_config.yaml": {"default_model": mc.name, "models": {mc.name: model}},
            "cluster_config.yaml": cluster,
            "model_weights.yaml": {mc.weights_model_name: {"url": "file://" + os.path.abspath(weights),
                                                           "filename": os.path.basename(weights)}}}


def describe_exit(code: int) -> str:
    """-9 -> 'was killed by SIGKILL', 1 -> 'exited with code 1'."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def decoding_line(mc) -> str:
    """'top_p decoding (temperature=0.8, p=0.9), up to 50 new tokens'"""
    params = mc.decoding_strategies.get(mc.active_decoding_strategy) or {}
    shown = f" ({', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for k, v in params.items())})"
    return f"{mc.active_decoding_strategy} decoding{shown if params else ''}, up to {mc.max_new_tokens} new tokens"


def ready_block(mc, ranges: list, names: list, ports: list, web_url: str | None, restarts: int,
                logs: str | None = None) -> str:
    """What the user reads once everything is up: the plan, the URL, how to stop, where each node's
    whole log is (`logs`, the folder; the demo shows their new lines as they come)."""
    rows = format_plan(ranges, names=names).splitlines()
    width = max(len(r) for r in rows)
    rows = [rows[0].ljust(width) + "  Listens on"] + [
        row.ljust(width) + f"  {HOST}:{port}" for row, port in zip(rows[1:], ports)]
    lines = [f"{mc.name} on {len(ranges)} nodes, every address {HOST}; {decoding_line(mc)}", *rows]
    if web_url:
        lines.append(f"Web chat: {web_url}  (OpenAI API: {web_url}v1)")
    again = f" A node that dies is started again (up to {restarts} times)." if restarts else ""
    where = f" Each node's whole log: {logs}/rank<N>.log (removed on stop)." if logs else ""
    lines.append(f"Stop: Ctrl-C (or `kill {os.getpid()}`) stops every process.{again}{where}")
    return "\n".join(lines)


class LogTail:
    """New complete lines of the nodes' log files since the last look."""

    def __init__(self, paths: dict):
        self.paths = paths
        self.offsets = {rank: self.part_size(p) for rank, p in paths.items()}

    @staticmethod
    def part_size(path: str) -> int:
        try:
            return os.path.getsize(path)
        except OSError:
            return 0

    def lines(self) -> list:
        out = []
        for rank, path in self.paths.items():
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets[rank])
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1
            self.offsets[rank] += end
            out += data[:end].decode(errors="replace").splitlines()
        return out


def _on_signal(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def web_port_taken(port: int) -> DemoError:
    return DemoError(f"cannot serve the web chat on {HOST}:{port}: the port is in use (another `nanopipe demo` "
                     "or `nanopipe web`?). Stop that one, or pick a free port with --web-port.")


def bind_web(port: int, config_dir: str, model_name: str, leader: str):
    """The web app's server, bound (not yet serving): DemoError if the port is taken."""
    # imported here: tiktoken, Flask and waitress are a leader's packages a worker's lean install lacks
    from ..tokenizer import get_tokenizer
    from ..web.app import create_app, settings_from_configs
    from ..web.server import WebServer
    app = create_app(settings_from_configs(config_dir, model_name, leader))
    app.config["TOKENIZER"] = get_tokenizer()      # load it now, not during the first chat
    try:
        return WebServer(app, HOST, port)
    except OSError:
        raise web_port_taken(port) from None


def run_demo(weights: str, mc, cc, ranges: list, *, web: bool = True, web_port: int = 8000, restarts: int = 2,
             echo=print) -> None:
    """Start the cluster of `mc`/`cc` on 127.0.0.1 with `ranges`, and the web chat; return when stopped."""
    stop_signals = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s]
    previous = {s: signal.signal(s, _on_signal) for s in stop_signals}
    cluster = server = None
    serving = False
    try:
        names = [cc.nodes[r].host if r < len(cc.nodes) else f"node{r}" for r in range(len(ranges))]
        wanted = [cc.nodes[r].port if r < len(cc.nodes) else cc.port + r for r in range(len(ranges))]
        if web and not port_free(web_port):      # before any node starts
            raise web_port_taken(web_port)
        ports, notes = choose_ports(wanted, names, avoid={web_port} if web else set())
        for note in notes:
            echo(note)
        cluster = LocalCluster(weights, nodes=len(ranges), configs=demo_configs(mc, cc, weights, ranges, ports))
        if web:
            server = bind_web(web_port, cluster.config_dir, mc.name, cluster.leader_addr)
        echo(f"Starting {len(ranges)} nodes on {HOST} with {weights} ...")
        try:
            cluster.start()
        except (RuntimeError, TimeoutError) as e:
            raise DemoError(f"the local cluster did not start: {e}") from None
        url = None
        if server is not None:
            server.start()
            serving = True
            url = f"http://{HOST}:{web_port}/"
        echo(ready_block(mc, ranges, names, ports, url, restarts, os.path.dirname(cluster.log_path(0))))
        _watch(cluster, names, restarts, echo)
    except (Stopped, KeyboardInterrupt) as e:
        try:
            echo(f"Stopping ({e or 'SIGINT'}): every node{' and the web chat' if server else ''}")
        except OSError:
            pass                            # SIGHUP: the terminal is gone; stop all the same
    finally:
        for s in stop_signals:           # a second Ctrl-C must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        try:
            if server is not None:       # replies in flight end with a final event before the nodes stop
                server.stop(WEB_GRACE_S) if serving else server.close()
            if cluster is not None:
                cluster.stop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _watch(cluster, names: list, restarts: int, echo):
    """Echo the nodes' log lines; start a node that died again, up to `restarts` times (never one that
    `nanopipe leave` drained: starting it again would undo the leave)."""
    tail = LogTail({r: cluster.log_path(r) for r in range(cluster.nodes)})
    restarted = {r: 0 for r in range(cluster.nodes)}
    gone: set = set()
    drained: set = set()

    def echo_lines():
        for line in tail.lines():
            echo(line)
            rank = line[len("[WORKER-"):].split("]", 1)[0]         # "[WORKER-2] The leader has drained ..."
            if DRAINED_LINE in line and line.startswith("[WORKER-") and rank.isdigit():
                drained.add(int(rank))
    while True:
        echo_lines()
        for rank, proc in list(cluster.procs.items()):
            if rank in gone or proc.poll() is None:
                continue
            echo_lines()                        # its last lines, written before it exited: drained?
            who = f"{'leader' if rank == 0 else 'worker'} {names[rank]} (rank {rank})"
            if rank in drained and proc.returncode == 0:
                gone.add(rank)
                echo(f"[DEMO] The {who} was drained by `nanopipe leave`; not starting it again "
                     "(the ring runs without it).")
            elif restarted[rank] < restarts:
                restarted[rank] += 1
                echo(f"[DEMO] The {who} {describe_exit(proc.returncode)}; starting it again "
                     f"({restarted[rank]} of {restarts})")
                cluster.start_rank(rank)
            else:
                gone.add(rank)
                echo(f"[DEMO] The {who} {describe_exit(proc.returncode)}; not starting it again "
                     f"(--restarts {restarts}). Requests fail after rejoin_grace_s; Ctrl-C stops the demo.")
        time.sleep(POLL_S)
