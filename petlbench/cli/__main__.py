"""`python -m petlbench.cli`."""

from petlbench.cli.root import main

main()
