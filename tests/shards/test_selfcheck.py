"""`swarm selfcheck` runs and reports its checks."""

from __future__ import annotations

from swarm_cli.main import app
from typer.testing import CliRunner


def test_selfcheck_passes() -> None:
    result = CliRunner().invoke(app, ["selfcheck", "--layers", "3", "--hidden", "64"])
    assert result.exit_code == 0, result.output
    assert "ranges chained == whole model" in result.output
    assert "FAILED" not in result.output


def test_selfcheck_refuses_too_few_layers() -> None:
    result = CliRunner().invoke(app, ["selfcheck", "--layers", "2"])
    assert result.exit_code != 0
