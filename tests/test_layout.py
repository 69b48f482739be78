"""The layout shows the design, and the imports keep it: tools -> web/cluster -> engine -> model.

    nanopipe/          the core: model, decoding, tokenizer, weights, engine, partition, config
    nanopipe/cluster/  the wire, the handshake, a worker stage, the leader, a client
    nanopipe/web/      the Flask app, the guide's chat API, the OpenAI-compatible API, metrics
    nanopipe/tools/    the CLI, pull, a local cluster, trace, benchmarks

Read from the source (ast), so a lazy import inside a function counts as much as one at the top.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "nanopipe"
# what each layer may import from nanopipe: a layer sees only the layers below it
ALLOWED = {
    "core": {"core"},
    "cluster": {"core", "cluster"},
    "web": {"core", "cluster", "web"},
    "tools": {"core", "cluster", "web", "tools"},
}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer(mod: str) -> str:
    """nanopipe.cluster.leader -> "cluster"; nanopipe.engine -> "core"; `python -m nanopipe` runs the CLI."""
    if mod == "nanopipe.__main__":
        return "tools"
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ALLOWED else "core"


def imports_of(mod: str, path: Path) -> set[str]:
    """Every nanopipe module `mod` imports, anywhere in the file, as absolute names."""
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("nanopipe")}
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - (node.level - 1)] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            if not name.startswith("nanopipe"):
                continue
            known = modules()
            for a in node.names:    # `from . import openai` names a module, `from .x import f` does not
                out.add(f"{name}.{a.name}" if f"{name}.{a.name}" in known else name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in imports_of(m, p) if i in mods and i != m} for m, p in mods.items()}


def test_the_layers_import_downwards_only():
    bad = [f"{m} ({layer(m)}) imports {i} ({layer(i)})"
           for m, deps in graph().items() for i in sorted(deps) if layer(i) not in ALLOWED[layer(m)]]
    assert not bad, "imports must point tools -> web/cluster -> core:\n  " + "\n  ".join(bad)


def cycles_in(g: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first walk, as "a -> b -> a" (empty: the graph has no cycle)."""
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycles():
    cycles = cycles_in(graph())
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_leader_side_and_the_worker_side_share_only_the_wire():
    """A leader process runs no stage code of a worker's, and a worker none of the leader's: what both
    need (the wire, the handshake, a node's memory, the simulated link) lives in wire/net/node."""
    g = graph()
    worker_side = {"nanopipe.cluster.worker", "nanopipe.cluster.data_path"}
    leader_side = {"nanopipe.cluster.leader", "nanopipe.cluster.registry", "nanopipe.cluster.planner",
                   "nanopipe.cluster.ring", "nanopipe.cluster.client_protocol"}
    assert leader_side | worker_side <= set(g), "the leader's or the worker's parts moved: update this test"
    bad = [f"{m} imports {w}" for m in leader_side for w in worker_side if w in g.get(m, ())]
    bad += [f"{w} imports {m}" for w in worker_side for m in leader_side if m in g[w]]
    assert not bad, "\n".join(bad)


def test_the_web_app_factory_sits_on_top_of_the_web_modules():
    """web/app.py (create_app) registers chat, openai and metrics; they share errors, body, connection,
    generation and state, and none of them imports app.py back (the cycle web/app.py <->
    web/openai.py was dodged with imports inside functions)."""
    g = graph()
    web = [m for m in g if layer(m) == "web" and m != "nanopipe.web.app"]
    assert not [m for m in web if "nanopipe.web.app" in g[m]], "a web module imports web/app.py"
    assert {"nanopipe.web.chat", "nanopipe.web.openai", "nanopipe.web.errors", "nanopipe.web.state"} \
        <= g["nanopipe.web.app"]
    for route in ("nanopipe.web.chat", "nanopipe.web.openai"):
        assert set(WEB_SHARED) <= g[route], (route, sorted(set(WEB_SHARED) - g[route]))


# what the web routes share, one module per thing it holds (no grab-bag): each small enough to read at once
WEB_SHARED = [f"nanopipe.web.{m}" for m in ("errors", "body", "connection", "generation", "state")]


@pytest.mark.parametrize("module", WEB_SHARED + ["nanopipe.web.batch"])
def test_what_the_web_routes_share_is_in_small_modules(module):
    lines = len(modules()[module].read_text().splitlines())
    assert lines <= 310, f"{module} is {lines} lines: split it along what it holds"


