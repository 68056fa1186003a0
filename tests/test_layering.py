"""Dependencies point one way: plain parameters ← the maths ← the pipeline core ← predictor / train / batch ← cli / ui.

The imports are read from the source (every ``import``, also inside functions), so the rule holds
for lazy imports too. A new module must be given a layer here.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rfm"

LAYERS = [
    {"constants", "checks", "params", "paths", "fileio"},  # plain data: no torch, no numpy
    {"synthetic", "data", "export", "metrics", "text", "clip_model", "backbone", "refine", "par", "losses",
     "decoder", "cam", "viz", "demo"},
    {"pipeline"},
    {"predictor", "train", "batch", "sweep"},
    {"__init__"},  # the public API: `import rfm`
    {"session"},
    {"render"},
    {"components"},  # the studio's Gradio inputs
    {"cli", "ui"},
    {"__main__"},
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}
PLAIN = LAYERS[0]


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(rfm modules, third-party top-level packages) that a module imports anywhere in its source."""
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "rfm":
                    internal.add(parts[1] if len(parts) > 1 else "__init__")
                else:
                    external.add(parts[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.split(".")[0] != "rfm":
                external.add(node.module.split(".")[0])
                continue
            parts = (node.module or "").split(".")
            parts = parts[1:] if node.level == 0 else parts  # "rfm.x" → "x"; ".x" → "x"
            if parts and parts[0]:
                internal.add(parts[0])
            else:  # `from . import a, b` / `from rfm import a, b`: submodules or names of the public API
                for alias in node.names:
                    internal.add(alias.name if (PACKAGE / f"{alias.name}.py").is_file() else "__init__")
    return internal, external


MODULES = {p.stem: _imports(p) for p in sorted(PACKAGE.glob("*.py"))}


def test_every_module_has_a_layer():
    assert set(MODULES) - set(LAYER) == set(), "place the new module in LAYERS"
    assert set(LAYER) - set(MODULES) == set(), "LAYERS names a module that no longer exists"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_one_above_it(module):
    upward = {dep for dep in MODULES[module][0] if dep != module and LAYER[dep] > LAYER[module]}
    assert not upward, f"rfm.{module} (layer {LAYER[module]}) imports {sorted(upward)} from a layer above"


def test_no_import_cycle():
    graph = {m: {d for d in deps if d != m} for m, (deps, _) in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " → ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(PLAIN))
def test_parameter_modules_are_plain_python(module):
    heavy = MODULES[module][1] & {"torch", "numpy", "cv2", "PIL", "open_clip", "gradio", "matplotlib"}
    assert not heavy, f"rfm.{module} must stay importable without {sorted(heavy)} (rfm --help, params)"


def test_the_scanner_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("from . import refine as rf\nfrom .backbone import x\nimport rfm\nimport rfm.cli\n"
                      "from rfm import export, Predictor\n\ndef f():\n    import torch\n    from .pipeline import y\n")
    internal, external = _imports(source)
    assert internal == {"refine", "backbone", "__init__", "cli", "export", "pipeline"}
    assert external == {"torch"}
