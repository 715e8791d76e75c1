"""Tiny random reward models saved in the real checkpoint formats (session-scoped: built once per run)."""
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # `tests.helpers` importable however pytest was started
    sys.path.insert(0, _ROOT)

from tests.helpers.openclip_format import save_hps_style_checkpoint  # noqa: E402
from tests.helpers.tiny_clip import make_tiny_clip  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """Tiny CLIP (QuickGELU, like OpenAI's ViT-L/14 and PickScore's config) + tokenizer + preprocessor config."""
    return make_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")), seed=0)


@pytest.fixture(scope="session")
def whole_clip_dir(tmp_path_factory):
    """A tiny CLIP whose projection size (16) is stated at the top of config.json only: the vision and text
    sub-configs carry transformers' 512 default, as a whole ``CLIPModel`` saved with transformers 5 does."""
    return make_tiny_clip(str(tmp_path_factory.mktemp("whole_clip")), seed=3, projection_in_subconfigs=False)


@pytest.fixture(scope="session")
def aesthetic_head_file(tmp_path_factory, tiny_clip_dir):
    """A random head written with the released file's exact keys (layers.0/2/4/6/7), built here by hand."""
    torch.manual_seed(1)
    dims = [16, 1024, 128, 64, 16, 1]  # 16 = the tiny CLIP's projection dim (768 for ViT-L/14)
    sd = {}
    for idx, (a, b) in zip([0, 2, 4, 6, 7], zip(dims[:-1], dims[1:])):
        sd[f"layers.{idx}.weight"] = torch.randn(b, a) / a ** 0.5
        sd[f"layers.{idx}.bias"] = torch.randn(b) * 0.1
    path = str(tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth")
    torch.save(sd, path)
    return path


@pytest.fixture(scope="session")
def tiny_hps(tmp_path_factory):
    """(checkpoint path, the tiny CLIPModel it was written from, its directory with the tokenizer).

    GELU like the LAION ViT-H-14; 4 heads of width 8 (passed as vision_heads/text_heads: width 32 is in no
    OpenCLIP config, so the loader does not guess).
    """
    from transformers import CLIPModel

    d = make_tiny_clip(str(tmp_path_factory.mktemp("tiny_hps")), seed=2, hidden_act="gelu")
    model = CLIPModel.from_pretrained(d).eval()
    path = save_hps_style_checkpoint(model, os.path.join(d, "HPS_v2_compressed.pt"))
    return path, model, d
