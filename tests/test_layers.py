"""The house's import rule (ARCHITECTURE.md): no module imports one above it.

Every ``fastnabla`` module has a layer; an import (at module level or inside a function) may only reach the same or
a lower layer. A new module must be given a layer here, so its place in the house is a decision, not an accident.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: lowest first
LAYERS = [
    # the spec: pure descriptions, no models
    {"fastnabla.loss_contract", "fastnabla._dependency_logs", "fastnabla.transitions", "fastnabla.checkpoint", "fastnabla.prompts",
     "fastnabla.backbones.base", "fastnabla.rewards.base", "fastnabla.engine"},
    # tensors in, tensors out: the loss and its kernel; models: rewards and backbones
    {"fastnabla.kernels", "fastnabla.kernels.residual_db", "fastnabla.loss", "fastnabla.rewards",
     "fastnabla.rewards.simple", "fastnabla.rewards.clip_common", "fastnabla.rewards.aesthetic",
     "fastnabla.rewards.pickscore", "fastnabla.rewards.hpsv2", "fastnabla.rewards.imagereward",
     "fastnabla.rewards.combo", "fastnabla.rewards.digits", "fastnabla.backbones", "fastnabla.backbones.toy2d",
     "fastnabla.backbones.sd", "fastnabla.backbones.pixel", "fastnabla"},
    # trajectories over backbones
    {"fastnabla.sampling"},
    # what the loop composes: methods, metrics
    {"fastnabla.methods", "fastnabla.methods.base", "fastnabla.methods.nabla_gfn", "fastnabla.methods.chain",
     "fastnabla.methods.refl", "fastnabla.methods.draft", "fastnabla.methods.alignprop", "fastnabla.methods.ddpo",
     "fastnabla.metrics", "fastnabla.value",
     "fastnabla.report"},
    {"fastnabla.config"},
    # the digits benchmark: data, classifier and UNet pretraining, importance-sampled target
    {"fastnabla.digits"},
    {"fastnabla.trainer"},
    {"fastnabla.train", "fastnabla.export", "fastnabla.cli"},
]

#: known upward imports, each with its reason; shrink this list, never grow it without one
ALLOWED = {
    # the digits assets are built on first use by the modules that need them (cached afterwards)
    ("fastnabla.backbones.pixel", "fastnabla.digits"): "pretrained UNet, trained when not cached",
    ("fastnabla.rewards.digits", "fastnabla.digits"): "the classifier, trained when not cached",
    ("fastnabla.metrics", "fastnabla.digits"): "the digits benchmark's evaluation",
    ("fastnabla.value", "fastnabla.digits"): "the value is cached beside the digits assets, keyed by their reference digest",
}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "kernels":
        parts = ("fastnabla", "kernels") + rel.with_suffix("").parts[1:]
    else:
        parts = rel.with_suffix("").parts
    name = ".".join(parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _layer(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"{name} has no layer in tests/test_layers.py: give it one")


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastnabla"):
            yield node.module
            for a in node.names:  # `from fastnabla import metrics` imports the submodule
                if node.module == "fastnabla" and (ROOT / "fastnabla" / f"{a.name}.py").exists():
                    yield f"fastnabla.{a.name}"
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("fastnabla"))


def test_no_module_imports_one_above_it():
    files = sorted((ROOT / "fastnabla").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    bad = []
    for path in files:
        mod = _module(path)
        for dep in set(_imports(path)):
            if dep == mod or (mod, dep) in ALLOWED:
                continue
            if _layer(dep) > _layer(mod):
                bad.append(f"{mod} imports {dep}")
    assert not bad, "; ".join(sorted(bad))
