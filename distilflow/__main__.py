"""`python -m distilflow ...`: the command line (cli/), the one entry point allowed to reach the top layer."""

from cli import main

raise SystemExit(main())
