"""What the product needs to run local swarms (``swarm demo``, ``swarm selfcheck``).

- `swarm.lab.processes`: real ``swarm`` processes in a group that stops all of them, whose
  children exit when the group's process dies (`swarm.lab.parent`);
- `swarm.lab.liar`: the demo's liar, attached through the handler-wrapping seam by the lab's
  own entry point (``swarm serve`` has no option for it);
- `swarm.lab.reference`: the single-process generation the demo compares with;
- `swarm.lab.checkpoints`: the tiny random checkpoint ``selfcheck`` writes.

It sits above `swarm.api` and below the CLI; tests build on it in `swarm.testing`, which
the product never imports.
"""
