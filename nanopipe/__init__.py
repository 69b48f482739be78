"""nanopipe: GPT-2 inference split across small machines by model parallelism, in pure numpy."""
import os

# OpenBLAS threads spin for a while after each call before they sleep. With one process per
# machine that is harmless, but when several stages share a machine (`nanopipe demo`, the shipped
# configs, the tests), the idle stages' spinning threads steal the cores from the busy one: a
# 3-node cluster on 2 cores measured 10 tok/s with the default spin, 44 tok/s with this, and one
# process is as fast either way. Set before numpy loads OpenBLAS; an explicit setting wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0"
