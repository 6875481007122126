"""Redis: the keys the dialers' pre-dial check reads. The store is the system of record.

Keys (agent/constants.py): the set `blacklist:numbers` (holding a sentinel member that only a rebuild from
the store puts there, so a set without it was lost, even when a later write re-created it), the entries
`blacklist:{phone}`, `blacklist:seq` (the store change the set holds up to) and the lease
`blacklist:synced` (present only while an agent has recently proven the set current; readers trust a
"clear" answer only while it exists). Changes from the store's feed are applied by one
compare-and-set script, so keepers in several agents never apply them out of order.

The scripts touch several keys: Redis standalone or Sentinel (not Cluster).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agent.constants import (
    ACTION_TTL_SECONDS,
    BLACKLIST_IMPORTING,
    BLACKLIST_REBUILDING,
    BLACKLIST_SENTINEL,
    BLACKLIST_SEQ,
    BLACKLIST_SET,
    BLACKLIST_SYNCED,
    PENDING_TTL_SECONDS,
    Source,
    action_key,
    blacklist_entry_key,
    campaign_counter_key,
    pending_key,
    sns_message_key,
)
from agent.errors import CacheUnavailable
from agent.lifecycle import Resource
from agent.optout import BlacklistEntry, OptOutRecord
from agent.store import Change

# KEYS: seq, set, lease, then per op its entry key and pending key. ARGV: expected seq ('' = none), new
# seq, lease ms (0 = leave it), op count, sentinel, then per op: 'a'|'r', phone, entry json | removal ms.
# Without the sentinel the set was lost: only a rebuild's _SEAL marks it at a sequence again.
_APPLY = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
if redis.call('SISMEMBER', KEYS[2], ARGV[5]) == 0 then return 0 end
for i = 1, tonumber(ARGV[4]) do
  local base = 5 + 3 * (i - 1)
  local phone, payload = ARGV[base + 2], ARGV[base + 3]
  if ARGV[base + 1] == 'a' then
    redis.call('SADD', KEYS[2], phone)
    redis.call('SET', KEYS[2 + 2 * i], payload, 'NX')
  else
    local accepted = redis.call('GET', KEYS[3 + 2 * i])
    if (not accepted) or tonumber(accepted) < tonumber(payload) then
      redis.call('SREM', KEYS[2], phone)
      redis.call('DEL', KEYS[2 + 2 * i])
    end
  end
end
redis.call('SET', KEYS[1], ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[3], ARGV[2], 'PX', tonumber(ARGV[3])) end
return 1
"""
# An import batch's own changes, applied by the importer when the set is right before them (the same
# compare-and-set as _APPLY, so the keeper need not re-apply them). KEYS: seq, set, then each number's entry
# key. ARGV: expected seq, new seq ('' = leave it), the entry JSON before and after the number, sentinel,
# lease ms (0 = leave it), then the numbers.
_ADD_IMPORTED = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
if redis.call('SISMEMBER', KEYS[2], ARGV[5]) == 0 then return 0 end
local entries = {unpack(KEYS, 4)}
local found = redis.call('MGET', unpack(entries))
local pairs = {}
for i = 1, #entries do
  if not found[i] then
    pairs[#pairs + 1] = entries[i]
    pairs[#pairs + 1] = ARGV[3] .. ARGV[6 + i] .. ARGV[4]
  end
end
redis.call('SADD', KEYS[2], unpack(ARGV, 7))
if #pairs > 0 then redis.call('MSET', unpack(pairs)) end
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2])
  if tonumber(ARGV[6]) > 0 then redis.call('SET', KEYS[3], ARGV[2], 'PX', tonumber(ARGV[6])) end
