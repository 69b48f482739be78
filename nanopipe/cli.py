"""The `nanopipe` command: one click group, short commands whose docstrings are the help."""
from __future__ import annotations

import json
import os
import platform

import click

from .config import DEFAULT_CONFIG_DIR, ConfigError


class UserError(click.ClickException):
    """An error the user can fix; printed as `Error: ...` with exit code 1, no traceback."""


def _fail_clean(fn):
    """Turn the project's clear errors into CLI messages instead of tracebacks."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            # imported here, not before the command runs: `serve` and `join` must be able to set
            # OpenBLAS's environment before anything loads numpy (see _share_cores)
            from .decoding import DecodingError
            from .model import ContextOverflow
            from .safetensors_io import SafetensorsError
            from .weights import WeightsError
            if isinstance(e, (ConfigError, DecodingError, WeightsError, SafetensorsError, ContextOverflow)):
                raise UserError(str(e)) from None
            raise
    return wrapper


def _share_cores(cluster, rank: int):
    """When other ranks run on this same machine, make idle OpenBLAS threads sleep sooner.

    After each call, OpenBLAS threads spin for 2**OPENBLAS_THREAD_TIMEOUT timer ticks before they
    sleep (default 2**28, about 0.1 s). With one process per machine that is what you want. When
    several stages share a machine (the shipped configs, `nanopipe demo`, the tests), an idle
    stage's spinning threads steal the cores from the busy one: a 3-node cluster on 2 cores made
    10 tok/s with the default. Too short a spin costs too: the threads then fall asleep between the
    back-to-back matmuls of one stage and each call pays a wake-up. Measured on x86-64 (2 cores, 3
    nodes, side by side in one session): 2**4 ticks 43-44 tok/s, 2**20 (~0.4 ms) 48-50 tok/s,
    2**24 34-37 tok/s, 2**26 17 tok/s. On ARM the timer ticks some 50x slower than on x86, so
    there the short setting stays. Must run before numpy loads OpenBLAS; an explicit
    OPENBLAS_THREAD_TIMEOUT wins.
    """
    me = cluster.node(rank).ip
    if sum(n.ip == me for n in cluster.nodes) > 1:
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20" if x86 else "4")


def common_options(fn):
    """--config-dir, --model and --weights, shared by every command that runs the model."""
    fn = click.option("--weights", "weights_path", default=None, type=click.Path(dir_okay=False),
                      help="Weights file (overrides model_weights.yaml).")(fn)
    fn = click.option("--model", "model_name", default=None, help="An entry of model_config.yaml.")(fn)
    fn = click.option("--config-dir", default=DEFAULT_CONFIG_DIR, show_default=True, type=click.Path(file_okay=False),
                      help="Folder holding the YAML configs.")(fn)
    return fn


def resolve_weights(config_dir: str, model_name: str | None, weights_path: str | None) -> str:
    """--weights if given, else weights/<filename> from model_weights.yaml for the chosen model."""
    if weights_path:
        return weights_path
    from .config import load_model_config, load_weights_config
    mc = load_model_config(config_dir, model_name)
    src = load_weights_config(config_dir, mc.weights_model_name)
    return os.path.join("weights", src.filename)


@click.group()
@click.version_option(package_name="nanopipe")
def main():
    """nanopipe: GPT-2 split across small machines, in pure numpy."""


# ---------------------------------------------------------------------------------------------
# single process


def sampling_options(fn):
    for opt in reversed([
        click.option("--strategy", default=None,
                     help="greedy | sampling | top_k | top_p (default: chosen by the options given, as in "
                          "the web API, else model_config.yaml's)."),
        click.option("--temperature", type=float, default=None, help="0 means greedy."),
        click.option("--top-k", type=int, default=None),
        click.option("--top-p", type=float, default=None),
        click.option("--max-tokens", type=int, default=None),
        click.option("--seed", type=int, default=None, help="Same seed, same tokens."),
        click.option("--stop", multiple=True, metavar="TEXT",
                     help="End the reply where this text appears (not printed); up to 4, repeat the option."),
        click.option("--frequency-penalty", type=float, default=None,
                     help="-2..2: lower a token's score by this much per time it was generated."),
        click.option("--presence-penalty", type=float, default=None,
                     help="-2..2: lower the score of every token generated at least once."),
        click.option("--repetition-penalty", type=float, default=None,
                     help="> 0, e.g. 1.3: divide (multiply, if negative) the score of every token seen so far."),
        click.option("--logit-bias", multiple=True, metavar="ID=BIAS",
                     help="Add BIAS (-100..100) to token ID's score, e.g. 50256=-100; repeat the option."),
    ]):
        fn = opt(fn)
    return fn


def parse_logit_bias(items) -> dict:
    """("50256=-100", "13=2.5") -> {"50256": -100.0, "13": 2.5}; the values are checked by SamplingParams."""
    from .decoding import DecodingError
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise DecodingError(f"--logit-bias: expected ID=BIAS such as 50256=-100 (got {item!r})", field="logit_bias")
    return out


def make_sampling(config_dir, model_name, strategy, temperature, top_k, top_p, max_tokens, seed, stop=(),
                  frequency_penalty=None, presence_penalty=None, repetition_penalty=None, logit_bias=()):
    """The SamplingParams `generate` runs with: the same rule as the web API (decoding.request_params),
    so `--temperature 0` is greedy and `--top-k 40` alone is top_k sampling."""
    from .config import load_model_config
    from .decoding import check_stop, request_params
    try:
        defaults = load_model_config(config_dir, model_name).decoding_defaults()
    except ConfigError:
        if model_name:
            raise
        defaults = None     # no configs folder: built-in defaults
    return request_params(defaults, strategy=strategy, temperature=temperature, top_k=top_k, top_p=top_p,
                          max_tokens=max_tokens, seed=seed, stop=list(check_stop(list(stop))),
                          frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                          repetition_penalty=repetition_penalty, logit_bias=parse_logit_bias(logit_bias) or None)


@main.command()
@click.argument("prompt")
@common_options
@sampling_options
@click.option("--leader", default=None, metavar="HOST:PORT", help="Generate on a running cluster instead.")
@click.option("--n-head", type=int, default=None, help="Heads, if the weights file cannot tell.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--top-logprobs", type=int, default=0, help="With --json: the K most likely ids at each position.")
@click.option("--echo", is_flag=True, help="With --json: also the logprob of every prompt token.")
@_fail_clean
def generate(prompt, config_dir, model_name, weights_path, strategy, temperature, top_k, top_p, max_tokens, seed,
             stop, frequency_penalty, presence_penalty, repetition_penalty, logit_bias, leader, n_head, as_json,
             top_logprobs, echo):
    """Generate text for PROMPT, in this process or on a cluster (--leader)."""
    from .tokenizer import StopStream, get_tokenizer
    tok = get_tokenizer()
    params = make_sampling(config_dir, model_name, strategy, temperature, top_k, top_p, max_tokens, seed, stop,
                           frequency_penalty, presence_penalty, repetition_penalty, logit_bias)
    prompt_ids = tok.encode(prompt)
    stream = StopStream(tok, params.stop)      # what is printed: the same cut the generation makes

    def on_token(t):
        piece = stream.push(t)
        if not as_json:
            click.echo(piece, nl=False)

    if not as_json:
        click.echo(prompt, nl=False)
    if leader:
        from .client import ClientError, LeaderClient
        try:
            token, tls_ca = _leader_auth(config_dir)
            with LeaderClient.connect(leader, token=token, tls_ca=tls_ca) as c:
                result = c.generate(prompt_ids, params, echo=echo, top_logprobs=top_logprobs, text=False,
                                    on_token=lambda t, _text: t is not None and on_token(t),
                                    on_status=lambda text: click.echo(f"\n[{text}]", err=True))
        except ClientError as e:
            raise UserError(str(e)) from None
    else:
        from .engine import Engine
        path = resolve_weights(config_dir, model_name, weights_path)
        engine = Engine.load(path, n_head=n_head)
        result = engine.generate(prompt_ids, params, on_token=on_token, echo=echo, top_logprobs=top_logprobs)
    tail = stream.flush()
    if as_json:
        # with stop strings, the text is cut where the generation stopped (the stop string left out)
        result = dict(result, text=stream.text if params.stop else tok.decode(result["token_ids"]))
        for key in ("id", "request", "session", "tail"):    # bookkeeping of one process or one connection
            result.pop(key, None)
        click.echo(json.dumps(result))
    else:
        click.echo(tail)


def _leader_auth(config_dir) -> tuple:
    """How to dial the cluster's leader: (auth_token, CA file or None). A cluster with tls_cert
    pins that certificate, so it is the CA a client checks the leader against."""
    from .config import load_cluster_config
    try:
        cc = load_cluster_config(config_dir)
    except ConfigError:
        return os.environ.get("NANOPIPE_TOKEN"), None
    return cc.auth_token, cc.tls_cert


@main.command("init-weights")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--size", default="gpt2", type=click.Choice(["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]),
              show_default=True)
@click.option("--n-layer", type=int, default=None)
@click.option("--n-embd", type=int, default=None)
@click.option("--n-head", type=int, default=None)
@click.option("--n-ctx", type=int, default=None)
@click.option("--n-vocab", type=int, default=50257, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_fail_clean
def init_weights_cmd(out, size, n_layer, n_embd, n_head, n_ctx, n_vocab, seed):
    """Write synthetic GPT-2 weights (official hub layout) to OUT. They produce gibberish."""
    from .weights import init_weights
    cfg = init_weights(out, size=size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_ctx=n_ctx,
                       n_vocab=n_vocab, seed=seed)
    click.echo(f"Wrote synthetic weights to {out}: n_layer={cfg.n_layer} n_embd={cfg.n_embd} "
               f"n_head={cfg.n_head} n_ctx={cfg.n_ctx} n_vocab={cfg.n_vocab} "
               f"({os.path.getsize(out) / 1e6:.1f} MB). They produce gibberish: for real text, `nanopipe pull gpt2`.")


@main.command()
@common_options
@click.option("--nodes", type=int, default=None, help="Number of nodes (default: num_nodes in model_config.yaml).")
@click.option("--strategy", "partition", default=None, help="even | balanced (default: the model's).")
@_fail_clean
def plan(config_dir, model_name, weights_path, nodes, partition):
    """Print which node holds which layers, and each node's weight MB."""
    from .config import load_model_config
    from .partition import format_plan, stage_bytes
    mc = load_model_config(config_dir, model_name)
    cfg = _model_shape(config_dir, mc, weights_path)
    ranges = plan_ranges(mc, cfg, nodes, partition)
    names = _node_names(config_dir, len(ranges))
    sizes = [stage_bytes(hi - lo, cfg.n_embd, cfg.n_vocab, cfg.n_ctx, rank0=(r == 0))
             for r, (lo, hi) in enumerate(ranges)]
    click.echo(format_plan(ranges, names=names, bytes_per_rank=sizes))


