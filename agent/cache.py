"""Redis: the keys the dialers' pre-dial check reads. Non-critical: the store is the system of record.

`blacklist:synced` marks a set known to hold the whole store; Redis that restarted empty has no marker,
and the pre-dial check then asks the store instead (fail closed).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agent.constants import (
    ACTION_TTL_SECONDS,
    BLACKLIST_SET,
    BLACKLIST_SYNCED,
    Source,
    action_key,
    blacklist_entry_key,
    campaign_counter_key,
)
from agent.errors import CacheUnavailable
from agent.lifecycle import Resource
from agent.optout import BlacklistEntry, OptOutRecord
from agent.store import Store


class RedisCache(Resource):
    """The Redis side of the blacklist (async context manager)."""

    def __init__(self, url: str, *, timeout: float = 0.5, max_connections: int = 64) -> None:
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=max_connections,
            decode_responses=True,
        )
        self._closed = False
        self.dirty = False
        """A write failed: the set may miss a stored number until reconciliation rebuilds it."""

    @property
    def client(self) -> aioredis.Redis:
        return self._redis

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._redis.aclose()

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"Redis: {exc}") from exc

    async def write_optouts(self, records: Sequence[OptOutRecord]) -> list[None]:
        """For each new opt-out: set membership, entry, action record and campaign counter; one round trip.

        A failure marks the cache dirty (see `dirty`) before raising CacheUnavailable.
        """
        pipe = self._redis.pipeline(transaction=False)
        for record in records:
            if record.phone_number is not None:
                pipe.sadd(BLACKLIST_SET, record.phone_number)
                pipe.set(blacklist_entry_key(record.phone_number), record.entry().to_json(), nx=True)
            pipe.set(action_key(record.event_id), record.to_json(), ex=ACTION_TTL_SECONDS)
            if record.campaign_id is not None:
                pipe.incr(campaign_counter_key(record.campaign_id))
        try:
            await self._execute(pipe)
        except CacheUnavailable:
            await self.mark_dirty()
            raise
        return [None] * len(records)

    async def ensure_listed(self, entry: BlacklistEntry) -> None:
        """Set membership, and the entry unless one is there already (its first addedAt wins)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.sadd(BLACKLIST_SET, entry.phone_number)
        pipe.set(blacklist_entry_key(entry.phone_number), entry.to_json(), nx=True)
        await self._execute(pipe)

    async def mark_dirty(self) -> None:
        """The set may now miss a stored number: stop trusting it here, and unmark it for everyone if
        Redis answers (the reconciler unmarks and rebuilds as soon as it does)."""
        self.dirty = True
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(BLACKLIST_SYNCED)

    async def add_numbers(
        self, numbers: Sequence[str], *, added_at: datetime, reason: str, source: Source, chunk: int = 5000
    ) -> None:
        """Bulk form of add_entries for numbers sharing one addedAt, reason and source (imports)."""
        common = json.dumps({"addedAt": added_at.isoformat(), "reason": reason, "source": source.value})[1:]
        for i in range(0, len(numbers), chunk):
            part = numbers[i : i + chunk]
            pipe = self._redis.pipeline(transaction=False)
            pipe.sadd(BLACKLIST_SET, *part)
            pipe.mset({blacklist_entry_key(n): f'{{"phoneNumber":"{n}",{common}' for n in part})
            await self._execute(pipe)

    async def add_entries(
        self, entries: Sequence[BlacklistEntry], *, set_key: str = BLACKLIST_SET, chunk: int = 5000
    ) -> None:
        """Set membership (in `set_key`) and entries, no counters; pipelined chunks small enough for the
        socket timeout."""
        for i in range(0, len(entries), chunk):
            part = entries[i : i + chunk]
            pipe = self._redis.pipeline(transaction=False)
            pipe.sadd(set_key, *(e.phone_number for e in part))
            pipe.mset({blacklist_entry_key(e.phone_number): e.to_json() for e in part})
            await self._execute(pipe)

    async def remove(self, phone_number: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.srem(BLACKLIST_SET, phone_number)
        pipe.delete(blacklist_entry_key(phone_number))
        await self._execute(pipe)

    async def check(self, numbers: Sequence[str]) -> list[bool] | None:
        """Membership of each number, or None when the set is not known to be complete (not synced)."""
        if self.dirty:
            return None
        pipe = self._redis.pipeline(transaction=False)
        pipe.exists(BLACKLIST_SYNCED)
        pipe.smismember(BLACKLIST_SET, list(numbers))
        synced, members = await self._execute(pipe)
        assert isinstance(members, list)
        if not synced:
            return None
        return [bool(m) for m in members]

    async def is_synced(self) -> bool:
        """Whether the set is marked complete and no write of ours has failed since."""
        if self.dirty:
            return False
        try:
            return bool(await self._redis.exists(BLACKLIST_SYNCED))
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"Redis: {exc}") from exc

    async def sync_from(self, store: Store, *, batch_size: int = 10_000) -> int:
        """Rebuild the set and entries from the store; returns how many numbers the set holds.

        The set is built under a temporary key and renamed over the live one, so numbers removed from the
        store leave it too; opt-outs added while the rebuild ran are copied in again after the rename.
        """
        # Margin: a transaction's recorded_at is its start time, and a write may take up to the store's
        # operation timeout to commit.
        started = datetime.now(UTC) - timedelta(seconds=15)
        tmp = f"{BLACKLIST_SET}:rebuild:{uuid.uuid4().hex[:8]}"
        total = 0
        self.dirty = False  # a write failing from here on sets it again, and the marker is then not written
        try:
            await self._redis.delete(tmp)
            async for batch in store.entries(batch_size=batch_size):
                await self.add_entries(batch, set_key=tmp)
                total += len(batch)
            if total:
                await self._redis.rename(tmp, BLACKLIST_SET)
            else:
                await self._redis.delete(BLACKLIST_SET)
            async for batch in store.entries(batch_size=batch_size, since=started):
                await self.add_entries(batch)
            if self.dirty:
                return total  # a write failed while rebuilding: not complete, the next round rebuilds again
            await self._redis.set(BLACKLIST_SYNCED, datetime.now(UTC).isoformat())
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"Redis: sync failed: {exc}") from exc
        finally:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.delete(tmp)
        return total

    async def _execute(self, pipe: aioredis.client.Pipeline) -> list[object]:
        try:
            return list(await pipe.execute())
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"Redis: {exc}") from exc
