"""`python -m wildseg`: the `wildseg` command."""

from .cli import main

main()
