"""`python -m server serve ...`: the same command line as the `loraplex` script."""

from server.cli import main

raise SystemExit(main())