def plan_ranges(mc, cfg, nodes=None, partition=None):
    from .partition import plan as make_plan
    nodes = nodes or mc.num_nodes
    partition = partition or mc.partition
    mapping = mc.layer_mapping if partition == "even" and mc.layer_mapping and nodes == mc.num_nodes else None
    if mapping:
        return make_plan(cfg.n_layer, nodes, "mapping", mapping=mapping)
    return make_plan(cfg.n_layer, nodes, partition, n_embd=cfg.n_embd, n_vocab=cfg.n_vocab)


def _model_shape(config_dir, mc, weights_path):
    """The model's shape: from the weights file when there is one, else from the known GPT-2 sizes."""
    from .model import GPTConfig
    from .weights import KNOWN_N_HEAD, SIZES, read_config
    path = resolve_weights(config_dir, mc.name, weights_path)
    if os.path.exists(path):
        return read_config(path, mc.n_head)[0]
    L, C, H = SIZES.get(mc.weights_model_name, (mc.num_layers, 768, mc.n_head or KNOWN_N_HEAD[768]))
    return GPTConfig(n_layer=mc.num_layers, n_embd=C, n_head=mc.n_head or H)


def _node_names(config_dir, n):
    from .config import load_cluster_config
    try:
        cc = load_cluster_config(config_dir)
        names = [node.host for node in cc.nodes]
    except ConfigError:
        names = []
    return [names[r] if r < len(names) else f"node{r}" for r in range(n)]


