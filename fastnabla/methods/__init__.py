"""Finetuning methods: one file per method, each a per-batch objective over the shared loop (``base.Method``).

``method.name`` selects one; ``build_method`` is the registry.
"""
from __future__ import annotations

import importlib

from fastnabla.methods.base import Method, TransitionBatch

__all__ = ["Method", "TransitionBatch", "METHODS", "build_method"]

#: method.name → "module:class" (imported on use)
METHODS = {
    "nabla_gfn": "fastnabla.methods.nabla_gfn:NablaGFN",
    "refl": "fastnabla.methods.refl:ReFL",
    "draft": "fastnabla.methods.draft:DRaFT",
    "alignprop": "fastnabla.methods.alignprop:AlignProp",
    "ddpo": "fastnabla.methods.ddpo:DDPO",
}


def method_class(name: str) -> type:
    if name not in METHODS:
        raise ValueError(f"method.name={name!r} is not a method; valid: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(cfg, backbone, reward_fn, coeffs) -> Method:
    """The method ``cfg.method.name`` over the given backbone, reward and per-step coefficients."""
    return method_class(cfg.method.name)(backbone, reward_fn, coeffs, cfg)
