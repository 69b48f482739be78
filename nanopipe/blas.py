"""Which BLAS numpy runs on this node, and with how many threads: the first thing to check on a slow Pi.

Every decode step is a handful of matrix-vector products, and numpy hands each one to a BLAS
library. Which one depends on how numpy was installed, not on nanopipe:

    pip install numpy (a venv; x86-64, arm64 Linux)   OpenBLAS, bundled in the wheel
    pip install numpy (macOS on Apple silicon)        Accelerate (Apple's), or OpenBLAS in older wheels
    apt install python3-numpy (Debian, Pi OS)         whatever libblas.so.3 points at: the reference
                                                      BLAS (netlib, no SIMD tuning, one thread) unless
                                                      libopenblas0 is installed too
    conda                                              MKL or OpenBLAS

numpy's build config names only what it was linked against ("blas" for Debian's package, which
then resolves at run time through update-alternatives), so `describe()` asks the library that is
really loaded: OpenBLAS, MKL and BLIS each export a function that says who they are.

    >>> describe()                                      # doctest: +SKIP
    BlasInfo(name='OpenBLAS', version='0.3.27', threads=2, detail='Haswell', reference=False)
    >>> describe().line()                               # doctest: +SKIP
    'BLAS: OpenBLAS 0.3.27 (Haswell), 2 threads'
"""
from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

# the fix a node on the reference BLAS logs beside its warning
FIX = ("`sudo apt install libopenblas0` (Debian/Pi OS: python3-numpy then uses OpenBLAS), or "
       "`pip install numpy` in a venv (its wheels bundle OpenBLAS on arm64 and x86-64)")


@dataclass(frozen=True)
class BlasInfo:
    """What describe() found: name is OpenBLAS, Accelerate, MKL, BLIS, "reference BLAS" or "unknown"."""
    name: str
    version: str = ""
    threads: int | None = None
    detail: str = ""            # OpenBLAS: the core its kernels were chosen for (Haswell, NEOVERSEN1, ...)
    reference: bool = False     # the slow, single-threaded netlib BLAS

    @property
    def summary(self) -> str:
        """What STATUS, /health and `plan --from-cluster` show: 'OpenBLAS 0.3.21 (ARMV8), 4 threads'."""
        name = " ".join(x for x in (self.name, self.version) if x)
        extra = f" ({self.detail})" if self.detail else ""
        threads = "" if self.threads is None else f", {self.threads} thread{'s' if self.threads != 1 else ''}"
        return f"{name}{extra}{threads}"

    def line(self) -> str:
        """The line a node logs at start: 'BLAS: OpenBLAS 0.3.21 (ARMV8), 4 threads'."""
        return f"BLAS: {self.summary}"

    def warning(self, speed_gbps: float | None = None) -> str | None:
        """The warning a node on the reference BLAS logs (with its measured speed), else None."""
        if not self.reference:
            return None
        speed = f" (this node measured {speed_gbps:.2f} GB/s)" if speed_gbps else ""
        return (f"numpy runs on the reference BLAS{speed}: every matmul is several times slower than with "
                f"OpenBLAS, so this node gets fewer layers. Fix: {FIX}")


def _config_names() -> list:
    """The BLAS libraries numpy's build config names, lower case: ['blas'] for Debian's package,
    ['scipy-openblas'] for a recent wheel, ['accelerate'] on macOS, [] if it cannot say."""
    import numpy as np
    names = []
    try:                                        # numpy >= 1.26: a dict of the build
        cfg = np.show_config(mode="dicts")
        blas = (cfg.get("Build Dependencies") or {}).get("blas") or {}
        if blas.get("name"):
            names.append(str(blas["name"]).lower())
        return names
    except TypeError:                           # numpy 1.24/1.25: module globals per section
        pass
    conf = getattr(np, "__config__", None)
    for section in ("blas_opt_info", "blas_ilp64_opt_info", "blas_info", "openblas_info", "blas_mkl_info",
                    "accelerate_info"):
        info = getattr(conf, section, None) or {}
        names += [str(x).lower() for x in info.get("libraries", [])]
        if section == "accelerate_info" and info:
            names.append("accelerate")
    return names