# ---------------------------------------------------------------------------------------------
# the cluster


def _cluster_setup(config_dir, model_name, weights_path, rank):
    """Configs, the layer plan, and this rank's weights file (pulled if missing and configured)."""
    from .config import load_cluster_config, load_model_config, load_weights_config
    mc = load_model_config(config_dir, model_name)
    cc = load_cluster_config(config_dir)
    _share_cores(cc, rank)
    if mc.num_nodes != len(cc.nodes):       # checked before anything is downloaded
        raise UserError(f"model_config.yaml says num_nodes={mc.num_nodes} but cluster_config.yaml has "
                        f"{len(cc.nodes)} nodes (server + {cc.num_workers} workers); make them agree")
    if weights_path is None:
        src = load_weights_config(config_dir, mc.weights_model_name)
        weights_path = _ensure_weights(mc, src, rank, cc, config_dir)
    elif not os.path.exists(weights_path):
        raise UserError(f"{weights_path}: no such weights file; run `nanopipe pull {mc.weights_model_name}` or "
                        f"`nanopipe init-weights {weights_path}` for synthetic weights")
    cfg = _model_shape(config_dir, mc, weights_path)
    ranges = plan_ranges(mc, cfg, len(cc.nodes))
    return mc, cc, cfg, ranges, weights_path


