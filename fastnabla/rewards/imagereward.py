"""ImageReward is registered but not implemented yet.

Its checkpoint is a BLIP (ViT-L + BERT with cross-attention) model plus an MLP head; the ``image-reward``
package does not work with transformers 5, and a transformers-based reimplementation has not been verified
against the official checkpoint layout yet. Until it is, asking for it fails with a clear message.
"""
from __future__ import annotations


def build_imagereward(**options):
    raise ValueError("imagereward is not available yet: the official BLIP-based checkpoint has no verified "
                     "transformers implementation in fastnabla (and the image-reward package is incompatible "
                     "with transformers 5); use aesthetic, hpsv2, hpsv2.1 or pickscore")
