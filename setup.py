from pathlib import Path

from setuptools import find_packages, setup


def requirements(name: str) -> list[str]:
    """The requirements listed in a requirements file, one a line, comments left out."""
    lines = (line.split("#", 1)[0].strip() for line in Path(__file__).with_name(name).read_text().splitlines())
    return [line for line in lines if line]


setup(
    name="llama_int8",
    version="0.1.0",
    description="Memory-frugal quantized single-GPU inference for LLaMA-family models",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["llama_int8", "llama_int8.*"]),
    python_requires=">=3.10",
    install_requires=requirements("requirements.txt"),
    # flash-attn stays a separate, optional install: as a dependency it would compile CUDA code.
    extras_require={"test": requirements("requirements-test.txt")},
)