def _ensure_weights(mc, src, rank, cc, config_dir):
    """This rank's weights file, pulled if it is not here yet.

    Rank 0 needs the whole file, weights/<filename>. A worker uses the whole file if it is here,
    else only its own blocks lo..hi-1, pulled into weights/<name>.layers-<lo>-<hi>.safetensors
    (half-open, as in h[lo:hi]; `pull.slice_path`): rank 2 of gpt2 on 3 nodes fetches blocks 8..11,
    113 of the file's 548 MB, into weights/gpt2.layers-8-12.safetensors.
    """
    from .pull import PullError, ensure_weights
    entry = {"url": src.url, "filename": src.filename, "sha256": src.sha256}
    try:
        if rank == 0:
            return ensure_weights(mc.weights_model_name, entry, "weights", log=click.echo)
        lo, hi = plan_ranges(mc, _planning_shape(config_dir, mc, src), len(cc.nodes))[rank]
        return ensure_weights(mc.weights_model_name, entry, "weights", layers=(lo, hi), rank0=False,
                              log=click.echo)
    except PullError as e:
        raise UserError(str(e)) from None


def _planning_shape(config_dir, mc, src):
    """The model's shape, for a worker to work out its slice before it has any weights.

    The even split and a layer_mapping need only the layer count. The balanced split also weighs
    the LM head (n_embd, n_vocab): for a model of no known GPT-2 size, the remote file's header
    (two small Range requests) says what they are.
    """
    from .weights import SIZES
    cfg = _model_shape(config_dir, mc, None)
    full = os.path.join("weights", src.filename)
    if mc.partition != "balanced" or os.path.exists(full) or mc.weights_model_name in SIZES:
        return cfg
    import dataclasses

    from .pull import remote_header
    shapes = {n[len("transformer."):] if n.startswith("transformer.") else n: t.shape
              for n, t in remote_header(src.url).tensors.items()}
    if "wte.weight" not in shapes:
        return cfg
    n_vocab, n_embd = shapes["wte.weight"]
    return dataclasses.replace(cfg, n_embd=n_embd, n_vocab=n_vocab)


