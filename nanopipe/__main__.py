"""`python -m nanopipe ...` is the `nanopipe` command: tools/bootstrap.py sets the environment numpy
reads, then runs the CLI."""
from .tools.bootstrap import main

main()
