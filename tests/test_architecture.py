"""Layering: `import latentlab` stays light, imports follow the layers, and the linter is clean."""

import ast
import subprocess
import sys
from pathlib import Path

# tqdm is absent from this list because torch itself imports it.
HEAVY = ["diffusers", "transformers", "sklearn", "umap", "numba", "imageio", "imageio_ffmpeg", "matplotlib",
         "ipywidgets", "anywidget", "IPython", "scipy", "PIL", "safetensors", "accelerate", "huggingface_hub",
         "onnxruntime"]


def test_import_latentlab_loads_torch_and_nothing_heavier():
    code = (
        "import sys, latentlab; "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules)); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "", f"import latentlab loaded heavy packages: {out[0]}"
    assert out[1] == "True"


# --- the layer rule, read from the source (lazy imports inside functions included) --------------------------------

PKG = Path(__file__).resolve().parents[1] / "latentlab"

#: Each top-level component of latentlab and its layer (../shared/HOUSE_STYLE.md). A module may import components
#: of lower layers only (and its own package); layer-0 privates are the only private modules others may import.
LAYERS = {
    "ops": 0, "_checks": 0, "_files": 0, "_tensors": 0, "_quiet": 0, "_version": 0,
    "seeds": 1, "paths": 1, "sampling": 1, "embedded": 1, "embedded.world": 1, "audio": 1,
    "toy2d": 1,  # the 2-D teaching models: pure torch
    "metrics": 1,  # morph measures (PPL, PDV, 1 - Gini): pure torch
    "backend": 2, "clip": 2, "project": 2, "store": 2, "video": 2, "distributed": 2,
    "morph": 3, "atlas": 3,
    "embedded.evaluate": 3,  # the automatic evaluator: a development tool the benchmarks and notebooks use
    "widgets": 4, "embedded.train": 4, "exports": 4,
    "cli": 5,  # the leaf over everything, exports (formats of other tools, built on morph) included
    "benchmarks": 5,  # measure everything, the widgets included; nothing imports them
    "__main__": 6,  # `python -m latentlab`: the cli
    "__init__": 3,  # the package face re-exports layers 0-2
}
#: Owners of heavy third-party packages: nothing else may import them, even lazily.
OWNERS = {
    "diffusers": {"backend", "embedded.train", "embedded.evaluate"},
    "transformers": {"backend", "clip", "embedded.train", "embedded.evaluate"},
    "sklearn": {"project"}, "umap": {"project"},
    "imageio": {"video"}, "imageio_ffmpeg": {"video"},
    "ipywidgets": {"widgets"}, "anywidget": {"widgets"},
    "accelerate": {"distributed"},
    "onnxruntime": {"backend"}, "onnx": {"backend"},
}


def _component(module: str) -> str:
    """latentlab.backend.lab -> backend; latentlab.embedded.world -> embedded.world; latentlab -> __init__."""
    parts = module.split(".")[1:]
    if not parts:
        return "__init__"
    if parts[:2] in (["embedded", "train_flow"], ["embedded", "train_fast"]):
        return "embedded.train"  # one development tool in three files: the UNet recipe, the flow twin's, the fast one's
    if parts[0] == "embedded" and len(parts) > 1 and f"embedded.{parts[1]}" in LAYERS:
        return f"embedded.{parts[1]}"
    return parts[0]


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield name, path


def _targets(node: ast.AST, source_module: str):
    """(imported latentlab module, imported name or None) for one import node."""
    if isinstance(node, ast.Import):
        for a in node.names:
            yield a.name, None
    elif isinstance(node, ast.ImportFrom) and node.module:
        for a in node.names:
            sub = f"{node.module}.{a.name}"
            is_module = (PKG.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (
                PKG.parent / Path(*sub.split("."))).is_dir()
            yield (sub, None) if is_module else (node.module, a.name)


def test_every_import_respects_the_layers_and_no_private_name_crosses_a_module():
    problems = []
    for module, path in _modules():
        src = _component(module)
        assert src in LAYERS, f"{module}: add its component {src!r} to LAYERS"
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target, name in _targets(node, module):
                top = target.split(".")[0]
                # Benchmarks call plain diffusers/scikit-learn/ffmpeg on purpose: those are their baselines.
                if top in OWNERS and src not in OWNERS[top] and src != "benchmarks":
                    problems.append(f"{module} imports {top} (owned by {sorted(OWNERS[top])})")
                if top != "latentlab":
                    continue
                dst = _component(target)
                same_package = dst == src
                if not same_package and LAYERS[dst] >= LAYERS[src] and not (LAYERS[src] == 0 and LAYERS[dst] == 0):
                    problems.append(f"{module} (layer {LAYERS[src]}) imports {target} (layer {LAYERS[dst]})")
                if name and name.startswith("_") and not name.startswith("__") and not same_package:
                    problems.append(f"{module} imports the private name {name} of {target}")
                if dst == "__init__" and src != "cli" and name not in (None,) and not same_package:
                    problems.append(f"{module} imports {name} from the package face")
    assert not problems, "\n".join(problems)


def test_upper_layers_touch_no_private_attribute_of_another_object():
    """morph, atlas, cli and widgets use the backend through its protocol: no `lab._something`."""
    problems = []
    for module, path in _modules():
        if LAYERS[_component(module)] < 3 or _component(module) in ("__init__", "benchmarks") or "embedded" in module:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                problems.append(f"{module}:{node.lineno} uses .{node.attr}")
    assert not problems, "\n".join(problems)


def test_ruff_is_clean():
    """The linter's findings are bugs waiting (unused imports, shadowed names): none allowed."""
    import shutil

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    out = subprocess.run([ruff, "check", str(PKG), str(PKG.parent / "tests")], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


BACKEND = PKG / "backend"


def _backend_imports() -> dict[str, set[str]]:
    """Module -> the latentlab.backend modules it imports (lazy imports included; TYPE_CHECKING ones too)."""
    graph: dict[str, set[str]] = {}
    for module, path in _modules():
        if not module.startswith("latentlab.backend"):
            continue
        deps = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, _ in _targets(node, module):
                    if target.startswith("latentlab.backend") and target != module:
                        deps.add(target)
    return graph


def test_the_backend_has_no_import_circle():
    """engine <- families <- edits/trajectory <- lab: every import runs one way (the package face excepted)."""
    graph = {m: {d for d in deps if d != "latentlab.backend"} for m, deps in _backend_imports().items()
             if m != "latentlab.backend"}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            visit(d)
        stack.pop()
        seen.add(m)

    for m in sorted(graph):
        visit(m)
    assert not cycles, cycles
    assert "latentlab.backend.lab" not in graph["latentlab.backend.engine"]
    assert "latentlab.backend.lab" not in graph["latentlab.backend.edits"] | graph["latentlab.backend.trajectory"]


def test_no_family_check_outside_the_family_adapters():
    """What differs between model families lives in backend/families/ only: nothing else names a family."""
    import re

    family_words = re.compile(r"\b(is_sdxl|StableDiffusion(XL|3)\w*Pipeline|Flux\w*Pipeline|family\s*==|"
                              r"text_encoder_2|transformer\.config|unet\.config)\b")
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[:2] == ("backend", "families") or rel.parts[0] in ("embedded", "benchmarks"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if family_words.search(code) and not code.strip().startswith(('"', "'")):
                problems.append(f"{rel}:{i}: {line.strip()}")
    assert not problems, "\n".join(problems)
