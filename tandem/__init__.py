"""The `tandem` command: the CLI and the local-stack launcher, on top of every service package."""
