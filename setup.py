from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="llama_int8",
    version="0.1.0",
    description="Memory-frugal quantized single-GPU inference for LLaMA-family models",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["llama_int8", "llama_int8.*"]),
    python_requires=">=3.10",
    install_requires=Path(__file__).with_name("requirements.txt").read_text().split(),
    # flash-attn stays a separate, optional install: as a dependency it would compile CUDA code.
    extras_require={"test": ["pytest", "transformers", "accelerate", "peft"]},
)
