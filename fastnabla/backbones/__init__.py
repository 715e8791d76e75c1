"""Backbones: what the trainer talks to (see ``base.Backbone``)."""
from fastnabla.backbones.base import Backbone

__all__ = ["Backbone", "build_backbone"]


def build_backbone(cfg, reward=None) -> Backbone:
    """The backbone ``cfg.model.backbone``; ``reward`` (built first) tells it whether the reward reads prompts."""
    if cfg.model.backbone == "toy2d":
        from fastnabla.backbones.toy2d import Toy2DBackbone

        return Toy2DBackbone.from_config(cfg)
    if cfg.model.backbone == "sd":
        from fastnabla.backbones.sd import SDBackbone

        return SDBackbone.from_config(cfg, reward)
    if cfg.model.backbone == "pixel":
        from fastnabla.backbones.pixel import PixelBackbone

        return PixelBackbone.from_config(cfg)
    raise ValueError(f"model.backbone={cfg.model.backbone!r}: must be toy2d, sd or pixel")