@main.command()
@click.option("--rank", type=int, default=0, show_default=True, help="Always 0: the leader.")
@common_options
@click.option("--n-head", type=int, default=None)
@_fail_clean
def serve(rank, config_dir, model_name, weights_path, n_head):
    """Run the leader (rank 0): tokenizer, embeddings, its blocks, LM head, clients."""
    if rank != 0:
        raise UserError(f"`serve` runs rank 0 (the leader); start rank {rank} with `nanopipe join --rank {rank} "
                        "--host NAME`")
    mc, cc, cfg, ranges, path = _cluster_setup(config_dir, model_name, weights_path, 0)
    from .leader import Leader  # numpy loads only now, after _share_cores
    from .weights import load_stage
    lo, hi = ranges[0]
    stage = load_stage(path, lo, hi, rank0=True, n_head=n_head or mc.n_head)
    click.echo(f"[LEADER] Loaded {hi - lo} layers for the leader (layers {lo}-{hi - 1}) plus embeddings and "
               f"LM head from {path}")
    leader = Leader(cc, mc, stage, ranges)
    _on_sigterm()
    try:
        leader.serve_forever()
    except KeyboardInterrupt:
        click.echo("[LEADER] Shutting down")
    except OSError as e:
        raise UserError(str(e)) from None


@main.command()
@click.option("--rank", type=int, required=True, help="This worker's rank (1..num_workers).")
@click.option("--host", "host", default=None, help="This worker's name in host_ip (checked against the config).")
@common_options
@click.option("--n-head", type=int, default=None)
@_fail_clean
def join(rank, host, config_dir, model_name, weights_path, n_head):
    """Run a worker: dial the leader, load only this rank's blocks, pass activations on."""
    from .config import load_cluster_config
    cc = load_cluster_config(config_dir)
    if rank < 1 or rank >= len(cc.nodes):
        raise UserError(f"{cc.path}: no worker rank {rank}; workers are ranks 1..{len(cc.nodes) - 1}")
    if host is not None:
        cc.rank_of(host)    # an unknown host name is an error naming the config
    mc, cc, cfg, ranges, path = _cluster_setup(config_dir, model_name, weights_path, rank)
    from .worker import Worker  # numpy loads only now, after _share_cores
    worker = Worker(cc, rank, path, host=host, n_head=n_head or mc.n_head)
    _on_sigterm()
    try:
        worker.run()
    except KeyboardInterrupt:
        click.echo(f"[WORKER-{rank}] Shutting down")


def _on_sigterm():
    """SIGTERM (what `demo` and process managers send) stops as cleanly as Ctrl-C."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


@main.command()
@click.argument("name")
@click.option("--config-dir", default=DEFAULT_CONFIG_DIR, show_default=True, type=click.Path(file_okay=False))
@click.option("--layers", default=None, help="Only these blocks, e.g. 4-7 (inclusive), for a worker.")
@click.option("--rank0/--no-rank0", default=None, help="Include embeddings and ln_f (default: with no --layers).")
@click.option("--out", "out_dir", default="weights", show_default=True, type=click.Path(file_okay=False))
@click.option("--url", default=None, help="Override the URL from model_weights.yaml.")
def pull(name, config_dir, layers, rank0, out_dir, url):
    """Download NAME's weights (or only --layers A-B of them) into weights/, resumable and verified."""
    from .config import load_weights_config
    from .pull import PullError, parse_layers, slice_path
    from .pull import pull as do_pull
    try:
        src = load_weights_config(config_dir, name)
    except ConfigError as e:
        raise UserError(str(e)) from None
    dest = os.path.join(out_dir, src.filename)
    try:
        if layers:
            lo, hi = parse_layers(layers)
            path = do_pull(url or src.url, slice_path(dest, lo, hi), layers=(lo, hi),
                           rank0=bool(rank0) if rank0 is not None else lo == 0)
        else:
            path = do_pull(url or src.url, dest, sha256=src.sha256)
    except PullError as e:
        raise UserError(str(e)) from None
    click.echo(f"Model weights ready at: {path}")


