"""`python -m sparse_rt` is the `sparse-rt` command."""
from sparse_rt.cli import main

main()
