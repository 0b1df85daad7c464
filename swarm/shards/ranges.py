"""`LayerRange`: a half-open range of transformer layers, used everywhere."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LayerRange"]


@dataclass(frozen=True, order=True)
class LayerRange:
    """Layers ``start, start+1, ..., stop-1`` (half-open, like ``range``).

    ``LayerRange(0, 12)`` is what the CLI writes as ``--layers 0:12``: layers 0..11.
    """

    start: int
    stop: int

    def __post_init__(self) -> None:
        if not (isinstance(self.start, int) and isinstance(self.stop, int)):
            raise TypeError("LayerRange bounds must be integers")
        if self.start < 0 or self.stop <= self.start:
            raise ValueError(f"invalid layer range [{self.start}, {self.stop})")

    @classmethod
    def parse(cls, text: str) -> LayerRange:
        """Parse ``"A:B"`` (half-open); raises ValueError with the offending text."""
        try:
            a, b = text.split(":")
            return cls(int(a), int(b))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"layer range must look like START:STOP, got {text!r}") from exc

    def __len__(self) -> int:
        return self.stop - self.start

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer < self.stop

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(range(self.start, self.stop))

    def __str__(self) -> str:
        return f"{self.start}:{self.stop}"
