"""The model checker: random histories of agents, writers, operators and faults against the real PostgreSQL
(or SQLite) and Redis, checking after every step what a pre-dial check may answer.

Steps (tests/model/system.py does each): a press on agent k; `add`; `remove`; an import; `sync-cache` and
`sync-cache --exact`; the set evicted; Redis flushed or restarted empty; a failover to a replica that missed
the writes since a snapshot; one agent's store link cut and restored; a writer without Redis; the store
backed up, and restored from that backup while agents run; an agent SIGKILLed and restarted; keeper rounds
and replays (the background work of the agents, as explicit steps so that a history replays exactly).

After every step, checks by a dialer (Redis and the store), by agents (strict and not):
- never clear: no check answers "clear" for a number whose latest accepted action is an opt-out that
  completed before the check began; except inside the windows the README states (until a keeper round
  after a Redis-less writer's commit, for the non-strict check; until the agent holding an unstored
  opt-out re-asserted it after Redis lost it; until a keeper round after a failover that lost writes, for
  the non-strict check; and the double fault of a store restored while Redis had lost the view);
- nothing listed that nobody asked for: a number never opted out is never answered blacklisted.
At `settle` (also at the end of every history): every journaled opt-out is stored once its store is
reachable; every opted-out number is listed; a removed number is clear (once nothing unstored holds it).

It prints its seed; a failing history shrinks (Hypothesis) to a short list of steps. `make test` runs a few
histories per store (OPTOUT_MODEL_HISTORIES, default 12); `make soak` runs many more.
"""

from __future__ import annotations

import asyncio
import enum
import os
import random
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from agent.constants import Origin
from agent.pipeline import Status
from agent.store import RemoveResult
from tests.conftest import PG_BASE, REDIS_URL
from tests.model.system import System

NUMBERS = ["+972501000001", "+972501000002", "+972501000003", "+972501000004"]
NEVER = "+972509999999"
"""Never opted out by any step: must never be answered blacklisted."""
AGENTS = 2
WRITER = -1
"""The writer without Redis, where the model keeps per-process state."""


class Expect(enum.Enum):
    LISTED = "listed"
    CLEAR = "clear"
    ANY = "any"
    """Either answer is right (a removal racing an unstored opt-out, a double fault)."""


