"""`RemoteModel`: the synchronous face of `AsyncRemoteModel`, usable from any thread.

The trio side runs in ONE background thread with its own trio loop (started by
`RemoteModel.from_pretrained`, stopped by `close`); callers block on
``trio.from_thread.run``. That works from plain threads and from inside a running asyncio
loop (the call blocks that loop while it runs; use ``asyncio.to_thread`` to avoid that).
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import trio

from swarm.client.config import ClientConfig
from swarm.client.discovery import ServerDirectory
from swarm.client.model import AsyncRemoteModel, GenerationResult
from swarm.client.sampling import SamplingConfig
from swarm.errors import ConfigError, SessionError
from swarm.net.transport import Transport

__all__ = ["RemoteModel"]

_POLL_S = 0.2  # how often a waiting caller checks that the background thread is alive


class RemoteModel:
    """A model whose layers run on the swarm, for synchronous code.

    ::

        with RemoteModel.from_pretrained("path/to/model", initial_peers=["10.0.0.1:31337"]) as m:
            print(m.generate("Hello", max_new_tokens=20))
    """

    def __init__(
        self,
        path: str | Path,
        config: ClientConfig,
        *,
        transport: Transport | None = None,
        directory: ServerDirectory | None = None,
        open_timeout: float = 600.0,
    ) -> None:
        """Start the background thread and wait (at most ``open_timeout`` s) until the head
        is loaded and the DHT joined (``directory``: a fixed set of servers instead of the
        DHT). Raises what `AsyncRemoteModel.open` raises."""
        self.config = config
        self._opener = functools.partial(
            AsyncRemoteModel.open, path, config, transport=transport, directory=directory
        )
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._model: AsyncRemoteModel | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._closing: trio.Event | None = None
        self._thread = threading.Thread(target=self._thread_main, name="swarm-client", daemon=True)
        self._thread.start()
        if not self._ready.wait(open_timeout):
            raise SessionError(f"the client did not start within {open_timeout} s")
        if self._error is not None:
            raise self._error

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        initial_peers: Sequence[str] = (),
        verify: str | None = None,
        *,
        transport: Transport | None = None,
        **config: Any,
    ) -> RemoteModel:
        """Open ``path``'s model on the swarm reached through ``initial_peers``.

        ``config`` holds `ClientConfig` fields (``use_push=False``, ``step_timeout=5``...).
        ``verify`` is a policy (``"none"``, ``"spot-check:0.1"``, ``"redundant:3"``,
        ``"optimistic"``; see `swarm.verify.policy`); None means ``"none"``.
        Raises `ConfigError` for unknown options or policies, and what
        `AsyncRemoteModel.open` raises.
        """
        if verify is not None:
            config["verify"] = verify
        try:
            client_config = ClientConfig(initial_peers=tuple(initial_peers), **config)
        except TypeError as exc:
            raise ConfigError(f"bad client option: {exc}") from exc
        return cls(path, client_config, transport=transport)

    # ---- the background thread ----

    def _thread_main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # reported to the constructor or the next caller
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        async with self._opener() as model, trio.open_nursery() as nursery:
            self._model = model
            self._nursery = nursery
            self._closing = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._closing.wait()
            nursery.cancel_scope.cancel()

    def _call(self, fn: Any, *args: Any) -> Any:
        if self._token is None or not self._thread.is_alive():
            raise SessionError("the client is closed")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    @property
    def model(self) -> AsyncRemoteModel:
        if self._model is None:
            raise SessionError("the client is closed")
        return self._model

    # ---- public API ----

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        return_text: bool | None = None,
    ) -> str | list[int]:
        """New text (for a text prompt, or ``return_text=True``) or new token ids.

        Raises `ConfigError` for bad arguments, `RoutingError`/`SessionError` when the swarm
        cannot run the model.
        """
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        run = functools.partial(
            self.model.generate, prompt, max_new_tokens, sampling, tuple(stop or ()),
            return_text=return_text,
        )  # fmt: skip
        result: str | list[int] = self._call(run)
        return result

    def generate_detailed(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> GenerationResult:
        """Like `generate`, returning ids, text, route and timings."""
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        run = functools.partial(
            self.model.generate_detailed, prompt, max_new_tokens, sampling, tuple(stop or ())
        )
        result: GenerationResult = self._call(run)
        return result

    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        return_text: bool | None = None,
    ) -> Iterator[str | int]:
        """Yield text pieces (``return_text``; default for a text prompt) or token ids.

        Leaving the loop early cancels the generation. Raises what `generate` raises.
        """
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        items: queue.Queue[tuple[str, Any]] = queue.Queue()
        scope = trio.CancelScope()
        model = self.model
        as_text = isinstance(prompt, str) if return_text is None else return_text
        if as_text and model.tokenizer is None:
            raise ConfigError(f"{model.path} has no tokenizer.json: ask for ids")

        async def produce() -> None:
            with scope:
                try:
                    agen = model.stream(prompt, max_new_tokens, sampling, tuple(stop or ()))
                    async with aclosing(agen) as tokens:
                        async for token in tokens:
                            items.put(("item", token.text if as_text else token.id))
                except Exception as exc:
                    items.put(("error", exc))
                    return
            items.put(("end", None))

        self._call(self._start_soon, produce)
        try:
            while True:
                kind, value = self._wait_item(items)
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                if value != "":
                    yield value
        finally:
            if self._thread.is_alive() and self._token is not None:
                trio.from_thread.run_sync(scope.cancel, trio_token=self._token)

    async def _start_soon(self, fn: Any) -> None:
        assert self._nursery is not None  # set before _ready, checked by _call
        self._nursery.start_soon(fn)

    def _wait_item(self, items: queue.Queue[tuple[str, Any]]) -> tuple[str, Any]:
        while True:
            try:
                return items.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise SessionError("the client thread stopped") from None

    def close(self, timeout: float = 10.0) -> None:
        """Stop the background thread (ends open sessions, leaves the DHT)."""
        if self._token is not None and self._thread.is_alive() and self._closing is not None:
            trio.from_thread.run_sync(self._closing.set, trio_token=self._token)
        self._thread.join(timeout)
        self._token = None
        self._model = None

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
