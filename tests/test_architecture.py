"""The layering of docs/architecture.md, checked on the source: imports go downward only, and no module imports itself back."""

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = Path(__file__).resolve().parents[1] / "mltk"

# Lower number: lower layer. A module may import from its own layer or below, never above.
LAYERS = {
    0: ["errors", "ctrl_c", "devices", "display", "outputs", "memory", "rules", "config", "hookspecs", "plugins", "registry", "lifecycle"],  # the ground
    1: ["data", "datasets", "checkpoint", "model", "embedding", "losses", "knn", "gpu_pass", "metrics_kernels", "allpairs", "roc", "metrics", "pairs", "report", "thresholds", "rerank", "distributed", "run_dir", "default_plugins"],  # the pieces
    2: ["train", "evaluate", "calibrate", "index", "index_edits", "serve", "embed_files", "verify", "export", "compare", "fetch", "tune"],  # the workflows
    3: ["cli", "__main__", "__init__"],  # what users call: the commands, and the package's own names (mltk.load, mltk.hookimpl)
}
LAYER_NAMES = ("ground", "pieces", "workflows", "interface")
# The package's own names that belong to the ground: a plugin's ``mltk.hookimpl`` (mltk.hookspecs) and the version.
PACKAGE_GROUND_NAMES = {"hookimpl", "__version__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of ``mltk.X`` or ``mltk.X.Y``: by its first name under mltk (``mltk`` itself: the interface)."""
    top = module.split(".")[1] if "." in module else "__init__"
    found = [layer for layer, names in LAYERS.items() if top in names]
    assert found, f"{module} is in no layer of tests/test_architecture.py (and docs/architecture.md): place it"
    return found[0]


def imports() -> dict[str, set[str]]:
    """Every mltk module and the mltk modules it imports, anywhere in it (inside functions too)."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        here = module_name(path)
        edges = found.setdefault(here, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):  # ``import mltk``: for mltk.hookimpl, a name of the ground
                names = [a.name for a in node.names if a.name != "mltk"]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from mltk import registry`` imports mltk.registry; ``from mltk import load`` the package itself
                names = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                    if not (node.module == "mltk" and a.name in PACKAGE_GROUND_NAMES)
                ]
            else:
                continue
            edges.update(n for n in names if n.split(".")[0] == "mltk" and n != here)
    return found


GRAPH = imports()


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_a_module_imports_only_from_its_layer_or_below(module):
    mine = layer_of(module)
    above = sorted(m for m in GRAPH[module] if layer_of(m) > mine)
    assert not above, f"{module} ({LAYER_NAMES[mine]}) imports from a layer above it: {above}"


def test_no_module_imports_itself_back_through_others():
    """No import circle, counting imports inside functions: a circle is a tangle even where Python tolerates it."""
    nodes = {m for m in GRAPH if m != "mltk"}  # importing any mltk.X runs mltk/__init__.py: not an edge of the design
    graph = {m: {n for n in GRAPH[m] if n in nodes} for m in nodes}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (circle := visit(n)):
                return circle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(nodes):
        if m not in state and (circle := visit(m)):
            pytest.fail("import circle: " + " -> ".join(circle))


def test_the_layers_named_here_are_those_of_docs_architecture():
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for names in LAYERS.values():
        for name in names:
            if not name.startswith("__"):
                assert name in text, f"docs/architecture.md does not place {name}"


FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "marshal.loads"}


def test_nothing_runs_code_from_strings_or_pickles():
    """No eval/exec, no pickle or unsafe YAML; every torch.load passes weights_only=True, no np.load allows pickles."""
    sources = [*(REPO / "mltk").rglob("*.py"), *(p for p in (REPO / "plugins").rglob("*.py") if "build" not in p.parts)]
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert name not in FORBIDDEN_CALLS, where
                assert name != "torch.load" or keywords.get("weights_only") == "True", where
                assert keywords.get("allow_pickle") != "True", where
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not {"pickle", "dill", "marshal", "cloudpickle"} & {m.split(".")[0] for m in modules}, where
    assert len(sources) > 20
