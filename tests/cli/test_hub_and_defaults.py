"""Hub names on the command line resolve through the local huggingface_hub cache (never the
network), and `swarm generate` samples as the model's generation_config.json says unless an
option overrides it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from swarm_cli.main import app
from typer.testing import CliRunner

from swarm.testing.checkpoints import write_random_llama

from .conftest import error_lines, run_cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub(root: Path, repo: str) -> Path:
    storage = root / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    write_random_llama(storage / "snapshots" / COMMIT, num_layers=3, vocab=64)
    return root


@pytest.mark.slow  # runs `swarm serve`
def test_serve_takes_a_hub_name_from_the_cache(tmp_path: Path, cli_env: dict[str, str]) -> None:
    hub = _fake_hub(tmp_path / "hub", "acme/tiny-llama")
    env = {**cli_env, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    # --layers past the model: the error names the resolved model's 3 layers, so the name
    # was resolved (offline, from the cache) before anything started
    done = run_cli("serve", "acme/tiny-llama", "--layers", "0:9", env=env)
    assert done.returncode == 1
    assert "3 layers" in " ".join(error_lines(done.stderr))
    missing = run_cli("serve", "acme/not-cached", "--layers", "0:1", env=env)
    assert missing.returncode == 1 and "acme/not-cached" in missing.stderr


@pytest.mark.parametrize(
    ("options", "want"),
    [
        ([], (0.6, 20, 0.9)),  # the file's values
        (["--temperature", "0"], (0.0, 20, 0.9)),  # an option wins
        (["--top-k", "5", "--top-p", "1.0"], (0.6, 5, 1.0)),
    ],
)
def test_generate_samples_as_generation_config_says(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    options: list[str],
    want: tuple[float, int, float],
) -> None:
    model = write_random_llama(tmp_path / "m", num_layers=2, vocab=64)
    (model / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.9})
    )
    seen: dict[str, Any] = {}

    def capture(job: Any, as_json: bool) -> None:
        seen["job"] = job

    import swarm_cli.generate

    monkeypatch.setattr(swarm_cli.generate, "_run", capture)
    monkeypatch.setattr("trio.run", lambda fn, *args: fn(*args))
    result = CliRunner().invoke(
        app, ["generate", str(model), "--ids", "1,2,3", "--initial-peers", "127.0.0.1:1", *options]
    )
    assert result.exit_code == 0, result.output
    sampling = seen["job"].sampling
    assert (sampling.temperature, sampling.top_k, sampling.top_p) == want


def test_generate_chat_and_api_guess_tokens_by_default() -> None:
    """`--speculative auto` is the default where tokens are generated (issue 21): the help of
    each command says so, and each command's parameter defaults to it."""
    import inspect

    from swarm_cli import api, chat, generate

    for command in (generate.generate, chat.chat, api.api):
        assert inspect.signature(command).parameters["speculative"].default == "auto"
    shown = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert "auto (default" in shown.output
