"""The ``fastnabla`` console script: ``fastnabla train …``, ``fastnabla export …``, ``fastnabla pretrain-digits …``.

    fastnabla train --config configs/sd15_aesthetic.yaml --output-dir runs/aesthetic [key=value …]
    fastnabla export --pretrained DIR_OR_HUB_ID --lora runs/aesthetic/final --output runs/aesthetic/fused
    fastnabla pretrain-digits --config configs/digits.yaml --report runs/digits/pretrained.json

Each subcommand takes the same arguments as its module (``python -m fastnabla.train`` / ``fastnabla.export``).
A missing or unknown subcommand → one line on stderr and exit code 2.
"""
from __future__ import annotations

import sys

COMMANDS = {"train": "train with a YAML config and dotted overrides",
            "export": "fuse a saved LoRA into a full diffusers pipeline directory",
            "pretrain-digits": "train (once, cached) the digits classifier and UNet and measure them"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        if argv:
            print("usage: fastnabla {train,export,pretrain-digits} …\n"
                  + "\n".join(f"  {k:16s}{v}" for k, v in COMMANDS.items()))
            return 0
        print("fastnabla: error: missing subcommand; use `fastnabla train …` or `fastnabla export …`",
              file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from fastnabla.train import main as train_main

        return train_main(rest)
    if cmd == "export":
        from fastnabla.export import main as export_main

        return export_main(rest, prog="fastnabla export")
    if cmd == "pretrain-digits":
        from fastnabla.digits import main as digits_main

        return digits_main(rest)
    print(f"fastnabla: error: unknown subcommand {cmd!r}; use train, export or pretrain-digits", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
