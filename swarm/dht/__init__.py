"""swarm.dht (see DESIGN.md §2)."""