class Machine(RuleBasedStateMachine):
    kind = "postgres"

    started = 0
    """Histories begun in this process (the figure the checker prints, shrinking included)."""
    first_violation = 0
    """The history in which the first violation was found (0: none)."""

    def __init__(self) -> None:
        super().__init__()
        Machine.started += 1
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory(prefix="optout-model-")
        self.sys = System(kind=self.kind, workdir=Path(self.tmp.name), pg_base=PG_BASE, redis_url=REDIS_URL,
                          agents=AGENTS)
        self.run(self.sys.open())
        self.expect: dict[str, Expect] = dict.fromkeys([*NUMBERS, NEVER], Expect.CLEAR)
        self.final: dict[str, Expect] = dict.fromkeys([*NUMBERS, NEVER], Expect.CLEAR)
        self.held: dict[int, set[str]] = {k: set() for k in [*range(AGENTS), WRITER]}
        """Numbers an agent's (or the writer's) journal holds that its store write did not take. What only the
        writer without Redis holds, no other process can know of until its store write succeeds."""
        self.exempt_nonstrict: set[str] = set()
        self.exempt_all: dict[str, set[int]] = {}
        """Number -> agents whose re-assertion it waits for after Redis lost it."""
        self.cut: set[int] = set()
        self.view_intact = False
        self.backup: set[str] | None = None
        self.unrecovered: set[str] = set()
        """Opted out after the backup a restore went back to: only the view holds them until a keeper recovers."""
        self.touched: set[str] = set()
        """Numbers some step opted out (the others must never be answered blacklisted)."""

    def violation(self, message: str) -> AssertionError:
        Machine.first_violation = Machine.first_violation or Machine.started
        return AssertionError(message)

    def run(self, coro: object) -> object:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    def teardown(self) -> None:
        try:
            self.settle()
        finally:
            self.run(self.sys.close())
            self.loop.close()
            self.tmp.cleanup()

    # --- steps --------------------------------------------------------------------------------------------
    def _opted_out(self, number: str, status: Status | None, agent: int | None) -> None:
        if status is None:
            return
        self.expect[number] = self.final[number] = Expect.LISTED
        self.touched.add(number)
        if status is Status.JOURNALED and agent is not None:
            self.held[agent].add(number)

    @rule(k=st.integers(0, AGENTS - 1), number=st.sampled_from(NUMBERS))
    def press(self, k: int, number: str) -> None:
        self._opted_out(number, self.run(self.sys.press(self.sys.agents[k], number)), k)  # type: ignore[arg-type]

    @rule(k=st.integers(0, AGENTS - 1), number=st.sampled_from(NUMBERS))
    def add(self, k: int, number: str) -> None:
        status = self.run(self.sys.press(self.sys.agents[k], number, origin=Origin.ADMIN))
        self._opted_out(number, status, k)  # type: ignore[arg-type]

    @rule(number=st.sampled_from(NUMBERS))
    def write_without_redis(self, number: str) -> None:
        status = self.run(self.sys.press(self.sys.writer, number))
        self._opted_out(number, status, WRITER)  # type: ignore[arg-type]
        self.exempt_nonstrict.add(number)

    @rule()
    def replay_writer(self) -> None:
        self.run(self.sys.replay(self.sys.writer))
        self._refresh_held(WRITER)

    @rule(k=st.integers(0, AGENTS - 1), number=st.sampled_from(NUMBERS))
    def remove(self, k: int, number: str) -> None:
        """`optout remove` on agent k's host (its store link may be cut: then nothing happens)."""
        result = self.run(self.sys.remove(self.sys.agents[k], number))
        if result is RemoveResult.REMOVED:
            still_held = any(number in held for held in self.held.values())
            self.expect[number] = Expect.ANY
            self.final[number] = Expect.LISTED if still_held else Expect.CLEAR

    @rule(k=st.integers(0, AGENTS - 1),
          numbers=st.lists(st.sampled_from(NUMBERS), min_size=1, max_size=3, unique=True))
    def import_numbers(self, k: int, numbers: list[str]) -> None:
        if self.run(self.sys.import_(self.sys.agents[k], numbers)):
            for n in numbers:
                self.expect[n] = self.final[n] = Expect.LISTED
            self.touched.update(numbers)
            self.exempt_nonstrict.update(numbers)  # an import writes the store only: the keepers apply it

    @rule(k=st.integers(0, AGENTS - 1), exact=st.booleans())
    def sync_cache(self, k: int, exact: bool) -> None:
        self.run(self.sys.sync_cache(self.sys.agents[k], exact=exact))

    @rule(k=st.integers(0, AGENTS - 1))
    def keeper_round(self, k: int) -> None:
        proven = self.run(self.sys.keeper_round(self.sys.agents[k]))
        for waiting in self.exempt_all.values():
            waiting.discard(k)  # its round re-asserted what its journal holds
        self.exempt_all = {n: w for n, w in self.exempt_all.items() if w}
        if proven:
            self.exempt_nonstrict.clear()
            self.view_intact = True
            self.unrecovered.clear()  # current again: the store's lineage matches the view's

    @rule(k=st.integers(0, AGENTS - 1))
    def replay(self, k: int) -> None:
        self.run(self.sys.replay(self.sys.agents[k]))
        self._refresh_held(k)

    def _refresh_held(self, k: int) -> None:
        who = self.sys.writer if k == WRITER else self.sys.agents[k]
        self.held[k] &= self.run(self.sys.unstored_numbers(who))  # type: ignore[operator]

    def _redis_lost(self) -> None:
        self.view_intact = False
        for n in self.unrecovered:  # double fault: the store went back, then Redis lost what it would recover
            self.expect[n] = self.final[n] = Expect.ANY
        self.unrecovered.clear()
        for k, held in self.held.items():
            for n in held:
                self.exempt_all.setdefault(n, set()).add(k)

    @rule()
    def evict_set(self) -> None:
        self.run(self.sys.evict_set())
        self._redis_lost()

    @rule()
    def flush_redis(self) -> None:
        self.run(self.sys.flush_redis())
        self._redis_lost()

    @rule()
    def snapshot_redis(self) -> None:
        self.run(self.sys.snapshot_redis())

    @rule()
    def fail_over(self) -> None:
        if self.run(self.sys.fail_over()):
            self._redis_lost()
            self.exempt_nonstrict.update(n for n, e in self.expect.items() if e is Expect.LISTED)

    @precondition(lambda self: self.kind == "postgres")
    @rule(k=st.integers(0, AGENTS - 1))
    def cut_link(self, k: int) -> None:
        self.sys.cut(self.sys.agents[k])
        self.cut.add(k)

    @rule(k=st.integers(0, AGENTS - 1))
    def restore_link(self, k: int) -> None:
        self.sys.restore_link(self.sys.agents[k])
        self.cut.discard(k)

    @rule()
    def backup_store(self) -> None:
        self.run(self.sys.backup_store())
        self.backup = {n for n, e in self.expect.items() if e is Expect.LISTED and not self._is_held(n)}

    @precondition(lambda self: self.backup is not None)
    @rule()
    def restore_store(self) -> None:
        assert self.backup is not None
        self.run(self.sys.restore_store())  # the agents reconnect through their links: a cut one stays cut
        for n in NUMBERS:
            if self.final[n] is Expect.CLEAR and self.expect[n] is not Expect.CLEAR:
                self.expect[n] = self.final[n] = Expect.ANY  # a removal the restore lost
            elif self.expect[n] is Expect.LISTED and n not in self.backup and not self._is_held(n):
                if self.view_intact and n not in self.exempt_nonstrict:
                    self.unrecovered.add(n)  # the view holds it: the keeper writes it back to the store
                else:  # double fault: Redis lost the view, or no keeper applied the commit yet, then the store
                    self.expect[n] = self.final[n] = Expect.ANY  # went back (README: replay, re-import)
        self.view_intact = False

    @rule(k=st.integers(0, AGENTS - 1))
    def kill_and_restart(self, k: int) -> None:
        self.run(self.sys.kill_and_restart(self.sys.agents[k]))  # a cut link stays cut: a restart mends no network

    def _is_held(self, n: str) -> bool:
        return any(n in held for held in self.held.values())

    @rule()
    def settle(self) -> None:
        """Links back, journals replayed, keepers caught up; then what must be true once nothing is in flight."""
        for k in range(AGENTS):
            self.sys.restore_link(self.sys.agents[k])
        self.cut.clear()
        every = [*self.sys.agents, self.sys.writer]
        for _ in range(100):  # a pool reconnects with its own backoff once the link is back
            for agent in every:
                self.run(self.sys.replay(agent))
            if not any(self.run(self.sys.unstored(agent)) for agent in every):
                break
            self.run(asyncio.sleep(0.2))
        for k in self.held:
            self._refresh_held(k)
        for agent in every:
            depth = self.run(self.sys.unstored(agent))
            if depth:
                raise self.violation(f"liveness: {agent.name} still holds {depth} journaled opt-outs 20 s after "
                                     "its store came back")
        for _ in range(20):
            if all([self.run(self.sys.keeper_round(a)) for a in self.sys.agents]):
                break
        self.exempt_all.clear()
        self.exempt_nonstrict.clear()
        self.unrecovered.clear()
        self.view_intact = True
        pool = [*NUMBERS, NEVER]
        for strict in (False, True):
            answers = self.run(self.sys.check(None, pool, strict=strict))
            for n, answer in zip(pool, answers, strict=True):  # type: ignore[call-overload]
                want = self.final[n]
                if want is Expect.LISTED:
                    if answer is not True:
                        raise self.violation(f"settled: {n} opted out but the check answers {answer} (strict="
                                             f"{strict})\n{self.run(self.sys.describe(n))}")
                elif want is Expect.CLEAR and answer is not False:
                    raise self.violation(f"settled: {n} is not opted out but the check answers {answer}")
        for n in NUMBERS:
            if self.final[n] is not Expect.ANY:
                self.expect[n] = self.final[n]

    # --- after every step -----------------------------------------------------------------------------------
    @invariant()
    def never_clear_and_nothing_unasked(self) -> None:
        pool = [*NUMBERS, NEVER]
        checkers: list[tuple[str, int | None, bool]] = [("dialer", None, False), ("dialer strict", None, True)]
        checkers += [(f"agent-{k} strict", k, True) for k in range(AGENTS) if k not in self.cut][:1]
        checkers += [(f"agent-{k}", k, False) for k in range(AGENTS) if k not in self.cut][-1:]
        for name, k, strict in checkers:
            who = None if k is None else self.sys.agents[k]
            answers = self.run(self.sys.check(who, pool, strict=strict))
            for n, answer in zip(pool, answers, strict=True):  # type: ignore[call-overload]
                if answer is True and n not in self.touched:
                    raise self.violation(f"{name}: {n} answered blacklisted, but nobody ever opted it out")
                if answer is not False or self.expect[n] is not Expect.LISTED:
                    continue
                if n in self.exempt_all or n in self.held[WRITER] or (not strict and n in self.exempt_nonstrict):
                    continue
                raise self.violation(f"{name}: {n} answered clear, but its latest accepted action is an opt-out\n"
                                     f"{self.run(self.sys.describe(n))}")


class SqliteMachine(Machine):
    kind = "sqlite"


def _run(machine: type[Machine], histories: int) -> None:
    chosen = int(os.environ.get("OPTOUT_MODEL_SEED") or random.randrange(1 << 32))
    print(f"\nmodel checker ({machine.kind}): seed {chosen} (rerun: OPTOUT_MODEL_SEED={chosen}), {histories} histories")
    Machine.started = Machine.first_violation = 0
    begun = time.monotonic()
    try:
        run_state_machine_as_test(seed(chosen)(machine), settings=settings(
            max_examples=histories, stateful_step_count=int(os.environ.get("OPTOUT_MODEL_STEPS", "25")),
            deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True))
    finally:
        found = f", first violation in history {Machine.first_violation}" if Machine.first_violation else ""
        print(f"model checker ({machine.kind}): {Machine.started} histories run in {time.monotonic() - begun:.0f} s"
              f"{found}")


HISTORIES = int(os.environ.get("OPTOUT_MODEL_HISTORIES", "12"))


def test_model_postgres() -> None:
    _run(Machine, HISTORIES)


def test_model_sqlite() -> None:
    _run(SqliteMachine, max(1, HISTORIES // 2))
