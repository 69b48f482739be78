#!/usr/bin/env bash
# Build llama.cpp's llama-bench (float32 reference for `make bench`) outside the repo, once.
#
# The source is llama.cpp as vendored in PyPI's sdist of llama-cpp-python (the only registry this
# project's machines reach); the build is cached in $NANOPIPE_LLAMA_CPP (default
# /var/cache/nanopipe/llama.cpp) and reused. ~15-25 min on 2 loaded cores; needs cmake, a C++
# compiler and ninja or make. Usage: bash tests/parity/build_llama_cpp.sh [python]
set -euo pipefail
PY=${1:-python3}
ROOT=${NANOPIPE_LLAMA_CPP:-/var/cache/nanopipe/llama.cpp}
VERSION=0.3.36          # llama-cpp-python, as in requirements-bench.txt
JOBS=${JOBS:-2}
mkdir -p "$ROOT"
cd "$ROOT"
if [ -x build/bin/llama-bench ]; then
  echo "llama.cpp: $ROOT/build/bin/llama-bench is built already"
  exit 0
fi
if [ ! -d "llama_cpp_python-$VERSION" ]; then
  "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d .
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
ln -sfn "llama_cpp_python-$VERSION/vendor/llama.cpp" src
# the sdist keeps the git submodule's pointer file, whose target is not shipped: cmake then
# depends on a git index that never exists and ninja regenerates the build forever
rm -f src/.git
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S src -B build "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
cmake --build build -j"$JOBS" --target llama-bench
echo "llama.cpp: built $ROOT/build/bin/llama-bench"
