#!/usr/bin/env bash
# `make test-arm64`: nanopipe on a Raspberry Pi's software, emulated. An arm64 Debian bookworm root
# (Pi OS's base: Python 3.11, Debian's python3-numpy 1.24 on the reference BLAS, PyYAML, click) runs
# under qemu-user; it is built once (~2-15 min) and cached outside the clone, then each run:
#   (a) the core engine/model/decoding tests, under that Python and numpy (pytest from Debian);
#   (b) an x86 leader (this checkout's .venv) and an arm64 worker on loopback: tokens and logprobs
#       against one x86 process, and the BLAS line the arm64 node prints;
#   (c) the same worker with no /proc mounted (as on macOS): it must join and answer.
# Root only (chroot, binfmt_misc, mmdebstrap): elsewhere it says why it skips, and exits 0.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="${NANOPIPE_ARM64_ROOT:-/var/cache/nanopipe/arm64-bookworm}"
PACKAGES=python3,python3-numpy,python3-yaml,python3-click
EXTRAS=python3-pytest           # added to the cached root in a step of its own (stamp below)
PY="${PY:-.venv/bin/python}"
LOG=/tmp/nanopipe-arm64.log
skip() { echo "test-arm64: skipped: $*"; exit 0; }
t0=$(date +%s)

[ "$(id -u)" = 0 ] || skip "needs root (chroot, binfmt_misc and mmdebstrap); run it as root"
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
  echo "test-arm64: installing ${need[*]} (log: $LOG)"
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}") >"$LOG" 2>&1 \
    || skip "could not install ${need[*]} with apt-get (see $LOG)"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>>"$LOG" \
    || skip "cannot mount binfmt_misc (a container without that privilege?)"
fi
if ! grep -qs '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64; then
  update-binfmts --enable qemu-aarch64 >>"$LOG" 2>&1 || true
fi
grep -qs '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || skip "qemu-aarch64 is not enabled in binfmt_misc"

# build the root once, atomically (into .tmp, then mv); another build of it running: wait for it
mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock 9
if [ ! -x "$ROOT/usr/bin/python3" ]; then
  while pgrep -f "mmdebstrap.*$ROOT.tmp" >/dev/null; do
    echo "test-arm64: another build of $ROOT is running; waiting"; sleep 20
  done
fi
if [ ! -x "$ROOT/usr/bin/python3" ]; then
  echo "test-arm64: building $ROOT (once; log: $LOG)"
  rm -rf "$ROOT.tmp"
  b0=$(date +%s)
  mmdebstrap --arch=arm64 --variant=apt --include="$PACKAGES" bookworm "$ROOT.tmp" >>"$LOG" 2>&1 \
    || { rm -rf "$ROOT.tmp"; skip "mmdebstrap could not build the root (Debian unreachable? see $LOG)"; }
  mv "$ROOT.tmp" "$ROOT"
  echo "test-arm64: built the root in $(( $(date +%s) - b0 )) s"
fi
if [ ! -e "$ROOT/.nanopipe-extras" ]; then
  echo "test-arm64: adding $EXTRAS to the root (once)"
  mount -t proc proc "$ROOT/proc"
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
  ok=0
  (chroot "$ROOT" apt-get update -q && chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive \
     apt-get install -y -q --no-install-recommends $EXTRAS && chroot "$ROOT" apt-get clean) >>"$LOG" 2>&1 || ok=$?
  umount "$ROOT/proc"
  [ "$ok" = 0 ] || skip "could not install $EXTRAS into the root (see $LOG)"
  echo "$EXTRAS" >"$ROOT/.nanopipe-extras"
fi
flock -u 9
echo "test-arm64: root ready ($(chroot "$ROOT" python3 -c 'import sys, numpy, platform; print(platform.machine(), "Python", sys.version.split()[0], "numpy", numpy.__version__)'))"

# the checkout, fresh each run (what git tracks plus files not yet added)
rm -rf "$ROOT/opt/nanopipe"
mkdir -p "$ROOT/opt/nanopipe"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$ROOT/opt/nanopipe"
mountpoint -q "$ROOT/proc" && umount "$ROOT/proc"

# (a) the engine under the Pi's Python and numpy, on the tiny models. Left out: the tests marked slow
# (gpt2-small's full shapes: ~2 min more under emulation, and a peak-RSS bound that would count qemu
# itself) and the one needing the official `safetensors` package, which Debian's root lacks.
echo "test-arm64: (a) the engine tests under arm64 Python/numpy (not the slow gpt2-small-shaped ones)"
a0=$(date +%s)
chroot "$ROOT" /usr/bin/env -C /opt/nanopipe PYTHONPATH=/opt/nanopipe python3 -m pytest -q -p no:cacheprovider \
  tests/test_model.py tests/test_decoding.py tests/test_engine.py tests/test_golden.py tests/test_weights.py \
  -m "not slow" --deselect tests/test_weights.py::test_official_safetensors_package_reads_init_weights
echo "test-arm64: (a) took $(( $(date +%s) - a0 )) s"

# (b) and (c): an x86 leader and an arm64 worker (tests/test_arm64.py mounts /proc for (b) only)
echo "test-arm64: (b, c) a mixed x86 + arm64 cluster"
NANOPIPE_ARM64_ROOT="$ROOT" "$PY" -m pytest -q -s -p no:randomly tests/test_arm64.py
echo "test-arm64: done in $(( $(date +%s) - t0 )) s"
