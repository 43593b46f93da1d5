"""The `n2a` command line (Typer). `cli.main:create_app` assembles the command groups."""
