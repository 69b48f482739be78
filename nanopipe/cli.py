"""The `nanopipe` command: one click group, short commands whose docstrings are the help."""
from __future__ import annotations

import json
import os
import sys

import click

from .config import DEFAULT_CONFIG_DIR, ConfigError


class UserError(click.ClickException):
    """An error the user can fix; printed as `Error: ...` with exit code 1, no traceback."""


def _fail_clean(fn):
    """Turn the project's clear errors into CLI messages instead of tracebacks."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .decoding import DecodingError
        from .model import ContextOverflow
        from .safetensors_io import SafetensorsError
        from .weights import WeightsError
        try:
            return fn(*args, **kwargs)
        except (ConfigError, DecodingError, WeightsError, SafetensorsError, ContextOverflow) as e:
            raise UserError(str(e)) from None
    return wrapper


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
        click.option("--strategy", default=None, help="greedy | sampling | top_k | top_p (default: model_config.yaml)."),
        click.option("--temperature", type=float, default=None),
        click.option("--top-k", type=int, default=None),
        click.option("--top-p", type=float, default=None),
        click.option("--max-tokens", type=int, default=None),
        click.option("--seed", type=int, default=None, help="Same seed, same tokens."),
    ]):
        fn = opt(fn)
    return fn


def make_sampling(config_dir, model_name, strategy, temperature, top_k, top_p, max_tokens, seed):
    from .config import load_model_config
    from .decoding import make_params
    try:
        defaults = load_model_config(config_dir, model_name).decoding_defaults()
    except ConfigError:
        if model_name:
            raise
        defaults = None     # no configs folder: built-in defaults
    return make_params(defaults, strategy=strategy, temperature=temperature, top_k=top_k, top_p=top_p,
                       max_tokens=max_tokens, seed=seed)


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
             leader, n_head, as_json, top_logprobs, echo):
    """Generate text for PROMPT, in this process or on a cluster (--leader)."""
    from .tokenizer import StreamDecoder, get_tokenizer
    tok = get_tokenizer()
    params = make_sampling(config_dir, model_name, strategy, temperature, top_k, top_p, max_tokens, seed)
    prompt_ids = tok.encode(prompt)
    stream = StreamDecoder(tok)

    def on_token(t):
        if not as_json:
            click.echo(stream.push(t), nl=False)

    if not as_json:
        click.echo(prompt, nl=False)
    if leader:
        from .client import ClientError, LeaderClient
        try:
            with LeaderClient.connect(leader, token=_token(config_dir)) as c:
                result = c.generate(prompt_ids, params, on_token=on_token, echo=echo, top_logprobs=top_logprobs)
        except ClientError as e:
            raise UserError(str(e)) from None
    else:
        from .engine import Engine
        path = resolve_weights(config_dir, model_name, weights_path)
        engine = Engine.load(path, n_head=n_head)
        result = engine.generate(prompt_ids, params, on_token=on_token, echo=echo, top_logprobs=top_logprobs)
    if as_json:
        result = dict(result, text=tok.decode(result["token_ids"]))
        result.pop("id", None)
        click.echo(json.dumps(result))
    else:
        click.echo(stream.flush())


def _token(config_dir):
    from .config import load_cluster_config
    try:
        return load_cluster_config(config_dir).auth_token
    except ConfigError:
        return os.environ.get("NANOPIPE_TOKEN")


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
    sizes = [stage_bytes(hi - lo, cfg.n_embd, cfg.n_vocab, cfg.n_ctx, rank0=(r == 0)) for r, (lo, hi) in enumerate(ranges)]
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


if __name__ == "__main__":
    main()
