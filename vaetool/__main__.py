"""`python -m vaetool` runs the command line."""

from vaetool.cli import main

main()
