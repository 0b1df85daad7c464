"""swarm.server (see DESIGN.md §2)."""
