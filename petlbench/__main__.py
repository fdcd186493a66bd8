"""`python -m petlbench`."""

from petlbench.cli.root import main

main()
