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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from swarm.client.config import ClientConfig
from swarm.client.discovery import ServerDirectory
from swarm.client.model import AsyncRemoteModel, Done, Event, GenerationResult, Token, TokenStream
from swarm.client.sampling import SamplingConfig, sampling_config
from swarm.errors import ConfigError, SessionError
from swarm.net.transport import Transport

__all__ = ["RemoteModel", "TextStream"]

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

        ``config`` holds `ClientConfig` fields (``step_timeout=5``,
        ``hedging=HedgeConfig(after=None)``...).
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
        sampling: SamplingConfig | None = None,
        stop: Sequence[str] = (),
        *,
        return_text: bool | None = None,
        **shortcuts: Any,
    ) -> str | list[int]:
        """New text (for a text prompt, or ``return_text=True``) or new token ids.

        ``sampling`` (greedy by default) or its fields as keyword shortcuts
        (``temperature=0.8, top_k=50, top_p=0.9, seed=1``). Raises `ConfigError` for bad
        arguments, `RoutingError`/`SessionError` when the swarm cannot run the model.
        """
        run = functools.partial(
            self.model.generate,
            prompt,
            max_new_tokens,
            sampling_config(sampling, shortcuts),
            tuple(stop),
            return_text=return_text,
        )
        result: str | list[int] = self._call(run)
        return result

    def generate_detailed(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 32,
        sampling: SamplingConfig | None = None,
        stop: Sequence[str] = (),
        **shortcuts: Any,
    ) -> GenerationResult:
        """Like `generate`, returning this generation's ids, text, route and timings."""
        run = functools.partial(
            self.model.generate_detailed,
            prompt,
            max_new_tokens,
            sampling_config(sampling, shortcuts),
            tuple(stop),
        )
        result: GenerationResult = self._call(run)
        return result

    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 32,
        sampling: SamplingConfig | None = None,
        stop: Sequence[str] = (),
        *,
        return_text: bool | None = None,
        **shortcuts: Any,
    ) -> TextStream:
        """Text pieces (``return_text``; default for a text prompt) or token ids, as they come
        (under a verification policy, which may roll tokens back: once final, at the end).

        The returned iterator's ``result`` is this generation's `GenerationResult`. Leaving
        the loop early (or ``close()``) cancels the generation. Raises what `generate` raises.
        """
        model = self.model
        as_text = isinstance(prompt, str) if return_text is None else return_text
        if as_text and model.tokenizer is None:
            raise ConfigError(f"{model.path} has no tokenizer.json: ask for ids")
        config = sampling_config(sampling, shortcuts)
        tokens = self._call(_open_stream, model, prompt, max_new_tokens, config, tuple(stop))
        return TextStream(self, tokens, as_text)

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


async def _open_stream(
    model: AsyncRemoteModel,
    prompt: str | list[int],
    max_new_tokens: int,
    sampling: SamplingConfig,
    stop: tuple[str, ...],
) -> TokenStream:
    return model.stream(prompt, max_new_tokens, sampling, stop)


class TextStream:
    """The synchronous iterator `RemoteModel.stream` returns; ``result`` is its own result."""

    def __init__(self, remote: RemoteModel, tokens: TokenStream, as_text: bool) -> None:
        self.result = tokens.result
        self._remote = remote
        self._items: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._scope = trio.CancelScope()
        self._tokens = tokens
        self._as_text = as_text
        self._live = remote.model.config.verify == "none"
        self._started = False
        self._done = False

    async def _produce(self) -> None:
        items = self._items
        with self._scope:
            try:
                async with self._tokens as events:
                    async for event in events:
                        for item in self._pieces(event):
                            items.put(("item", item))
            except Exception as exc:
                items.put(("error", exc))
                return
        items.put(("end", None))

    def _pieces(self, event: Event) -> list[str | int]:
        """What a consumer sees of ``event``: under the policy ``none`` each token's piece
        as it comes; under a policy that may roll tokens back, the final answer at `Done`
        (an iterator cannot take back what it yielded)."""
        result = self.result
        if self._live:
            if isinstance(event, Token):
                return [event.text if self._as_text else event.id]
            return []
        if not isinstance(event, Done):
            return []
        return [result.text or ""] if self._as_text else list(result.ids)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str | int:
        if not self._started:
            self._started = True
            self._remote._call(self._remote._start_soon, self._produce)
        while not self._done:
            kind, value = self._remote._wait_item(self._items)
            if kind == "end":
                self._done = True
            elif kind == "error":
                self._done = True
                self.close()
                raise value
            elif value != "":
                return value  # type: ignore[no-any-return]
        self.close()
        raise StopIteration

    def close(self) -> None:
        """Cancel the generation if it still runs (idempotent)."""
        self._done = True
        remote = self._remote
        if remote._thread.is_alive() and remote._token is not None:
            trio.from_thread.run_sync(self._scope.cancel, trio_token=remote._token)
