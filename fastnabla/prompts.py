"""Prompt sets: built-in lists, user files (txt / json / csv), training sampling and a fixed evaluation set.

    source = PromptSource("simple_animals")              # or "prompts.txt", "prompts.csv" with column="caption"
    batch = source.sample(16, generator=g)                # uniform with replacement; deterministic given g
    evaluation = eval_prompts("simple_animals", n=32, seed=0)   # [(prompt, seed), ...], the same every run

File formats:

- ``.txt``: one prompt per line; surrounding whitespace stripped, blank lines skipped;
- ``.json``: a list of strings, or a list of objects from which ``column`` (default ``"prompt"``) is read;
- ``.csv``: a header row; prompts come from ``column`` (default: the ``prompt`` column, or the only column).
"""
from __future__ import annotations

import csv
import difflib
import json
import os
from typing import Optional, Sequence, Union

import torch

# Common animal names, each name being the whole prompt (the kind of prompt set the ∇-GFlowNet image experiments
# train on). Our own list of 45, all distinct, all lower case.
SIMPLE_ANIMALS: list[str] = [
    "cat", "dog", "horse", "cow", "pig", "sheep", "goat", "chicken", "duck", "rabbit",
    "mouse", "hamster", "fox", "wolf", "bear", "panda", "koala", "kangaroo", "lion", "tiger",
    "leopard", "cheetah", "elephant", "giraffe", "zebra", "hippopotamus", "rhinoceros", "camel", "deer", "moose",
    "monkey", "gorilla", "squirrel", "raccoon", "owl", "eagle", "parrot", "penguin", "flamingo", "swan",
    "frog", "turtle", "snake", "dolphin", "whale",
]

# The class labels of the class-conditional digits model (backbone pixel, model.class_conditional: true).
DIGITS: list[str] = [str(d) for d in range(10)]

BUILTIN_PROMPT_SETS: dict[str, list[str]] = {"simple_animals": SIMPLE_ANIMALS, "digits": DIGITS}

PromptInput = Union[str, os.PathLike, Sequence[str], "PromptSource"]


def _clean(prompts, where: str) -> list[str]:
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompts: entry {i} of {where} is a {type(p).__name__}, not a string")
        p = p.strip()
        if p:
            out.append(p)
    if not out:
        raise ValueError(f"prompts: {where} contains no prompts")
    return out


def _read_csv(path: str, column: Optional[str]) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [c for c in (reader.fieldnames or []) if c is not None]
        if not fields:
            raise ValueError(f"prompts: {path} is empty (a csv file needs a header row)")
        if column is None:
            if "prompt" in fields:
                column = "prompt"
            elif len(fields) == 1:
                column = fields[0]
            else:
                raise ValueError(f"prompts: {path} has several columns ({', '.join(fields)}) and none is named "
                                 f"'prompt'; set prompts.column to one of them")
        if column not in fields:
            raise ValueError(f"prompts: column {column!r} not in {path}; available columns: {', '.join(fields)}")
        return [row[column] or "" for row in reader]


def _read_json(path: str, column: Optional[str]) -> list:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompts: {path} is not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"prompts: {path} must hold a JSON list (of strings, or of objects with a "
                         f"{column or 'prompt'!r} field), got a {type(data).__name__}")
    if data and all(isinstance(d, dict) for d in data):
        key = column or "prompt"
        missing = [i for i, d in enumerate(data) if key not in d]
        if missing:
            keys = sorted({k for d in data for k in d})
            raise ValueError(f"prompts: field {key!r} missing from entry {missing[0]} of {path}; "
                             f"available fields: {', '.join(keys)}")
        return [d[key] for d in data]
    return data


def load_prompts(source: PromptInput, column: Optional[str] = None) -> list[str]:
    """The prompts of a built-in set name, a file path, a list of strings or a ``PromptSource``."""
    if isinstance(source, PromptSource):
        return list(source.prompts)
    if isinstance(source, (list, tuple)):
        return _clean(source, "the given list")
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"prompts: expected a built-in set name, a file path or a list of strings, "
                         f"got {type(source).__name__}")
    name = os.fspath(source)
    if name in BUILTIN_PROMPT_SETS:
        return list(BUILTIN_PROMPT_SETS[name])
    path = os.path.expanduser(name)
    if not os.path.isfile(path):
        close = difflib.get_close_matches(name, list(BUILTIN_PROMPT_SETS), n=1)
        hint = f"; did you mean the built-in set {close[0]!r}?" if close else ""
        raise ValueError(f"prompts: {name!r} is neither a built-in prompt set ({', '.join(BUILTIN_PROMPT_SETS)}) "
                         f"nor an existing file (.txt, .json or .csv){hint}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        raw = _read_csv(path, column)
    elif ext == ".json":
        raw = _read_json(path, column)
    elif ext in (".txt", ""):
        if column is not None:
            raise ValueError(f"prompts.column is only meaningful for .csv / .json files, not {path}")
        with open(path, encoding="utf-8") as f:
            raw = f.read().splitlines()
    else:
        raise ValueError(f"prompts: unsupported file type {ext!r} for {path}; use .txt (one per line), "
                         f".json (a list) or .csv (with a header row)")
    return _clean(raw, path)


class PromptSource:
    """A fixed list of prompts to draw training batches from."""

    def __init__(self, source: PromptInput, column: Optional[str] = None):
        self.prompts: list[str] = load_prompts(source, column)
        self.name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "custom"

    def __len__(self) -> int:
        return len(self.prompts)

    def __repr__(self) -> str:
        return f"PromptSource({self.name!r}, {len(self)} prompts)"

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> list[str]:
        """``n`` prompts drawn uniformly with replacement. The same generator state gives the same prompts (the
        draw is made on the CPU, so it does not depend on the device)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        idx = torch.randint(len(self.prompts), (n,), generator=generator, device="cpu")
        return [self.prompts[i] for i in idx.tolist()]


def load_prompt_source(spec: PromptInput, column: Optional[str] = None) -> PromptSource:
    """The trainer's entry point: a built-in set name or a prompt file → ``PromptSource``."""
    return spec if isinstance(spec, PromptSource) else PromptSource(spec, column)


def eval_prompts(source_or_file: PromptInput, n: int, seed: int = 0,
                 column: Optional[str] = None) -> list[tuple[str, int]]:
    """A fixed evaluation set: ``n`` pairs (prompt, noise seed), identical for the same arguments on every run.

    The prompts are a seeded permutation of the source, cycled when ``n`` is larger than the source (each prompt
    then appears ⌈n/len⌉ or ⌊n/len⌋ times, with different noise seeds). Noise seeds are drawn from the same
    seeded generator; use them with ``torch.Generator().manual_seed(s)`` for each image.
    """
    if n <= 0:
        raise ValueError(f"eval prompts: n must be > 0, got {n}")
    prompts = load_prompts(source_or_file, column)
    g = torch.Generator().manual_seed(int(seed))
    order: list[int] = []
    while len(order) < n:
        order += torch.randperm(len(prompts), generator=g).tolist()
    noise_seeds = torch.randint(0, 2**31 - 1, (n,), generator=g).tolist()
    return [(prompts[i], s) for i, s in zip(order[:n], noise_seeds)]


__all__ = ["SIMPLE_ANIMALS", "BUILTIN_PROMPT_SETS", "load_prompts", "PromptSource", "load_prompt_source", "eval_prompts"]
