"""The simulated internet's vocabulary (`swarm.testing.internet`): what a run is asked to do
(`SimConfig`), what it found (`SimReport`, with each failed generation's `Failure`), and a
simulated server as it really is (`SimServer`: its announced and delivered throughput, its
range, whether it is alive or moving)."""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import trio

from swarm.dht import StorageConfig
from swarm.directory import ServerView
from swarm.net.messages import RangeMove
from swarm.testing.internet_ops import SimNode
from swarm.testing.internet_plane import SliceStatistics
from swarm.types import LayerRange, PeerId

__all__ = ["Failure", "ServerKind", "SimConfig", "SimReport", "SimServer"]


class Failure(enum.StrEnum):
    """Why a simulated generation failed (`SimReport.failures`)."""

    # no route before it started, after ``client_wait``: a block had no live server ...
    START_UNCOVERED = "no route to start: a block had no live server"
    # ... every block had one, but the client's lookups missed live servers' records
    START_MISSED = "no route to start: lookups missed live records"
    START_OTHER = "no route to start: other"  # (e.g. a record not yet updated after a move)
    # the same, for a recovery's re-plan after ``route_wait_s``
    RECOVERY_UNCOVERED = "no route to recover: a block had no live server"
    RECOVERY_MISSED = "no route to recover: lookups missed live records"
    RECOVERY_OTHER = "no route to recover: other"
    GAVE_UP = "more hop failures than max_recoveries"
    # more servers of a route failed to open (gone since their records were read) than
    # ``max_open_retries``, at the start or in one recovery
    OPEN_GAVE_UP = "more servers failed to open than max_open_retries"


class ServerKind(enum.StrEnum):
    """How a simulated server delivers what it announces."""

    FAST = "fast"  # delivers what it announces
    SLOW = "slow"  # delivers ``slow_delivers`` of it (overloaded, or it overstates)
    RELAYED = "relayed"  # reachable only through a relay; delivers ``relayed_delivers`` of it


@dataclass(frozen=True)
class SimConfig:
    """One simulated swarm. Times are real seconds (the DHT runs for real)."""

    dht_nodes: int = 60
    servers: int = 12
    blocks: int = 8
    span: int = 2  # blocks per server
    intra: tuple[float, float] = (0.005, 0.015)  # one-way seconds inside a region
    inter: tuple[float, float] = (0.040, 0.120)  # one-way seconds across regions
    loss: float = 0.01
    sybil_share: float = 0.1
    junk_sybils: float = 0.0  # of the sybils, the share that answer junk (the rest: nothing)
    clients: int = 3
    tokens: int = 16  # per generation
    duration: float = 30.0
    period: float = 3.0  # mean balance period
    ttl: float = 8.0  # announcement TTL (re-announced every half)
    churn_per_minute: float = 2.0  # departures and as many arrivals
    mass_leave_at: float = 10.0  # seconds into the run (0: never)
    mass_leave_share: float = 0.3
    mass_leave_gap: bool = False  # also every server of one block leaves (a certain gap)
    load_seconds: float = 0.5  # a move's load and drain
    seed: int = 0
    # DHT nodes split over this many processes (`internet_workers`), and the servers',
    # clients' and probes' DHT operations with them (`internet_ops`)
    processes: int = 1
    # after ``duration``, run on up to this many seconds while the mass departure's gap is
    # not healed yet, or a block is uncovered (churn goes on: a death near the end leaves a
    # gap the run did not give time to heal; a busy machine slows the DHT; tests give it
    # room, figures do not)
    heal_grace: float = 0.0
    # a client waits this long for a route before it starts a generation, as `swarm
    # generate --wait` does (0: a generation without a route fails at once)
    client_wait: float = 60.0
    slow_share: float = 0.2  # of the servers, slow ones (`ServerKind.SLOW`)
    slow_delivers: float = 0.25
    relayed_share: float = 0.2  # of the servers, relayed ones (`ServerKind.RELAYED`)
    relayed_delivers: float = 0.3
    # servers announce what the servers of the block after their range delivered, as the
    # product's announcer measures it (modelled: the truth, as the best of its probes would
    # be on an idle path); False: nobody measures, everyone counts what it announces
    probes: bool = True
    # servers ping the servers of the blocks beside their range every ``watch`` x period and
    # count those that fail as gone (`swarm.server.liveness`, as the product's servers do;
    # `BalanceConfig.watch`); 0: they see a dead server's gap only when its records expire
    watch: float = 0.25
    # a ping to a dead server fails after this long (the product's default `ping_timeout`:
    # a machine that vanished answers nothing, it does not refuse)
    ping_timeout: float = 2.0
    # every DHT node's `StorageConfig.verified_cache` (0: each signature verified every time)
    verified_cache: int = StorageConfig.verified_cache


