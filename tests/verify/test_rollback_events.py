"""A proven lie during a streamed generation is an event: the stream yields `RolledBack`, and
what the CLI writes (`EventWriter`) and the gateway streams (`AnswerText`) ends as the final
text, once."""

from __future__ import annotations

import io
from pathlib import Path

import trio
from swarm_cli.output import EventWriter

from swarm.client.config import ClientConfig, RecordsConfig
from swarm.client.generation import AnswerText, Done, Event, RolledBack, StopReason, Token
from swarm.client.model import AsyncRemoteModel
from swarm.testing.adversaries import adversary_wrapper
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange

from .conftest import NEW_TOKENS, PROMPT

WHOLE = LayerRange(0, 4)


async def _events_with_liar(model4: Path, tmp_path: Path) -> tuple[list[Event], list[int]]:
    """Optimistic: every token is yielded before the challenge proves the lie."""
    async with open_local_swarm(model4) as local:
        await local.add_server(WHOLE, wrap_handlers=adversary_wrapper("skip"))
        for _ in range(2):
            await local.add_server(WHOLE, measure_throughput=False)
        config = ClientConfig(
            initial_peers=(local.dht_address,),
            verify="optimistic",
            records=RecordsConfig(reputation_path=str(tmp_path / "reputation.json")),
        )
        async with AsyncRemoteModel.open(model4, config) as model:
            async with model.stream(PROMPT, NEW_TOKENS) as stream:
                events = [event async for event in stream]
            return events, stream.result.ids


def _replay(events: list[Event]) -> list[int]:
    ids: list[int] = []
    for event in events:
        if isinstance(event, Token):
            ids.append(event.id)
        elif isinstance(event, RolledBack):
            del ids[event.position :]
    return ids


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_a_proven_lie_is_a_rollback_event(
    model4: Path, reference: list[int], tmp_path: Path
) -> None:
    with trio.fail_after(120):
        events, ids = await _events_with_liar(model4, tmp_path)
    assert ids == reference
    rollbacks = [e for e in events if isinstance(e, RolledBack)]
    assert len(rollbacks) == 1 and rollbacks[0].position < NEW_TOKENS
    assert events[-1] == Done(StopReason.LENGTH)
    assert _replay(events) == reference
    final = "".join(f"{i} " for i in reference)
    # a pipe or a file: the final text, once
    out = io.StringIO()
    write = EventWriter(as_ids=True, out=out)
    for event in events:
        write(event)
    assert out.getvalue() == final and write.rollbacks == 1
    # server-sent events: what was streamed is the final text
    answer = AnswerText(hold=True, as_ids=True)
    assert "".join(answer.push(event)[1] for event in events) == final
    # a terminal: tokens as they come, and the rollback erases what it voided
    screen = _Terminal()
    write = EventWriter(as_ids=True, out=screen)
    for event in events:
        write(event)
    assert "\x1b[J" in screen.getvalue()
    assert write.answer.shown == final


def test_answer_text_erases_only_when_live() -> None:
    events: list[Event] = [
        Token(1, "Hello", 0.1),
        Token(2, " wrld", 0.1),
        RolledBack(1, "Hello"),
        Token(3, " world", 0.1),
        Done(StopReason.EOS),
    ]
    live = AnswerText(hold=False)
    pushed = [live.push(e) for e in events]
    assert pushed == [(0, "Hello"), (0, " wrld"), (5, ""), (0, " world"), (0, "")]
    held = AnswerText(hold=True)
    assert [held.push(e) for e in events][-1] == (0, "Hello world")
