"""The `decodetune` command line."""
