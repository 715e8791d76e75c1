"""Entry point: ``python -m fastnabla.train --config … --output-dir … [key=value …]``.

The same file runs as a script path (``python fastnabla/train.py``, ``deepspeed fastnabla/train.py``).
Bad configuration → one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script path (python/deepspeed fastnabla/train.py)
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == _here:
        sys.path.pop(0)  # fastnabla/'s modules must not be importable as top-level `config`, `loss`, …
    try:
        import fastnabla  # noqa: F401  (installed: pip install -e .)
    except ImportError:  # a bare checkout: the repository root last, so nothing in it shadows an installed package
        sys.path.append(os.path.dirname(_here))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other bad input
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastnabla.train", description="∇-GFlowNet (residual ∇-DB) finetuning")
    p.add_argument("--config", help="YAML config (sections model reward prompts sampling gfn train eval logging "
                                    "checkpoint, and seed); without it the embedded toy2d default runs")
    p.add_argument("--output-dir", help="where metrics, checkpoints, plots and final weights go")
    p.add_argument("--deepspeed", help="DeepSpeed JSON config (same as train.deepspeed=…)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides parsed as YAML, e.g. gfn.reward_scale=2.0 seed=3")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from fastnabla.config import ConfigError, load_config

    overrides = list(args.overrides)
    if args.deepspeed:
        overrides.append(f"train.deepspeed={args.deepspeed}")
    try:
        cfg = load_config(args.config, overrides, output_dir=args.output_dir)
    except ConfigError as e:
        print(f"fastnabla.train: error: {e}", file=sys.stderr)
        return 2
    # one log: ranks other than 0 (deepspeed launcher / torchrun set RANK) only report warnings and errors
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    from fastnabla.trainer import TrainingStopped, build_trainer

    try:
        trainer = build_trainer(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastnabla.train: error: {e}", file=sys.stderr)
        return 2
    try:
        result = trainer.run()
    except TrainingStopped as e:
        print(f"fastnabla.train: stopped: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # e.g. resuming with another world size
        print(f"fastnabla.train: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from fastnabla.engine import CollectiveTimeout

        if not isinstance(e, CollectiveTimeout):
            raise
        print(f"fastnabla.train: error: {e}", file=sys.stderr)
        return 1
    if trainer.is_main:
        if result.get("stopped"):
            print(f"stopped by signal at epoch {result['epoch']}; resume with checkpoint.resume_from=latest")
        else:
            keys = ("tv", "off_manifold", "eval_reward_mean")
            print("done: " + ", ".join(f"{k}={result[k]:.4f}" for k in keys if k in result))
            for p in result.get("plots", []):
                print(f"plot: {p}")
            print(f"outputs in {os.path.abspath(cfg.output_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
