"""``python -m mergeopt.cli``: the command line, as the ``mergeopt`` script runs it."""

from mergeopt.cli import main

main()
