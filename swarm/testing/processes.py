"""Real `swarm` processes for tests: the lab's process groups (`swarm.lab.processes`)."""

from swarm.lab.processes import (
    MARKER_VARIABLE,
    ProcessGroup,
    SwarmProcess,
    processes_marked,
    swarm_command,
)

__all__ = ["MARKER_VARIABLE", "ProcessGroup", "SwarmProcess", "processes_marked", "swarm_command"]