end
return 1
"""
# A rebuild's end. KEYS: seq, set, rebuilding. ARGV: token, the rebuild's member, new seq, sentinel. Only
# while this rebuild still holds the claim and the set still holds its member (added before the copy).
_SEAL = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 0 end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 0 then return 0 end
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('SET', KEYS[1], ARGV[3])
redis.call('DEL', KEYS[3])
return 1
"""
# KEYS: rebuilding. ARGV: token, ttl ms (0: give the claim up).
_RENEW_REBUILD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) == 0 then return redis.call('DEL', KEYS[1]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""
# KEYS: seq, set, lease. ARGV: expected seq, lease ms, sentinel.
_RENEW = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
if redis.call('SISMEMBER', KEYS[2], ARGV[3]) == 0 then return 0 end
redis.call('SET', KEYS[3], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
"""


@dataclass(frozen=True)
class CacheState:
    seq: int | None
    """The store change the set holds up to (None: unknown, the set must be rebuilt)."""
    set_exists: bool
    """The set holds the sentinel (it was not lost since the last rebuild)."""
    lease: int | None
    """The sequence the lease vouches for (None: no lease, nobody proved the set current lately)."""
    importing: bool = False
    """A bulk import is applying its own changes (and renewing the lease): keepers wait."""


@dataclass(frozen=True)
class Rebuild:
    """One keeper's claim on rebuilding the set from the store."""

    token: str
    key: str
    """The set it copies into: the live set, or (exact) a new key that replaces it."""

    @property
    def member(self) -> str:
        return f"~rebuild:{self.token}"


@dataclass(frozen=True)
class CacheAnswer:
    members: list[bool]
    lease: int | None
    set_exists: bool

    @property
    def current(self) -> bool:
        """Whether a "clear" from the set may be trusted (the lease holds and the set exists)."""
        return self.lease is not None and self.set_exists


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _int(value: object) -> int | None:
    try:
        return int(str(value)) if value is not None else None
    except ValueError:
        return None


class RedisCache(Resource):
    """The Redis side of the blacklist (async context manager). Every method raises CacheUnavailable."""

    def __init__(self, url: str, *, timeout: float = 0.5, max_connections: int = 64) -> None:
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=max_connections,
            decode_responses=True,
        )
        self._apply = self._redis.register_script(_APPLY)
        self._renew = self._redis.register_script(_RENEW)
        self._add_imported = self._redis.register_script(_ADD_IMPORTED)
        self._seal = self._redis.register_script(_SEAL)
        self._renew_rebuild = self._redis.register_script(_RENEW_REBUILD)
        self._closed = False

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._redis.aclose()

    async def _execute(self, pipe: aioredis.client.Pipeline) -> list[object]:
        try:
            return list(await pipe.execute())
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"Redis: {exc}") from exc

    # --- the pipeline's write, before the store -------------------------------------------------------
    async def write_optouts(self, records: Sequence[OptOutRecord]) -> list[datetime]:
        """Make each opt-out visible to the dialers (set member, entry, pending mark, action record) in one
        round trip, then count new ones per campaign. Returns when Redis confirmed each."""
        pipe = self._redis.pipeline(transaction=False)
        for record in records:
            if record.phone_number is not None:
                # The pending mark first: a removal applied in between must already see it.
                pipe.set(pending_key(record.phone_number), _ms(record.received_at), ex=PENDING_TTL_SECONDS)
                pipe.sadd(BLACKLIST_SET, record.phone_number)
                pipe.set(blacklist_entry_key(record.phone_number), record.entry().to_json(), nx=True)
            pipe.set(action_key(record.event_id), record.to_json(), ex=ACTION_TTL_SECONDS, nx=True)
        replies = await self._execute(pipe)
        confirmed = datetime.now(UTC)
        # A redelivered opt-out finds its action record already there: it is not counted again.
        counters = self._redis.pipeline(transaction=False)
        index = 0
        for record in records:
            index += 3 if record.phone_number is not None else 0
            if replies[index] and record.campaign_id is not None:
                counters.incr(campaign_counter_key(record.campaign_id))
            index += 1
        if len(counters):
            await self._execute(counters)
        return [confirmed] * len(records)

    async def add_pending(self, numbers: Sequence[str], *, chunk: int = 5000) -> None:
        """Put numbers the journal holds (not in the store yet) back in the set, marked pending."""
        now = int(time.time() * 1000)
        for i in range(0, len(numbers), chunk):
            pipe = self._redis.pipeline(transaction=False)
            part = numbers[i : i + chunk]
            for n in part:
                pipe.set(pending_key(n), now, ex=PENDING_TTL_SECONDS)
            pipe.sadd(BLACKLIST_SET, *part)
            await self._execute(pipe)

    # --- the keeper: state, change feed, rebuild, lease ---------------------------------------------------
    async def state(self) -> CacheState:
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(BLACKLIST_SEQ)
        pipe.sismember(BLACKLIST_SET, BLACKLIST_SENTINEL)
        pipe.get(BLACKLIST_SYNCED)
        pipe.exists(BLACKLIST_IMPORTING)
        seq, exists, lease, importing = await self._execute(pipe)
        return CacheState(_int(seq), bool(exists), _int(lease), bool(importing))

    async def apply(self, changes: Sequence[Change], *, expected: int | None, new: int, lease_ms: int) -> bool:
        """Apply store changes in order if the set is still at `expected` and was not lost, then mark it at
        `new` (and renew the lease when `lease_ms`). False when another agent moved it first or the set lost
        its sentinel (nothing applied)."""
        keys = [BLACKLIST_SEQ, BLACKLIST_SET, BLACKLIST_SYNCED]
        args: list[str | int] = ["" if expected is None else str(expected), str(new), lease_ms, len(changes),
                                 BLACKLIST_SENTINEL]
        for change in changes:
            keys += [blacklist_entry_key(change.phone_number), pending_key(change.phone_number)]
            if change.op == "add":
                assert change.entry is not None
                args += ["a", change.phone_number, change.entry.to_json()]
            else:
                args += ["r", change.phone_number, _ms(change.at)]
        try:
            return bool(await self._apply(keys=keys, args=args))
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"Redis: applying store changes failed: {exc}") from exc

    async def renew(self, seq: int, *, lease_ms: int) -> bool:
        """Renew the lease if the set is (still) at `seq`."""
        try:
            return bool(await self._renew(keys=[BLACKLIST_SEQ, BLACKLIST_SET, BLACKLIST_SYNCED],
                                          args=[str(seq), lease_ms, BLACKLIST_SENTINEL]))
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"Redis: renewing the lease failed: {exc}") from exc

    async def add_entries(self, entries: Sequence[BlacklistEntry], *, set_key: str = BLACKLIST_SET) -> None:
        """Set membership (in `set_key`) and entries; one pipelined round trip (keep batches moderate)."""
        if not entries:
            return
        pipe = self._redis.pipeline(transaction=False)
        pipe.sadd(set_key, *(e.phone_number for e in entries))
        pipe.mset({blacklist_entry_key(e.phone_number): e.to_json() for e in entries})
        await self._execute(pipe)

    async def add_imported(
        self, numbers: Sequence[str], *, added_at: datetime, reason: str, source: Source, after: int, last: int,
        lease_ms: int = 0, chunk: int = 2000,
    ) -> bool:
        """Make an import batch's new numbers visible (set member, entry unless one exists) if the set is at
        `after`, the change sequence right before the batch, and then mark it at `last`, its last change: the
        import keeps `blacklist:seq` moving, so the keeper has nothing to re-apply. Each chunk is one short
        script (Redis is never held long). With `lease_ms`, the lease is renewed as the keeper renews it after
        applying the feed up to the head it read (the batch's commit was the head). False when the set is
        elsewhere (another writer's change came in between): nothing more is written, and the change feed
        applies the batch."""
        marker = "\x00"
        entry = BlacklistEntry(phone_number=marker, added_at=added_at, reason=reason, source=source).to_json()
        before, _, behind = entry.partition(json.dumps(marker)[1:-1])
        for i in range(0, len(numbers), chunk):
            part = numbers[i : i + chunk]
            final = i + chunk >= len(numbers)
            try:
                done = await self._add_imported(
                    keys=[BLACKLIST_SEQ, BLACKLIST_SET, BLACKLIST_SYNCED, *(blacklist_entry_key(n) for n in part)],
                    args=[str(after), str(last) if final else "", before, behind, BLACKLIST_SENTINEL, lease_ms,
                          *part])
            except (RedisError, OSError) as exc:
                raise CacheUnavailable(f"Redis: adding imported numbers failed: {exc}") from exc
            if not done:
                return False
        return True

    async def claim_import(self, owner: str, *, ttl_ms: int) -> None:
        """Tell keepers an import is applying its own changes (`BLACKLIST_IMPORTING`, for `ttl_ms`)."""
        try:
            await self._redis.set(BLACKLIST_IMPORTING, owner, px=ttl_ms)
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"Redis: {exc}") from exc

    async def release_import(self, owner: str) -> None:
        try:
            if await self._redis.get(BLACKLIST_IMPORTING) == owner:
                await self._redis.delete(BLACKLIST_IMPORTING)
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"Redis: {exc}") from exc

    # --- rebuilds: one keeper at a time, sealed only if the set survived the copy ------------------------
    async def claim_rebuild(self, *, ttl_ms: int, exact: bool) -> Rebuild | None:
        """Claim the rebuild (None when another keeper holds it) and put its member in the set it copies into
        (the live set, or for `exact` a new key that replaces it)."""
        token = uuid.uuid4().hex
        try:
            if not await self._redis.set(BLACKLIST_REBUILDING, token, nx=True, px=ttl_ms):
                return None
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"Redis: {exc}") from exc
        rebuild = Rebuild(token, f"{BLACKLIST_SET}:rebuild:{token[:8]}" if exact else BLACKLIST_SET)
        pipe = self._redis.pipeline(transaction=False)
        if exact:
            pipe.delete(rebuild.key)
        pipe.sadd(rebuild.key, rebuild.member)
        await self._execute(pipe)
        return rebuild

    async def renew_rebuild(self, rebuild: Rebuild, *, ttl_ms: int) -> bool:
        try:
            return bool(await self._renew_rebuild(keys=[BLACKLIST_REBUILDING], args=[rebuild.token, ttl_ms]))
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"Redis: {exc}") from exc

    async def replace_set(self, rebuild: Rebuild) -> None:
        """Make an exact rebuild's key the live set (not current until sealed)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.rename(rebuild.key, BLACKLIST_SET)
        pipe.delete(BLACKLIST_SYNCED)
        await self._execute(pipe)

    async def seal(self, rebuild: Rebuild, *, seq: int) -> bool:
        """Mark the rebuilt set at `seq` and give it the sentinel, if the claim still holds and the set kept
        the rebuild's member (it was not lost during the copy). False otherwise: the next round rebuilds."""
        try:
            return bool(await self._seal(keys=[BLACKLIST_SEQ, BLACKLIST_SET, BLACKLIST_REBUILDING],
                                         args=[rebuild.token, rebuild.member, str(seq), BLACKLIST_SENTINEL]))
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"Redis: {exc}") from exc

    async def release_rebuild(self, rebuild: Rebuild) -> None:
        """Give up a rebuild that did not finish (its member and its key go too)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.srem(BLACKLIST_SET, rebuild.member)
        if rebuild.key != BLACKLIST_SET:
            pipe.delete(rebuild.key)
        await self._execute(pipe)
        await self.renew_rebuild(rebuild, ttl_ms=0)  # the claim is given up

    async def delete(self, *keys: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(*keys)
        await self._execute(pipe)

    # --- readers --------------------------------------------------------------------------------------------
    async def check(self, numbers: Sequence[str]) -> CacheAnswer:
        """Membership of each number, with what is needed to trust a "clear" (see CacheAnswer.current)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(BLACKLIST_SYNCED)
        pipe.sismember(BLACKLIST_SET, BLACKLIST_SENTINEL)
        pipe.smismember(BLACKLIST_SET, list(numbers))
        lease, exists, members = await self._execute(pipe)
        assert isinstance(members, list)
        return CacheAnswer([bool(m) for m in members], _int(lease), bool(exists))

    async def message_seen(self, message_id: str) -> bool:
        """Whether an SNS message id was applied (by any bridge) within SNS_MESSAGE_TTL_SECONDS."""
        try:
            return bool(await self._redis.exists(sns_message_key(message_id)))
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"Redis: {exc}") from exc

    async def remember_message(self, message_id: str, *, ttl: int) -> None:
        try:
            await self._redis.set(sns_message_key(message_id), "1", ex=ttl)
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"Redis: {exc}") from exc
