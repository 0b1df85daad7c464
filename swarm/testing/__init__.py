"""swarm.testing (see DESIGN.md §2)."""
