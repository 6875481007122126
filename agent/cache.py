"""Redis: the dialers' view of the blacklist, derived from the store (the system of record).

The model (keys, who writes each, the view's states, what a reader may trust) is written once, in the
README's "Pre-dial check: the read model"; `ViewState` and the script below follow it. Writers only ever
add; the keeper (agent/keeper.py) holding `blacklist:keeper` owns the rest, through one script that checks
its token first. The script touches several keys: Redis standalone or Sentinel, not Cluster.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from agent.constants import (
    ACTION_TTL_SECONDS,
    BLACKLIST_KEEPER,
    BLACKLIST_LEASE,
    BLACKLIST_NEXT,
    BLACKLIST_SENTINEL,
    BLACKLIST_SET,
    BLACKLIST_VIEW,
    PENDING_FIELD_PREFIX,
    action_key,
    blacklist_entry_key,
    campaign_counter_key,
)
from agent.errors import CacheUnavailable
from agent.lifecycle import Resource
from agent.optout import BlacklistEntry, OptOutRecord
from agent.store import Change, Position


class ViewState(enum.Enum):
    """The dialers' view (see the module's table)."""

    LOST = "lost"
    """No sentinel or no sequence: nothing vouches for what the set lacks. A keeper rebuilds it."""
    REBUILDING = "rebuilding"
    """LOST while a keeper copies the store into `blacklist:numbers:next`."""
    STALE = "stale"
    """The set holds the store up to `seq` but nobody proved lately that nothing came after it."""
    CURRENT = "current"
    """The lease holds: the set held every store change at most the lease time ago."""


class Applied(enum.Enum):
    """What a keeper script did."""

    DONE = "ok"
    NOT_KEEPER = "not the keeper"
    """The lock is another keeper's (or lapsed): nothing written."""
    MOVED = "moved"
    """The view is no longer at the expected sequence, or lost its sentinel: nothing written."""
    HELD = "held"
    """Applied, but the lease is held (just after a swap, or after Redis went back): not renewed yet."""


# The keeper's one script: every change to the view but a writer's additions goes through it.
# KEYS: 1 set, 2 view, 3 lease, 4 keeper lock, 5 the rebuild's copy.
# ARGV: 1 token, 2 expected seq ('' = swap the copy in), 3 new seq, 4 new lineage, 5 lease ms (0: none; for a
#       swap: the grace the lease is held), 6 lock ms, 7 sentinel, 8 the changes, one per line:
#       "a<TAB>phone<TAB>entry JSON" or "r<TAB>phone" (JSON has no raw tab or line break), 9 the entry key
#       prefix, then the pending fields to drop (opt-outs the store holds at or before the new seq).
# A swap makes the copy the set with every remaining pending number in it (UNLINK frees the old set off the
# main thread). A removal leaves a number some writer still holds pending: that opt-out reaches the store
# after the removal, and wins. After a swap the lease is held ('hold') for the grace, so every process
# re-asserts its pending opt-outs before anyone vouches for the new set.
_KEEP = """
if redis.call('GET', KEYS[4]) ~= ARGV[1] then return 'not the keeper' end
local swap = ARGV[2] == ''
if not swap and ((redis.call('HGET', KEYS[2], 'seq') or '') ~= ARGV[2]
                 or redis.call('SISMEMBER', KEYS[1], ARGV[7]) == 0) then return 'moved' end
for j = 10, #ARGV do redis.call('HDEL', KEYS[2], ARGV[j]) end
local held, all = {}, redis.call('HGETALL', KEYS[2])
for j = 1, #all, 2 do if string.sub(all[j], 1, 2) == 'p:' then held[all[j + 1]] = true end end
if swap then
  for phone in pairs(held) do redis.call('SADD', KEYS[5], phone) end
  redis.call('SADD', KEYS[5], ARGV[7])
  redis.call('UNLINK', KEYS[1])
  redis.call('RENAME', KEYS[5], KEYS[1])
end
for line in string.gmatch(ARGV[8], '[^\\n]+') do
  local tab = string.find(line, '\\t', 3, true)
  local phone = tab and string.sub(line, 3, tab - 1) or string.sub(line, 3)
  if string.sub(line, 1, 1) == 'a' then
    redis.call('SADD', KEYS[1], phone)
    redis.call('SET', ARGV[9] .. phone, string.sub(line, tab + 1))
  elseif not held[phone] then
    redis.call('SREM', KEYS[1], phone)
    redis.call('DEL', ARGV[9] .. phone)
  end
end
redis.call('HSET', KEYS[2], 'seq', ARGV[3], 'lineage', ARGV[4])
redis.call('PEXPIRE', KEYS[4], ARGV[6])
if swap then
  redis.call('SET', KEYS[3], 'hold', 'PX', math.max(tonumber(ARGV[5]), 1))
elseif tonumber(ARGV[5]) > 0 then
  if redis.call('GET', KEYS[3]) == 'hold' then return 'held' end
  redis.call('SET', KEYS[3], ARGV[3] .. ' ' .. ARGV[4], 'PX', ARGV[5])
end
return 'ok'
"""


