"""fastnabla: residual ∇-DB (∇-GFlowNet) finetuning of diffusion models toward differentiable rewards."""
from setuptools import setup

setup(
    name="fastnabla",
    version="0.1.0",
    description="Fast ∇-GFlowNet (residual ∇-DB) finetuning of diffusion models toward differentiable rewards",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` lives at the repository root but is installed as `fastnabla.kernels`. It has no __init__.py, so
    # even a process started from the repository root (root on sys.path) cannot import it as a top-level
    # `kernels` in front of Hugging Face's; in a checkout (editable or bare) fastnabla/__init__.py binds it.
    packages=["fastnabla", "fastnabla.backbones", "fastnabla.rewards", "fastnabla.kernels"],
    package_dir={"fastnabla": "fastnabla", "fastnabla.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "safetensors",
        "diffusers>=0.30",
        "transformers>=4.44",
        "accelerate",
        "peft>=0.12",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "scipy"],
        "8bit": ["bitsandbytes>=0.45"],
        "deepspeed": ["deepspeed>=0.15"],
        "xformers": ["xformers"],
        "rewards": ["scipy"],
        # the digits benchmark: scikit-learn's load_digits and torchmetrics' FID/KID
        "digits": ["scikit-learn", "torchmetrics"],
    },
    entry_points={"console_scripts": ["fastnabla=fastnabla.cli:main"]},
)
