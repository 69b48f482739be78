"""`python -m nanopipe ...` is the `nanopipe` command."""
from .tools.cli import main

main()
