#!/usr/bin/env bash
# Install torch into the environment of the Python named by $1, unless it has torch already.
#
#   - A torch already installed is kept, whatever its version or build.
#   - Where nvidia-smi lists a GPU: the pinned version from PyPI, whose Linux wheel is the CUDA build.
#   - Elsewhere on Linux, the CPU build (about 200 MB, where the CUDA build pulls several GB): from a
#     wheel folder that pip is configured with (find-links), when it holds that build, else from
#     PyTorch's CPU index. The local folder is asked first, with --no-index, because pip cannot skip
#     an index it cannot reach without retrying it for every package (minutes, on a machine offline).
#   - On other systems, PyPI's wheel, which is the CPU build there.
#
# TORCH_VERSION chooses the version (default: the one this project's figures were measured with).
set -euo pipefail
python=$1
version=${TORCH_VERSION:-2.13.0}
cpu_index=https://download.pytorch.org/whl/cpu

if installed=$("$python" -c "from importlib.metadata import version; print(version('torch'))" 2>/dev/null); then
    echo "torch $installed is installed: keeping it"
elif nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    echo "nvidia-smi lists a GPU: installing torch $version, CUDA build"
    "$python" -m pip install "torch==$version"
elif [ "$(uname -s)" != Linux ]; then
    echo "installing torch $version"
    "$python" -m pip install "torch==$version"
elif "$python" -m pip install --quiet --dry-run --no-deps --no-index "torch==$version+cpu" >/dev/null 2>&1; then
    echo "no NVIDIA GPU: installing torch $version, CPU build, from pip's local wheels"
    "$python" -m pip install "torch==$version+cpu"
else
    echo "no NVIDIA GPU: installing torch $version, CPU build, from $cpu_index"
    "$python" -m pip install --index-url "$cpu_index" "torch==$version"
fi