@main.command()
@click.option("--nodes", type=int, default=3, show_default=True)
@click.option("--weights", "weights_path", default=None, type=click.Path(dir_okay=False))
@click.option("--config-dir", default=DEFAULT_CONFIG_DIR, show_default=True, type=click.Path(file_okay=False))
@click.option("--web/--no-web", default=True, show_default=True, help="Also start the web chat.")
@click.option("--web-port", type=int, default=8000, show_default=True)
@click.option("--synthetic", is_flag=True, help="Use synthetic weights (gibberish) if no real ones are here.")
def demo(nodes, weights_path, config_dir, web, web_port, synthetic):
    """Start a whole local cluster (leader + workers on 127.0.0.1), and the web chat. Ctrl-C stops all."""
    import time as _time

    from .localcluster import LocalCluster
    path = weights_path or _find_real_weights(config_dir)
    if path is None:
        path = os.path.join("weights", "synthetic-gpt2.safetensors")
        if not synthetic and not os.path.exists(path):
            raise UserError("no GPT-2 weights here and none can be downloaded offline. Either `nanopipe pull gpt2` "
                            "on a machine with internet (or copy model.safetensors into weights/), or run "
                            "`nanopipe demo --synthetic` to use synthetic weights (they produce gibberish).")
        if not os.path.exists(path):
            from .weights import init_weights
            click.echo(f"Writing synthetic weights to {path} (random: the text will be gibberish)")
            init_weights(path)
    cl = LocalCluster(path, nodes=nodes, quiet=False)
    click.echo(f"Starting {nodes} nodes on 127.0.0.1 (configs in {cl.config_dir})")
    web_proc = None
    try:
        cl.start()
        click.echo(f"Cluster ready: leader at {cl.leader_addr}")
        if web:
            import subprocess
            import sys
            web_proc = subprocess.Popen([sys.executable, "-m", "nanopipe.cli", "web", "--leader", cl.leader_addr,
                                         "--port", str(web_port), "--config-dir", cl.config_dir])
            click.echo(f"Web chat: http://127.0.0.1:{web_port}/")
        click.echo("Press Ctrl-C to stop every process.")
        while all(p.poll() is None for p in cl.procs.values()):
            _time.sleep(0.5)
        click.echo("A node exited; stopping the cluster")
    except KeyboardInterrupt:
        click.echo("Stopping")
    finally:
        if web_proc is not None:
            web_proc.terminate()
            web_proc.wait(5)
        cl.stop()


def _find_real_weights(config_dir):
    try:
        from .config import load_model_config, load_weights_config
        mc = load_model_config(config_dir)
        path = os.path.join("weights", load_weights_config(config_dir, mc.weights_model_name).filename)
        return path if os.path.exists(path) else None
    except ConfigError:
        return None


@main.command()
@click.option("--weights", "weights_path", default=None, type=click.Path(dir_okay=False),
              help="Weights to run (default: gpt2-small-shaped synthetic weights, written on first use).")
