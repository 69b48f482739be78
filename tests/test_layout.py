"""The layout shows the design, and the imports keep it: tools -> web/cluster -> engine -> model.

    nanopipe/          the core: model, decoding, tokenizer, weights, engine, partition, config
    nanopipe/cluster/  the wire, the handshake, a worker stage, the leader, a client
    nanopipe/web/      the Flask app, the guide's chat API, the OpenAI-compatible API, metrics
    nanopipe/tools/    the CLI, pull, a local cluster, trace, benchmarks

Read from the source (ast), so a lazy import inside a function counts as much as one at the top.
"""
from __future__ import annotations

import ast
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
    """web/app.py (create_app) registers chat, openai and metrics; they share web/api.py, and none of them
    imports app.py back (the cycle web/app.py <-> web/openai.py was dodged with imports inside functions)."""
    g = graph()
    web = [m for m in g if layer(m) == "web" and m != "nanopipe.web.app"]
    assert not [m for m in web if "nanopipe.web.app" in g[m]], "a web module imports web/app.py"
    assert {"nanopipe.web.chat", "nanopipe.web.openai", "nanopipe.web.api"} <= g["nanopipe.web.app"]


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


def private_imports(root: Path) -> list:
    """Every place a module of the package under `root` takes a private name (`_x`, not `__x__`) from
    another of its modules: `from .wire import _parse_header`, or `wire._parse_header` after
    `from . import wire` / `import nanopipe.cluster.wire as wire`."""
    package = root.name
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    found = []
    for mod, path in mods.items():
        pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        tree = ast.parse(path.read_text())
        aliases = set()                 # local names bound to a module of the package
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases |= {a.asname for a in node.names if a.asname and a.name.startswith(package)}
            elif isinstance(node, ast.ImportFrom):
                base = pkg[: len(pkg) - (node.level - 1)] if node.level else []
                name = ".".join(base + ([node.module] if node.module else []))
                if not name.startswith(package) or name == mod:
                    continue
                for a in node.names:
                    if f"{name}.{a.name}" in mods:
                        aliases.add(a.asname or a.name)
                    elif a.name.startswith("_") and not a.name.endswith("__"):
                        found.append(f"{path.relative_to(root.parent)}:{node.lineno} imports {a.name} from {name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.endswith("__")):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_private_imports_across_modules():
    """A name with a leading underscore is its module's own business: another module that needs it
    needs a public name (or the thing belongs elsewhere)."""
    found = private_imports(PKG)
    assert not found, "private names used across modules:\n  " + "\n  ".join(found)


def test_the_shape_checks_can_fail(tmp_path):
    """Both checks above catch what they are for, on a package made for the purpose."""
    fake = tmp_path / "nanopipe"
    (fake / "cluster").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "cluster" / "__init__.py").write_text("")
    (fake / "cluster" / "wire.py").write_text("def _parse(): pass\n\nclass Big:\n" + "    x = 1\n" * 300)
    (fake / "cluster" / "net.py").write_text("from .wire import _parse\nfrom . import wire\n\nwire._parse()\n")
    assert class_lengths(fake)[0] == (301, "nanopipe/cluster/wire.py:Big")
    assert private_imports(fake) == ["nanopipe/cluster/net.py:1 imports _parse from nanopipe.cluster.wire",
                                     "nanopipe/cluster/net.py:4 uses wire._parse"]
