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

    helpers = ("ErrorCode", "map_exceptions", "unwrap_group")
    exceptions = [n for n in errors.__all__ if n not in helpers]
    for name in exceptions:
        assert issubclass(getattr(errors, name), errors.SwarmError), name
    assert {code.value for code in errors.ErrorCode} >= {"bad_request", "internal"}


def test_public_names_resolve() -> None:
    import swarm

    for name in swarm.__all__:
        assert getattr(swarm, name) is not None, name


def test_map_exceptions_translates_at_one_boundary() -> None:
    import pytest

    from swarm.errors import ConnectError, map_exceptions

    with pytest.raises(ConnectError, match="cannot connect: refused") as caught:
        with map_exceptions({OSError: ConnectError}, "cannot connect"):
            raise ConnectionRefusedError("refused")
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)
    with pytest.raises(ValueError):  # what the mapping does not name passes through
        with map_exceptions({OSError: ConnectError}):
            raise ValueError("x")


def test_a_ctrl_c_in_a_group_wins_over_the_errors_it_caused() -> None:
    from swarm.errors import ConnectionClosed, unwrap_group

    group = BaseExceptionGroup("", [ConnectionClosed("lost"), KeyboardInterrupt()])
    assert isinstance(unwrap_group(group), KeyboardInterrupt)


def test_lint_imports_fails_on_a_product_module_importing_testing() -> None:
    """The import-linter contract of pyproject.toml, checked against the real import graph
    with one product import of `swarm.testing` added: broken. Without it: kept."""
    import grimp
    from importlinter.configuration import configure
    from importlinter.contracts.forbidden import ForbiddenContract

    configure()  # what `lint-imports` sets up before it checks

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (options,) = [c for c in config["contracts"] if c["type"] == "forbidden"]
    session = {"root_packages": config["root_packages"]}

    def kept(graph: grimp.ImportGraph) -> bool:
        contract = ForbiddenContract(options["name"], session, options)
        return bool(contract.check(graph, verbose=False).kept)

    graph = grimp.build_graph("swarm", "swarm_cli")
    assert kept(graph)
    for importer in ("swarm_cli.demo", "swarm.lab.processes", "swarm.client.model"):
        graph.add_import(importer=importer, imported="swarm.testing.swarm")
        assert not kept(graph), importer
        graph.remove_import(importer=importer, imported="swarm.testing.swarm")
        assert kept(graph)