@dataclass(frozen=True)
class View:
    """What the keeper reads of the view at the start of a round."""

    position: Position | None
    """The store change the set holds up to (None: unknown, rebuild)."""
    sentinel: bool
    lease: Position | None
    pending: dict[str, str] = field(default_factory=dict)
    """Event id -> number of every opt-out some writer holds that the store may not have yet."""
    next_exists: bool = False

    @property
    def state(self) -> ViewState:
        if self.position is None or not self.sentinel:
            return ViewState.REBUILDING if self.next_exists else ViewState.LOST
        return ViewState.CURRENT if self.lease is not None else ViewState.STALE


@dataclass(frozen=True)
class CacheAnswer:
    members: list[bool]
    lease: Position | None
    """What the lease vouches for; None when a "clear" from the set proves nothing (no lease or no sentinel)."""


def _position(value: object) -> Position | None:
    seq, _, lineage = str(value or "").partition(" ")
    return Position(int(seq), lineage) if seq.isdigit() else None


@contextlib.contextmanager
def redis_errors(doing: str) -> Iterator[None]:
    """Redis's errors (and a dropped socket) become CacheUnavailable, saying what was being done."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise CacheUnavailable(f"Redis: {doing}: {exc}") from exc


def connect(url: str | None = None, *, sentinels: Sequence[tuple[str, int]] = (), service: str | None = None,
            timeout: float = 0.5, max_connections: int = 64) -> aioredis.Redis:
    """A client for one Redis (`url`), or for the primary the Sentinels name for `service` (it follows a
    failover: every new connection asks the Sentinels where the primary is)."""
    if sentinels:
        assert service is not None
        sentinel = Sentinel(list(sentinels), sentinel_kwargs={"socket_timeout": timeout}, socket_timeout=timeout,
                            socket_connect_timeout=timeout, decode_responses=True)
        client: aioredis.Redis = sentinel.master_for(service, max_connections=max_connections)
        return client
    assert url is not None
    return aioredis.Redis.from_url(url, max_connections=max_connections, socket_timeout=timeout,
                                   socket_connect_timeout=timeout, decode_responses=True)


class RedisCache(Resource):
    """The Redis side of the blacklist (async context manager). Every method raises CacheUnavailable."""

    def __init__(self, url: str | None = None, *, client: aioredis.Redis | None = None, timeout: float = 0.5,
                 max_connections: int = 64) -> None:
        self.client = client if client is not None else connect(url, timeout=timeout,
                                                                max_connections=max_connections)
        self._keep = self.client.register_script(_KEEP)
        self._closed = False

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.client.aclose()

    # --- writers: add only --------------------------------------------------------------------------------
    async def write_optouts(self, records: Sequence[OptOutRecord]) -> list[datetime]:
        """Make each opt-out visible to the dialers in one round trip: its action record (whose NX reply says
        whether it is new), its pending field before its number (so a removal the keeper applies meanwhile
        already sees it), its entry; then count new ones per campaign. Returns when Redis confirmed each."""
        pipe = self.client.pipeline(transaction=False)
        for record in records:
            pipe.set(action_key(record.event_id), record.to_json(), ex=ACTION_TTL_SECONDS, nx=True)
            if record.phone_number is not None:
                pipe.hset(BLACKLIST_VIEW, PENDING_FIELD_PREFIX + record.event_id, record.phone_number)
                pipe.sadd(BLACKLIST_SET, record.phone_number)
                pipe.set(blacklist_entry_key(record.phone_number), record.entry().to_json(), nx=True)
        with redis_errors("writing opt-outs"):
            replies = await pipe.execute()
            confirmed = datetime.now(UTC)
            counters, at = self.client.pipeline(transaction=False), 0
            for record in records:  # a redelivered opt-out finds its action record there: not counted again
                if replies[at] and record.campaign_id is not None:
                    counters.incr(campaign_counter_key(record.campaign_id))
                at += 1 if record.phone_number is None else 4
            if len(counters):
                await counters.execute()
        return [confirmed] * len(records)

    async def assert_pending(self, held: Sequence[tuple[str, str]], *, chunk: int = 5000) -> None:
        """Re-assert opt-outs a process holds unstored, as (event id, number): pending field, then number."""
        for i in range(0, len(held), chunk):
            part = held[i : i + chunk]
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(BLACKLIST_VIEW, mapping={PENDING_FIELD_PREFIX + e: n for e, n in part})
            pipe.sadd(BLACKLIST_SET, *{n for _, n in part})
            with redis_errors("re-asserting pending opt-outs"):
                await pipe.execute()

    # --- readers ------------------------------------------------------------------------------------------
    async def check(self, numbers: Sequence[str]) -> CacheAnswer:
        """Membership of each number, with the lease when a "clear" may be trusted: lease, sentinel and
        membership read atomically (MULTI)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.get(BLACKLIST_LEASE)
        pipe.sismember(BLACKLIST_SET, BLACKLIST_SENTINEL)
        pipe.smismember(BLACKLIST_SET, list(numbers))
        with redis_errors("reading the blacklist"):
            lease, sentinel, members = await pipe.execute()
        return CacheAnswer([bool(m) for m in members], _position(lease) if sentinel else None)

    async def view(self) -> View:
        """The view's position, sentinel, lease and pending opt-outs (one MULTI)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(BLACKLIST_VIEW)
        pipe.sismember(BLACKLIST_SET, BLACKLIST_SENTINEL)
        pipe.get(BLACKLIST_LEASE)
        pipe.exists(BLACKLIST_NEXT)
        with redis_errors("reading the view"):
            fields, sentinel, lease, next_exists = await pipe.execute()
        seq = fields.get("seq")
        position = _position(f"{seq} {fields.get('lineage', '')}") if seq is not None else None
        pending = {k[len(PENDING_FIELD_PREFIX):]: v for k, v in fields.items() if k.startswith(PENDING_FIELD_PREFIX)}
        return View(position, bool(sentinel), _position(lease), pending, bool(next_exists))

    async def state(self) -> ViewState:
        return (await self.view()).state

    # --- the keeper ---------------------------------------------------------------------------------------
    def keeper_lock(self, *, timeout: float) -> Lock:
        """The keeper lock; acquire it with the token the scripts check (`acquire(token=..., blocking=False)`)."""
        return Lock(self.client, BLACKLIST_KEEPER, timeout=timeout, blocking=False, raise_on_release_error=False)

    async def apply(self, token: str, changes: Sequence[Change], *, expected: Position | None, new: Position,
                    lease_ms: int, lock_ms: int, drop_pending: Sequence[str] = ()) -> Applied:
        """Apply store changes in order if this keeper holds the lock and the view is at `expected`; mark it
        at `new`, drop the pending fields of opt-outs it now holds, renew the lease when `lease_ms`, and
        extend the lock. No changes and a lease = the keeper's proof the view is current. `expected` None:
        a swap (see `swap`)."""
        lines = "\n".join(f"a\t{c.phone_number}\t{c.entry}" if c.op == "add" else f"r\t{c.phone_number}"
                          for c in changes)
        keys = [BLACKLIST_SET, BLACKLIST_VIEW, BLACKLIST_LEASE, BLACKLIST_KEEPER, BLACKLIST_NEXT]
        args: list[str | int] = [token, "" if expected is None else str(expected.seq), str(new.seq), new.lineage,
                                 lease_ms, lock_ms, BLACKLIST_SENTINEL, lines, blacklist_entry_key(""),
                                 *(PENDING_FIELD_PREFIX + e for e in drop_pending)]
        with redis_errors("applying store changes" if expected else "swapping the rebuilt set in"):
            return Applied(await self._keep(keys=keys, args=args))

    async def swap(self, token: str, at: Position, *, grace_ms: int, lock_ms: int,
                   drop_pending: Sequence[str] = ()) -> Applied:
        """Make the rebuild's copy the view, at `at`, with every pending number in it but those of `drop_pending`
        (opt-outs the store held at `at`: the copy has them, or a removal since); the lease is held for
        `grace_ms`."""
        return await self.apply(token, [], expected=None, new=at, lease_ms=grace_ms, lock_ms=lock_ms,
                                drop_pending=drop_pending)

    async def fill_next(self, entries: Sequence[BlacklistEntry], *, first: bool) -> None:
        """Copy a batch of the store into the rebuild's set (emptied first when `first`), with the entries."""
        pipe = self.client.pipeline(transaction=False)
        if first:
            pipe.delete(BLACKLIST_NEXT)
        if entries:
            pipe.sadd(BLACKLIST_NEXT, *(e.phone_number for e in entries))
            pipe.mset({blacklist_entry_key(e.phone_number): e.to_json() for e in entries})
        with redis_errors("copying the store"):
            await pipe.execute()

    async def hold_lease(self, grace_ms: int) -> None:
        """Nobody renews the lease for `grace_ms` (readers ask the store meanwhile)."""
        with redis_errors("holding the lease"):
            await self.client.set(BLACKLIST_LEASE, "hold", px=max(grace_ms, 1))

    async def members(self, *, batch: int = 5000) -> AsyncIterator[list[str]]:
        """The set's numbers, in batches (SSCAN: Redis is not blocked for a large set)."""
        cursor: int = 0
        while True:
            with redis_errors("reading the set"):
                cursor, found = await self.client.sscan(BLACKLIST_SET, cursor, count=batch)
            yield [str(m) for m in found if not str(m).startswith("~")]
            if cursor == 0:
                return

    async def entries(self, numbers: Sequence[str]) -> list[str | None]:
        with redis_errors("reading entries"):
            return [None if v is None else str(v) for v in await self.client.mget([blacklist_entry_key(n)
                                                                                     for n in numbers])]
