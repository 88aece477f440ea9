"""`python -m embedding_jobs` runs the command line."""

from embedding_jobs.cli import main

raise SystemExit(main())
