"""The subcommands of `embedding-jobs`, a module per group; embedding_jobs.cli parses and dispatches."""