def _loaded_library():
    """A handle through which dlsym sees numpy's extension module and every library it loaded
    (the BLAS among them), or None."""
    try:
        from numpy._core import _multiarray_umath as m  # numpy 2
    except ImportError:
        try:
            from numpy.core import _multiarray_umath as m  # numpy 1.x
        except ImportError:
            return None
    try:
        return ctypes.CDLL(m.__file__)
    except OSError:
        return None


def _symbol(lib, *names):
    for n in names:
        f = getattr(lib, n, None) if lib is not None else None
        if f is not None:
            return f
    return None


def _env_threads(*names) -> int | None:
    for n in names:
        v = os.environ.get(n, "")
        if v.strip().isdigit() and int(v) > 0:
            return int(v)
    return None


def describe(lib=None, config_names: list | None = None, platform: str | None = None) -> BlasInfo:
    """The BLAS numpy really runs here (`lib`, `config_names`, `platform`: for tests to simulate others)."""
    lib = _loaded_library() if lib is None else lib
    names = _config_names() if config_names is None else config_names
    platform = platform or sys.platform
    cpus = os.cpu_count() or 1
    get_config = _symbol(lib, "openblas_get_config", "scipy_openblas_get_config64_", "openblas_get_config64_")
    if get_config is not None:
        get_config.restype = ctypes.c_char_p
        words = (get_config() or b"").decode(errors="replace").split()
        version = words[1] if len(words) > 1 and words[0] == "OpenBLAS" else ""
        core = _symbol(lib, "openblas_get_corename", "scipy_openblas_get_corename64_", "openblas_get_corename64_")
        detail = ""
        if core is not None:
            core.restype = ctypes.c_char_p
            detail = (core() or b"").decode(errors="replace")
        n = _symbol(lib, "openblas_get_num_threads", "scipy_openblas_get_num_threads64_",
                    "openblas_get_num_threads64_")
        threads = int(n()) if n is not None else _env_threads("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
        return BlasInfo("OpenBLAS", version, threads, detail)
    mkl = _symbol(lib, "MKL_Get_Max_Threads", "mkl_get_max_threads")
    if mkl is not None or any("mkl" in x for x in names):
        threads = int(mkl()) if mkl is not None else _env_threads("MKL_NUM_THREADS", "OMP_NUM_THREADS")
        return BlasInfo("MKL", threads=threads)
    if _symbol(lib, "bli_info_get_version_str") is not None or any("blis" in x for x in names):
        return BlasInfo("BLIS", threads=_env_threads("BLIS_NUM_THREADS", "OMP_NUM_THREADS"))
    if platform == "darwin" and any("accelerate" in x or "veclib" in x for x in names):
        # Accelerate ignores OPENBLAS_*; VECLIB_MAXIMUM_THREADS bounds it, else it uses every core
        return BlasInfo("Accelerate", threads=_env_threads("VECLIB_MAXIMUM_THREADS") or cpus)
    if any(x in ("blas", "cblas", "refblas", "netlib") for x in names):
        # linked against plain libblas and no tuned library answered: the reference one, one thread
        return BlasInfo("reference BLAS", "(netlib)", 1, reference=True)
    return BlasInfo("unknown", detail="numpy's build config names " + (", ".join(names) or "no BLAS"))


_CURRENT: list = []


def current() -> BlasInfo:
    """describe() for this process, found once (the library does not change while it runs)."""
    if not _CURRENT:
        _CURRENT.append(describe())
    return _CURRENT[0]


def report(speed_gbps: float | None = None) -> list:
    """What a node logs at start, as (level, line): the BLAS line, and on the reference BLAS the
    warning with the fix and the speed it measured."""
    import logging
    info = current()
    warning = info.warning(speed_gbps)
    return [(logging.INFO, info.line())] + ([(logging.WARNING, warning)] if warning else [])
