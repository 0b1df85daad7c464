"""swarm.client (see DESIGN.md §2)."""