@click.option("--tokens", "n_tokens", type=click.IntRange(min=2), default=64, show_default=True,
              help="Tokens to generate.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=32, show_default=True, help="Prompt tokens.")
@click.option("--bandwidth-mb", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Size of the array the memory-bandwidth measurement streams.")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Also run a local cluster of this many nodes next to one process.")
@click.option("--link-delay-ms", type=click.FloatRange(min=0), default=0.0, help="Simulated latency on every hop.")
@click.option("--link-mbps", type=click.FloatRange(min=0), default=0.0, help="Simulated bandwidth of every hop.")
@click.option("--sweep", is_flag=True, help="Concurrency sweep: 1, 2, 4, 8 streams, one process and --nodes.")
@click.option("--positions", is_flag=True, help="Time per token at context positions 16, 256 and 1000.")
@click.option("--links", is_flag=True, help="Thunderbolt / Ethernet / WiFi links for 2, 3, 4 and 8 nodes.")
@click.option("--single/--no-single", default=True, show_default=True, help="The single-process bandwidth bench.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Write every table as CSV (and the sweep as PNG with matplotlib) into this folder.")
@_fail_clean
def bench(weights_path, n_tokens, prompt_len, bandwidth_mb, nodes, link_delay_ms, link_mbps, sweep, positions, links,
          single, out_dir):
    """Measure tokens/s: one process against the memory bound, a cluster, concurrency, context, links."""
    from .bench_cluster import run_all
    run_all(weights_path, n_tokens=n_tokens, prompt_len=prompt_len, bandwidth_mb=bandwidth_mb, nodes=nodes,
            link_delay_ms=link_delay_ms, link_mbps=link_mbps, sweep=sweep, positions=positions, links=links,
            single=single, out_dir=out_dir, echo=click.echo)


@main.command("trace")
@click.argument("prompt")
@click.option("--nodes", type=click.IntRange(min=1), default=3, show_default=True, help="Nodes of the local cluster.")
@click.option("--weights", "weights_path", default=None, type=click.Path(dir_okay=False),
              help="Weights file (default: the model's, else synthetic gpt2 weights, written on first use).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for tools.")
@click.option("--leader", default=None, metavar="HOST:PORT", help="Trace on a running cluster instead.")
@click.option("--config-dir", default=DEFAULT_CONFIG_DIR, show_default=True, type=click.Path(file_okay=False))
@_fail_clean
def trace_cmd(prompt, nodes, weights_path, max_tokens, as_json, leader, config_dir):
    """Follow each new token of PROMPT round the cluster: every hop's node, layers, bytes and times."""
    from .client import ClientError
    from .trace import TraceError, format_trace, resolve_weights, run_trace

    def log(msg):       # progress goes to stderr, so stdout stays clean for --json
        click.echo(msg, err=True)

    try:
        path = None if leader else resolve_weights(weights_path or _find_real_weights(config_dir), log=log)
        token, tls_ca = _leader_auth(config_dir) if leader else (None, None)
        report = run_trace(prompt, leader=leader, nodes=nodes, weights=path, max_tokens=max_tokens,
                           token=token, tls_ca=tls_ca, log=log)
    except (TraceError, ClientError) as e:
        raise UserError(str(e)) from None
    click.echo(json.dumps(report) if as_json else format_trace(report))


@main.command()
@click.option("--leader", default=None, metavar="HOST:PORT",
              help="The leader (default: the server's ip:port in cluster_config.yaml).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on; 0.0.0.0 opens the chat to the network (set api_token first).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--config-dir", default=DEFAULT_CONFIG_DIR, show_default=True, type=click.Path(file_okay=False))
@click.option("--model", "model_name", default=None, help="An entry of model_config.yaml (decoding defaults).")
@_fail_clean
def web(leader, host, port, config_dir, model_name):
    """Serve the chat page, its JSON API, an OpenAI-compatible API and /metrics in front of the leader."""
    from werkzeug.serving import run_simple

    from .net import parse_addr
    from .tokenizer import get_tokenizer
    from .webapp import create_app, settings_from_configs
    if leader is not None:
        try:
            parse_addr(leader)
        except ValueError as e:
            raise UserError(f"--leader: {e}") from None
    app = create_app(settings_from_configs(config_dir, model_name, leader))
    app.config["TOKENIZER"] = get_tokenizer()      # load it now, not during the first chat
    if host not in ("127.0.0.1", "localhost", "::1") and not app.config["API_TOKEN"]:
        click.echo(f"WARNING: serving on {host} without api_token: anyone who can reach port {port} can use "
                   "the cluster. Set api_token in cluster_config.yaml or NANOPIPE_API_TOKEN.", err=True)
    click.echo(f"Web chat on http://{host}:{port}/  (leader {app.config['LEADER']})")
    run_simple(host, port, app, threaded=True)


if __name__ == "__main__":
    main()