def test_config_is_data():
    """config.py reads YAML into frozen dataclasses; waiting, sockets and threads belong to the cluster
    (the simulated link's sleep is cluster/node.py's LinkModel)."""
    tree = ast.parse((PKG / "config.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    acting = sorted(names & {"time", "socket", "threading", "subprocess", "select", "ssl"})
    assert not acting, f"config.py imports {acting}: keep config as data, act on it in cluster/"


def test_the_checker_catches_a_core_module_importing_an_edge_one(tmp_path, monkeypatch):
    """The rule above can fail: a core module importing the web app is reported."""
    fake = tmp_path / "nanopipe"
    (fake / "web").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "web" / "__init__.py").write_text("")
    (fake / "web" / "app.py").write_text("from ..engine import Scheduler\n")
    (fake / "engine.py").write_text("def f():\n    from .web import app\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    g = graph()
    assert "nanopipe.web.app" in g["nanopipe.engine"] and layer("nanopipe.web.app") == "web"
    with pytest.raises(AssertionError, match="nanopipe.engine .core. imports nanopipe.web.app"):
        test_the_layers_import_downwards_only()
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()
    assert cycles_in({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]


def test_the_checker_reads_relative_and_lazy_imports(tmp_path, monkeypatch):
    """`from . import x`, `from ..x import f` and an import inside a function all count."""
    fake = tmp_path / "nanopipe"
    (fake / "cluster").mkdir(parents=True)
    for f in ("__init__.py", "model.py", "cluster/__init__.py", "cluster/wire.py"):
        (fake / f).write_text("")
    (fake / "cluster" / "worker.py").write_text("from . import wire\n\ndef f():\n    from ..model import gelu\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    assert graph()["nanopipe.cluster.worker"] == {"nanopipe.cluster.wire", "nanopipe.model"}


@pytest.mark.parametrize("module", ["nanopipe.cluster.worker", "nanopipe.engine", "nanopipe.cluster.leader"])
def test_a_node_stays_light(module):
    """A Pi worker needs numpy, PyYAML and the standard library: no tokenizer, web framework, metrics
    library or CLI gets imported on the way, and nothing from nanopipe's web or tools. The leader
    loads the tokenizer only when a client sends text, so importing it pulls in none of them either."""
    code = (f"import sys, {module}; heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tiktoken', "
            "'flask', 'werkzeug', 'waitress', 'prometheus_client', 'click', 'torch') or m.startswith(('nanopipe.web', "
            "'nanopipe.tools'))); print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"


def test_every_test_imports_a_module_of_this_tree():
    """`from nanopipe import pull` must not quietly find an older checkout's flat nanopipe/pull.py (an
    editable install of another tree can answer for a module this one no longer has): every nanopipe
    module a test names exists here, e.g. `from nanopipe.tools import pull`."""
    known = modules()
    defined = {p: {t.id for n in ast.parse(known[p].read_text()).body if isinstance(n, ast.Assign)
                   for t in n.targets if isinstance(t, ast.Name)} for p in known if known[p].name == "__init__.py"}
    bad = []
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "nanopipe"]
                bad += [f"{path.name}:{node.lineno} import {n}" for n in names if n not in known]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "nanopipe":
                if node.module not in known:
                    bad.append(f"{path.name}:{node.lineno} from {node.module}")
                elif node.module in defined:        # a package: what it gives is its submodules and __init__'s names
                    bad += [f"{path.name}:{node.lineno} from {node.module} import {a.name}" for a in node.names
                            if f"{node.module}.{a.name}" not in known and a.name not in defined[node.module]]
    assert not bad, "tests import nanopipe modules this tree does not have:\n  " + "\n  ".join(bad)


def test_the_readme_layout_table_matches_the_tree():
    """Every module of nanopipe/ has a line in README.md's Layout section, and every path there exists."""
    import re
    readme = (PKG.parent / "README.md").read_text()
    section = readme[readme.index("## Layout\n"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    named = set(re.findall(r"`((?:nanopipe/)[\w/]+\.py)`", section))
    files = {str(p.relative_to(PKG.parent)) for p in PKG.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert not files - named, f"README.md's Layout section does not mention {sorted(files - named)}"
    assert not named - files, f"README.md's Layout section names files that do not exist: {sorted(named - files)}"


def test_the_sampling_fields_are_written_once():
    """sampling_params.py lists the sampling fields; every other module imports them. A literal
    tuple, list or set of strings (or dict keys) naming 3 or more of them anywhere else is a second copy."""
    from nanopipe.sampling_params import FIELDS
    fields = set(FIELDS) | {"strategy"}
    copies = []
    for mod, path in modules().items():
        if mod == "nanopipe.sampling_params":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                elts = node.keys if isinstance(node, ast.Dict) else node.elts
                named = {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if len(named & fields) >= 3:
                    copies.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {sorted(named & fields)}")
    assert not copies, "sampling fields written out again (import sampling_params.FIELDS):\n  " + "\n  ".join(copies)


LONGEST_CLASS = 300     # lines from `class` to its last line: a class a reader can hold in mind at once


def class_lengths(root: Path) -> list:
    """[(lines, "path:Class")] of every class under root, longest first."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                out.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root.parent)}:{node.name}"))
    return sorted(out, reverse=True)


def test_no_class_is_longer_than_a_reader_can_hold():
    """A class that grows past ~300 lines holds more than one idea: split it into parts that talk
    through calls (as the leader is: registry, planner, ring builder, client protocol)."""
    long = [f"{where}: {n} lines" for n, where in class_lengths(PKG) if n > LONGEST_CLASS]
    assert not long, f"classes over {LONGEST_CLASS} lines:\n  " + "\n  ".join(long)


def private_imports(mod: str, path: Path) -> list[str]:
    """Private names (`_x`, not `__x__`) this module takes from another nanopipe module: imported by
    name (`from .config import _get`), or read off an imported module (`from . import kernels` then
    `kernels._chosen`). A name private to its module is that module's business alone."""
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    known, tree = modules(), ast.parse(path.read_text())
    found, module_names = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - (node.level - 1)] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            if not name.startswith("nanopipe"):
                continue
            for a in node.names:
                if f"{name}.{a.name}" in known:
                    module_names[a.asname or a.name] = f"{name}.{a.name}"
                elif a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{path.relative_to(PKG.parent)}:{node.lineno} from {name} import {a.name}")
        elif isinstance(node, ast.Import):
            module_names |= {a.asname: a.name for a in node.names if a.asname and a.name.startswith("nanopipe")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_names
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {module_names[node.value.id]}.{node.attr}")
    return found


def test_no_private_imports_across_modules():
    """What one module uses of another is public: a helper two modules need loses its underscore (or
    moves to the module that owns it)."""
    bad = [f for mod, path in modules().items() for f in private_imports(mod, path)]
    assert not bad, "private names used from another module:\n  " + "\n  ".join(bad)


def test_the_private_import_checker_catches_both_forms(tmp_path, monkeypatch):
    fake = tmp_path / "nanopipe"
    (fake / "tools").mkdir(parents=True)
    for f in ("__init__.py", "tools/__init__.py", "config.py", "kernels.py"):
        (fake / f).write_text("")
    (fake / "tools" / "cli.py").write_text("from ..config import _get, load\nfrom .. import kernels as k\n\n"
                                           "def f():\n    return k._chosen, k.describe, k.__name__\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    assert private_imports("nanopipe.tools.cli", fake / "tools" / "cli.py") == [
        "nanopipe/tools/cli.py:1 from nanopipe.config import _get", "nanopipe/tools/cli.py:5 nanopipe.kernels._chosen"]
    with pytest.raises(AssertionError, match="private names used from another module"):
        test_no_private_imports_across_modules()


def unexplained_local_imports(path: Path) -> list[str]:
    """Imports inside functions with no comment saying why: on the import's line, or on the line just
    above the block of imports it belongs to (`# imported here: ...`, or `try:  # ...`)."""
    lines = path.read_text().splitlines()
    out = []

    def visit(node, in_function):
        for c in ast.iter_child_nodes(node):
            if isinstance(c, (ast.Import, ast.ImportFrom)) and in_function:
                i = c.lineno - 2                # the line above, 0-based
                while i >= 0 and lines[i].strip().startswith(("import ", "from ")):
                    i -= 1
                own = any("#" in line for line in lines[c.lineno - 1:c.end_lineno])
                if not own and not (i >= 0 and "#" in lines[i]):
                    out.append(f"{path.relative_to(PKG.parent)}:{c.lineno} {lines[c.lineno - 1].strip()}")
            visit(c, in_function or isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef)))
    visit(ast.parse("\n".join(lines)), False)
    return out


def test_imports_inside_the_commands_functions_say_why():
    """tools/bootstrap.py sets numpy's environment before the CLI loads, so tools/ imports at the top.
    An import left inside a function has a reason (an optional package, a leader's package a worker's
    lean install lacks, the bootstrap's own wait for the environment), and says it in a comment."""
    bad = [f for path in sorted((PKG / "tools").glob("*.py")) for f in unexplained_local_imports(path)]
    assert not bad, "imports inside functions without a comment saying why (or move them to the top):\n  " + \
        "\n  ".join(bad)


def test_the_local_import_checker_wants_a_reason(tmp_path, monkeypatch):
    fake = tmp_path / "nanopipe"
    fake.mkdir()
    (fake / "m.py").write_text("import os\n\ndef f():\n    import json\n    return json\n\n"
                               "def g():\n    # imported here: optional\n    import yaml\n    from x import y\n"
                               "    return yaml, y\n\ndef h():\n    import csv  # the reason\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    assert unexplained_local_imports(fake / "m.py") == ["nanopipe/m.py:4 import json"]


ISSUE_REF = r"\bissue ?#?[0-9]+|(?<![\w/])#[0-9]{2}\b"     # "issue N", "issue #N", "#NN"; not "exo#NN"


def issue_numbers(root: Path) -> list[str]:
    """Lines of code, tests and docs that name a tracker's issue by number ("issue N", "#NN"): they mean
    nothing to a reader without the tracker; say the point instead. (A peer's issue, exo#NN, is fine.)"""
    import re
    found = []
    for sub in ("nanopipe", "tests", "docs", ".ci", "web", "Makefile"):
        paths = [root / sub] if (root / sub).is_file() else sorted((root / sub).rglob("*"))
        for path in paths:
            if not path.is_file() or path.suffix in (".png", ".npz", ".safetensors", ".pyc", ".json", ".bin"):
                continue
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            found += [f"{path.relative_to(root)}:{i} {line.strip()[:100]}"
                      for i, line in enumerate(text.splitlines(), 1) if re.search(ISSUE_REF, line, re.I)]
    return found


def test_no_issue_numbers_in_code_tests_or_docs():
    bad = issue_numbers(PKG.parent)
    assert not bad, "issue numbers (say what the issue was instead):\n  " + "\n  ".join(bad)


def test_the_issue_number_checker_catches_the_spellings(tmp_path):
    (tmp_path / "nanopipe").mkdir()
    n = 11      # the numbers are made up here, so this file holds none written out
    (tmp_path / "nanopipe" / "m.py").write_text(f"# see issue {n}\n# Issue #{n + 1} too\n# fixed in #{n + 2}.\n"
                                                f"# exo#{n + 5} and colour #fff, 0x#1 and issue: the engine\n")
    assert [f.split(" ")[0] for f in issue_numbers(tmp_path)] == ["nanopipe/m.py:1", "nanopipe/m.py:2",
                                                                  "nanopipe/m.py:3"]


def test_the_shape_checks_can_fail(tmp_path):
    """The class-length check catches what it is for, on a package made for the purpose."""
    fake = tmp_path / "nanopipe"
    (fake / "cluster").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "cluster" / "__init__.py").write_text("")
    (fake / "cluster" / "wire.py").write_text("def _parse(): pass\n\nclass Big:\n" + "    x = 1\n" * 300)
    assert class_lengths(fake)[0] == (301, "nanopipe/cluster/wire.py:Big")


def test_the_page_is_found_one_way_in_a_checkout_and_in_an_installed_copy(tmp_path):
    """web_dir() is the package's web/static: in this checkout the repository's web/ (a symlink), in
    an installed copy (what setup.cfg's build puts in a wheel, built here by its build_py) the files
    themselves. Both serve the same page; neither looks anywhere else."""
    from setuptools.dist import Distribution

    from nanopipe.web.app import web_dir
    page = PKG.parent / "web"
    names = sorted(p.name for p in page.iterdir() if p.is_file())
    assert {"index.html", "app.js", "style.css"} <= set(names)
    assert Path(web_dir()) == page.resolve()

    dist = Distribution({"script_name": "setup.py"})
    here = Path.cwd()
    try:
        os.chdir(PKG.parent)                # setup.cfg's paths are relative to the repository
        dist.parse_config_files(["setup.cfg"])
        build = dist.get_command_obj("build_py")
        build.build_lib, build.compile = str(tmp_path), False
        dist.run_command("build_py")
    finally:
        os.chdir(here)
    code = "from nanopipe.web.app import web_dir; print(web_dir())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    installed = Path(out.stdout.strip())
    assert installed == (tmp_path / "nanopipe" / "web" / "static").resolve(), out.stdout
    assert not installed.is_symlink() and sorted(p.name for p in installed.iterdir()) == names
    for name in names:
        assert (installed / name).read_bytes() == (page / name).read_bytes(), name


def test_the_sampling_tables_are_assigned_only_in_sampling_params():
    """The field lists, the strategy registry, the YAML section keys and the defaults are assigned in
    sampling_params.py alone; a module that needs one imports it (a second `STRATEGY_KEYS = {...}`
    in config.py once kept @register'd strategies out of model_config.yaml)."""
    import nanopipe.sampling_params as sp
    owned = {"FIELDS", "SAMPLER_FIELDS", "TUNABLE", "BUILT_IN", "STRATEGY_USES", "SECTION_KEYS", "DEFAULT_DECODING",
             "TOP_P_DEFAULT", "KNOB_RANGES", "MAX_STOPS", "PENALTY_RANGE", "REPETITION_RANGE", "BIAS_RANGE"}
    assert owned <= set(vars(sp)), sorted(owned - set(vars(sp)))
    again = []
    for mod, path in modules().items():
        if mod == "nanopipe.sampling_params":
            continue
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            again += [f"{path.relative_to(PKG.parent)}:{node.lineno} {t.id}" for t in targets
                      if isinstance(t, ast.Name) and t.id in owned]
    assert not again, "sampling tables assigned outside sampling_params.py (import them):\n  " + "\n  ".join(again)


def test_sampling_defaults_and_weights_keys_are_not_written_again():
    """No module but sampling_params.py writes a decoding section's values as numbers (a local cluster's
    {"temperature": 0.8} once differed from the defaults), no sampling option's help writes the shipped
    file's defaults by hand ("0.8 as shipped" drifts when the file changes), and the keys of what a
    cluster says of its weights are listed once (weights.WEIGHTS_STATUS_KEYS)."""
    from nanopipe.sampling_params import FIELDS, SECTION_KEYS
    knobs = set(SECTION_KEYS) | {"max_new_tokens"}
    options = {"--" + f.replace("_", "-") for f in FIELDS} | {"--strategy"}
    status_keys = {"synthetic", "weights_mixed", "weights_note"}
    again = []
    for mod, path in modules().items():
        if mod == "nanopipe.sampling_params":
            continue
        where = path.relative_to(PKG.parent)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                again += [f"{where}:{node.lineno} {k.value}: {v.value}" for k, v in zip(node.keys, node.values)
                          if isinstance(k, ast.Constant) and k.value in knobs and isinstance(v, ast.Constant)
                          and isinstance(v.value, (int, float)) and not isinstance(v.value, bool)]
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "option" and node.args
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value in options):
                text = "".join(c.value for h in node.keywords if h.arg == "help" for c in ast.walk(h.value)
                               if isinstance(c, ast.Constant) and isinstance(c.value, str))
                if re.search(r"\[default:[^\]]*(\d|as shipped)", text):
                    again.append(f"{where}:{node.lineno} {node.args[0].value} help {text!r}")
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and mod != "nanopipe.weights":
                words = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if status_keys <= words:
                    again.append(f"{where}:{node.lineno} the weights status keys (weights.WEIGHTS_STATUS_KEYS)")
            if isinstance(node, ast.Assign) and mod != "nanopipe.weights":
                again += [f"{where}:{node.lineno} {t.id}" for t in node.targets
                          if isinstance(t, ast.Name) and t.id == "WEIGHTS_STATUS_KEYS"]
    assert not again, "sampling defaults or weights keys written again (import them):\n  " + "\n  ".join(again)


def test_test_files_import_the_shared_helpers_rather_than_copy_them():
    """A helper tests/helpers.py defines (status, finish, generate_in_background, ...) is imported,
    never defined again in a test file: two copies drift (one waits 60 s, the other 120 s)."""
    tests = Path(__file__).resolve().parent

    def functions(path):
        return {n.name: n.lineno for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
    shared = functions(tests / "helpers.py")
    again = [f"{path.name}:{line} {name}" for path in sorted(tests.glob("test_*.py"))
             for name, line in functions(path).items() if name in shared]
    assert not again, "helpers.py's functions defined again (import them from helpers):\n  " + "\n  ".join(again)