@dataclass
class SimReport:
    config: SimConfig
    lookup_seconds: list[float] = field(default_factory=list)
    lookup_recall: list[float] = field(default_factory=list)
    route_ratio: list[float] = field(default_factory=list)  # planned cost / oracle cost
    uncovered: list[tuple[float, int]] = field(default_factory=list)  # (t, blocks uncovered)
    heal_seconds: float | None = None  # after the mass departure (None: never healed)
    generations: int = 0  # finished (succeeded or failed)
    started: int = 0  # started: those not finished when the run ended were still going
    succeeded: int = 0
    recoveries: int = 0
    open_failures: int = 0  # hops of planned routes that failed to open (server gone)
    failures: dict[Failure, int] = field(default_factory=dict)  # failed generations, by cause
    stale_picks: int = 0  # hops planned onto a server already gone or moved (stale record)
    start_waits: list[float] = field(default_factory=list)  # seconds a client waited to start
    recovery_waits: list[float] = field(default_factory=list)  # ... a recovery for a route
    token_seconds: list[float] = field(default_factory=list)
    datagrams_per_node_minute: float = 0.0
    bytes_per_node_minute: float = 0.0
    moves: int = 0
    lost_datagrams: int = 0
    junk_replies: int = 0  # find_node / find_value replies the junk-answering sybils sent
    forged_sent: int = 0  # forged or junk records among them
    signatures_verified: int = 0  # record signatures all honest nodes verified
    signatures_cached: int = 0  # record checks spared by their `VerifiedRecords`
    forged_accepted: int = 0  # records or server views from a forgery that a read accepted
    slices: list[SliceStatistics] = field(default_factory=list)  # per process, this one first
    # DHT operations (announcements, reads, probe lookups) the servers, clients and probes
    # made through the nodes of each process (0: the coordinator), start-up included; and
    # how many of them failed (a lookup's or store's error, or a worker's deadline)
    operations: dict[int, int] = field(default_factory=dict)
    operations_failed: int = 0
    seconds: float = 0.0  # how long it ran: ``duration``, plus any ``heal_grace`` used
    # per kind of server, as the balance counted them at the last look: servers, announced,
    # delivered and counted tokens/s (sums over live servers), and how many peers measured
    throughput: dict[ServerKind, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        def pct(values: Sequence[float], q: float) -> float:
            if not values:
                return math.nan
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        marks = [*self.uncovered, (self.seconds or self.config.duration, 0)]
        uncovered_time = sum((b[0] - a[0]) for a, b in pairwise(marks) if a[1])
        return {
            "lookup_p50_ms": 1e3 * pct(self.lookup_seconds, 0.5),
            "lookup_p99_ms": 1e3 * pct(self.lookup_seconds, 0.99),
            "lookups": len(self.lookup_seconds),
            "recall": statistics.fmean(self.lookup_recall) if self.lookup_recall else math.nan,
            "route_cost_vs_oracle_median": pct(self.route_ratio, 0.5),
            "route_cost_vs_oracle_p90": pct(self.route_ratio, 0.9),
            "seconds_with_a_block_uncovered": uncovered_time,
            "max_blocks_uncovered": max((u for _, u in self.uncovered), default=0),
            "heal_seconds_after_mass_leave": self.heal_seconds,
            "heal_periods_after_mass_leave": (
                None if self.heal_seconds is None else self.heal_seconds / self.config.period
            ),
            "generations": self.generations,
            "success_rate": self.succeeded / self.generations if self.generations else math.nan,
            "generations_unfinished_at_the_end": self.started - self.generations,
            "recoveries": self.recoveries,
            "open_failures": self.open_failures,
            "failures": {str(k): v for k, v in sorted(self.failures.items())},
            "stale_picks": self.stale_picks,
            "generations_that_waited_to_start": sum(1 for w in self.start_waits if w > 0),
            "start_wait_s_p50_max": (pct(self.start_waits, 0.5), max(self.start_waits, default=0)),
            "recoveries_that_waited_for_a_route": sum(1 for w in self.recovery_waits if w > 0),
            "recovery_wait_s_max": max(self.recovery_waits, default=0.0),
            "tokens": len(self.token_seconds),
            "token_ms_p50": 1e3 * pct(self.token_seconds, 0.5),
            "token_ms_p90": 1e3 * pct(self.token_seconds, 0.9),
            "dht_datagrams_per_node_minute": self.datagrams_per_node_minute,
            "dht_bytes_per_node_minute": self.bytes_per_node_minute,
            "datagrams_lost": self.lost_datagrams,
            "moves": self.moves,
            "junk_replies": self.junk_replies,
            "forged_records_sent": self.forged_sent,
            "dht_signatures_verified": self.signatures_verified,
            "dht_signature_checks_spared": self.signatures_cached,
            "forged_records_accepted": self.forged_accepted,
            "processes": len(self.slices),
            "dht_nodes_per_process": [s.honest for s in self.slices],
            "dht_loop_lag_ms_p50_p99_per_process": [
                (round(s.loop_lag_p50_ms, 1), round(s.loop_lag_p99_ms, 1)) for s in self.slices
            ],
            "dht_operations_per_process": [
                self.operations.get(p, 0) for p in range(max(1, len(self.slices)))
            ],
            "dht_operations_failed": self.operations_failed,
            "throughput_by_kind": {str(k): v for k, v in self.throughput.items()},
        }


@dataclass
class SimServer:
    node: SimNode  # in this process or a worker (`swarm.testing.internet_ops`)
    region: str
    throughput: float  # announced
    layers: LayerRange
    kind: ServerKind = ServerKind.FAST
    delivered: float = 0.0  # what it really delivers (tokens/s through its span)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    alive: bool = True
    moving: bool = False
    moving_to: LayerRange | None = None
    last_move: RangeMove | None = None
    port: int = 0
    since: float = 0.0  # when its current range was first announced (trio time)
    died_at: float | None = None  # trio time of its death (None: alive, or left by moving)

    @property
    def peer_id(self) -> PeerId:
        return self.node.peer_id

    def view(self) -> ServerView:
        """As it really is (for the oracle): at the throughput it delivers."""
        return ServerView(self.peer_id, f"127.0.0.1:{self.port}", self.layers, self.delivered, 1000)
