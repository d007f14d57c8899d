"""dinospec: DINOv2-style self-supervised pretraining with token-type specialised ViTs."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="dinospec",
    version="0.1.0",
    description="DINOv2-family SSL pretraining of ViTs whose layers can route [CLS], registers and patches "
    "through separate parameters",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dinospec", "dinospec.*"]),
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "omegaconf>=2.3",
        "fvcore>=0.1.5",
        "submitit>=1.5",
        "wandb>=0.17",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "numpy>=1.24",
        "pillow>=10",
    ],
    extras_require={
        "gpu": ["xformers"],
        "dev": ["pytest>=8", "timm>=1.0", "scikit-image>=0.22", "scikit-learn>=1.3"],
    },
    entry_points={"console_scripts": ["dinospec=dinospec.cli:main"]},
)
