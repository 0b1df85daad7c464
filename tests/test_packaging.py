"""The package's public face and its install metadata stay in step with the tree."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "swarm").rglob("__init__.py")
    }
    assert on_disk - listed == set(), "add these packages to pyproject's [tool.setuptools] packages"


@pytest.mark.slow  # a fresh interpreter
def test_import_swarm_does_not_import_torch() -> None:
    code = "import sys, swarm; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_errors_share_one_root() -> None:
    import swarm.errors as errors

    exceptions = [n for n in errors.__all__ if n not in ("ErrorCode", "unwrap_group")]
    for name in exceptions:
        assert issubclass(getattr(errors, name), errors.SwarmError), name
    assert {code.value for code in errors.ErrorCode} >= {"bad_request", "internal"}


def test_public_names_resolve() -> None:
    import swarm

    for name in swarm.__all__:
        assert getattr(swarm, name) is not None, name
