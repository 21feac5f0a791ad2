"""`python -m wildseg.cli`: the `wildseg` command."""

from . import main

main()
