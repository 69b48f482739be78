"""nanopipe: GPT-2 inference split across small machines by model parallelism, in pure numpy."""
__version__ = "0.1.0"
