"""The `swarm` command line (installed as the `swarm_cli` package)."""
