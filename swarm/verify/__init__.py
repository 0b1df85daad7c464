"""swarm.verify (see DESIGN.md §2)."""
