"""Reading a JetStream stream for recovery: its state (epoch, first/last sequence) and
the stored messages of one pattern after a position, since a time, or the last K.

Each read is one ephemeral pull consumer (no acks, memory state, deleted after
the read and expiring on its own if the worker dies mid-read), filtered to the
pattern, fetched in batches and bounded by ``limit``: a read never holds more than
``max_replay + 1`` messages. Which read serves which client, and what to answer,
is decided in :mod:`fanout.core.history`; every JetStream failure (no stream, no
JetStream, timeout, NATS down) is :class:`Unavailable`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import msgspec
import nats
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from fanout.core.history import StreamState
from fanout.errors import Code, OperatorError

log = logging.getLogger("fanout.history")

#: Messages asked for per pull request.
FETCH_BATCH = 256
#: An abandoned read consumer is removed by the server after this long.
INACTIVE_S = 10.0
#: ``last:K`` looks back from the end in steps that double, at most this many times.
MAX_PROBES = 24


class Unavailable(OperatorError):
    """JetStream cannot answer now: ``recovered:false``, reason ``unavailable`` (``XYW004``).

    The message (the server's error) goes to the log; the client sees only the reason.
    """

    CODE = Code.NATS_DOWN


@dataclass(frozen=True, slots=True)
class Stored:
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None
    time: float


class _State(msgspec.Struct):
    first_seq: int = 0
    last_seq: int = 0
    first_ts: str = ""


class _Info(msgspec.Struct):
    created: str = ""
    state: _State = msgspec.field(default_factory=_State)
    error: dict[str, object] | None = None


_info_decoder = msgspec.json.Decoder(_Info)


def _unix(text: str) -> float:
    """A JetStream RFC 3339 timestamp (nanoseconds) → unix seconds; 0.0 for the zero time."""
    if not text or text.startswith("0001-"):
        return 0.0
    head, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp()


class HistoryReader:
    """JetStream reads on the worker's NATS connection (``client()`` gives the current one)."""

    def __init__(self, client: Callable[[], Client | None], timeout_s: float) -> None:
        self._client = client
        self.timeout_s = timeout_s

    def _nc(self) -> Client:
        nc = self._client()
        if nc is None or not nc.is_connected:
            raise Unavailable("NATS is down")
        return nc

    async def state(self, stream: str) -> StreamState:
        """The stream's epoch (its creation time) and its sequence range."""
        nc = self._nc()
        try:
            reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=self.timeout_s)
            info = _info_decoder.decode(reply.data)
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError) as exc:
            raise Unavailable(f"stream info {stream}: {exc!r}") from None
        if info.error is not None or not info.created:
            raise Unavailable(f"stream info {stream}: {info.error}")
        s = info.state
        return StreamState(info.created, s.first_seq, s.last_seq, _unix(s.first_ts))

    async def read(
        self,
        stream: str,
        pattern: str,
        *,
        after: int | None = None,
        since: float | None = None,
        limit: int,
    ) -> tuple[list[Stored], int]:
        """Messages of ``pattern`` after sequence ``after`` (or from time ``since``), at most
        ``limit``; and how many were stored from that start when the read began."""
        if after is not None:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1
            )
        else:
            assert since is not None
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=datetime.fromtimestamp(since).astimezone(),
            )
        return await self._consume(stream, pattern, config, limit, skip_to=None)

    async def last(self, stream: str, pattern: str, k: int, state: StreamState) -> list[Stored]:
        """The last ``k`` stored messages of ``pattern``.

        JetStream has no "last K of a filter": look back from the end in doubling
        steps until a consumer from there has at least ``k`` pending, then read
        from there and keep the last ``k``.
        """
        start, step = state.last_seq + 1, k
        for _ in range(MAX_PROBES):
            start = max(state.first_seq, start - step)
            pending = await self._pending(stream, pattern, start)
            if pending >= k or start <= state.first_seq:
                break
            step *= 2
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        got, _ = await self._consume(stream, pattern, config, limit=None, skip_to=k)
        return got

    async def _pending(self, stream: str, pattern: str, start: int) -> int:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        js, name, pending = await self._create(stream, pattern, config)
        await self._delete(js, stream, name)
        return pending

    async def _create(
        self, stream: str, pattern: str, config: ConsumerConfig
    ) -> tuple[JetStreamContext, str, int]:
        """An ephemeral read consumer; its name and how many messages it has pending."""
        nc = self._nc()
        js = nc.jetstream(timeout=self.timeout_s)
        config.filter_subject = pattern
        config.ack_policy = AckPolicy.NONE
        config.mem_storage = True
        config.num_replicas = 1
        config.inactive_threshold = INACTIVE_S
        try:
            info = await js.add_consumer(stream, config=config, timeout=self.timeout_s)
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"consumer create on {stream}: {exc!r}") from None
        return js, str(info.name), int(info.num_pending or 0)

    async def _delete(self, js: JetStreamContext, stream: str, name: str) -> None:
        try:
            await js.delete_consumer(stream, name)
        except (nats.errors.Error, TimeoutError) as exc:
            log.debug("read consumer not deleted", extra={"reason": repr(exc)})

    async def _consume(
        self,
        stream: str,
        pattern: str,
        config: ConsumerConfig,
        limit: int | None,
        skip_to: int | None,
    ) -> tuple[list[Stored], int]:
        """Fetch what the consumer had pending at its creation (at most ``limit``; with
        ``skip_to``, only the last ``skip_to`` of it are kept)."""
        js, name, pending = await self._create(stream, pattern, config)
        try:
            want = pending if limit is None else min(pending, limit)
            skip = 0 if skip_to is None else max(0, pending - skip_to)
            psub = await js.pull_subscribe_bind(consumer=name, stream=stream)
            got: list[Stored] = []
            seen = 0
            try:
                while seen < want:
                    batch = await psub.fetch(min(FETCH_BATCH, want - seen), timeout=self.timeout_s)
                    for msg in batch:
                        seen += 1
                        if seen <= skip:
                            continue
                        meta = msg.metadata
                        got.append(
                            Stored(
                                meta.sequence.stream,
                                msg.subject,
                                msg.data,
                                msg.headers,
                                meta.timestamp.timestamp(),
                            )
                        )
            finally:
                await psub.unsubscribe()
            return got, pending
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"read {stream} {pattern}: {exc!r}") from None
        finally:
            await self._delete(js, stream, name)
