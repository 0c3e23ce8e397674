"""The worker's client side: who may connect, what each op does, the periodic sweep.

``admit`` runs the handshake checks in the contract's order (Origin, limits,
token present, token valid) and either refuses with a status + code or
returns a live :class:`WsConnection`: it raises :class:`HandshakeError` for
its own checks and lets the token check's :class:`AuthError` through (both
carry the HTTP ``status``; :class:`~fanout.worker.handshake.Handshake` writes
either). Limits are: load shedding,
the per-address handshake rate, the worker's connection cap (kept below the
fd limit by the worker), per-address and per-principal caps; the address is
the peer's, or the client's behind a trusted proxy. ``handle`` answers one
client op; ``auth`` re-verifies a live connection's token (same ``sub`` only)
and re-applies its ACL. ``sweep`` runs once a second for the whole worker:
write-stall deadlines, token expiry (``expiring`` notice, then 4005),
handshake timeouts and the hot-path counters, so no connection needs a timer
of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from fanout import metrics
from fanout.core import history, limits, protocol, websocket
from fanout.core.acl import SubjectAcl
from fanout.core.auth import AuthError, KeyLookup, Principal, TokenVerifier, extract_token
from fanout.core.protocol import FrameError
from fanout.core.websocket import HandshakeError
from fanout.core.wsconnection import CLOSE_TIMEOUT_S
from fanout.errors import Close, Code
from fanout.logs import ClientEventLog
from fanout.settings import Settings
from fanout.tokens import TokenCheck
from fanout.worker.connection import OPEN, Events, WsConnection
from fanout.worker.hub import Hub
from fanout.worker.revocation import Denylist

log = logging.getLogger("fanout.gateway")

#: Client error lines logged per second (burst 200) per worker; the rest are counted, then
#: summarised once a sweep: a client must not be able to flood the log.
ERROR_LOG_RATE = 50.0


class RequestHandler(Protocol):
    """The ``request`` op (protocol v1.1) is answered by a pluggable broker."""

    def handle(self, conn: WsConnection, op: protocol.RequestOp) -> bytes | None: ...


class Gateway:
    """Everything about this worker's clients that is not the hot path."""

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        keys: KeyLookup | None,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        #: The wall clock token expiry is measured on (tests script it).
        self.wall = wall
        self.hub = hub
        jwt = settings.jwt
        verifier = TokenVerifier(
            algorithms=jwt.algorithms,
            issuer=jwt.issuer,
            audience=jwt.audience,
            max_token_bytes=jwt.max_token_bytes,
            max_lifetime_s=jwt.max_lifetime_s,
            leeway_s=jwt.leeway_s,
        )
        self.tokens = TokenCheck(verifier, keys)
        self.auth_required = settings.ws.auth_required and not settings.demo.enabled
        srv = settings.server
        #: The connection cap in force; the worker lowers it to fit the fd limit.
        self.max_connections = srv.max_connections
        self.denylist = Denylist()
        self.shedder = limits.LoadShedder(srv.shed_loop_lag_s, srv.shed_rss_bytes)
        self.trusted_proxies = limits.parse_networks(srv.trusted_proxies)
        self.handshake_rate = limits.HandshakeRate(
            srv.handshake_rate_per_ip, srv.handshake_burst_per_ip
        )
        #: Every log line a client causes goes through this (the request broker's too).
        self.client_log = ClientEventLog(ERROR_LOG_RATE, 4 * ERROR_LOG_RATE)
        #: Connections per address key (IPv4 address or IPv6 /64).
        self.per_ip: Counter[str] = Counter()
        self.per_principal: Counter[str] = Counter()
        self.pending_handshakes: dict[asyncio.BaseProtocol, float] = {}
        self.closing: dict[WsConnection, float] = {}
        self.draining = False
        self.drain_code = int(Close.GOING_AWAY)
        #: One tuple for every connection's ACL (a list would be copied per connection).
        self._whitelist = tuple(settings.ws.subject_whitelist)
        self.requests: RequestHandler | None = None
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}"
        lim = settings.ws
        self._limits = protocol.Limits(lim.max_subs, lim.max_frame_bytes, lim.inbound_rate)
        #: The worker's open clients (the hub reads the same set).
        self.connections: set[WsConnection] = set()
        hub.connections = self.connections
        self._events = Events(self.handle, hub.mark_dirty, self.forget, self.client_log)

    # -- handshake --------------------------------------------------------
    def client_of(self, peer: str, head: websocket.RequestHead) -> tuple[str, bool]:
        """``(client address, via a trusted proxy)`` for a request from ``peer``."""
        return limits.client_address(
            peer, head.header_values("x-forwarded-for"), self.trusted_proxies
        )

    def _origin_allowed(self, head: websocket.RequestHead, via_proxy: bool) -> bool:
        origins = head.header_values("origin")
        if not origins:
            return not self.settings.ws.require_origin
        if len(origins) > 1:
            return False
        origin = origins[0]
        allowed = self.settings.ws.allowed_origins
        if origin in allowed or "*" in allowed:
            return True
        hosts = head.header_values("host")
        scheme = "https" if self.settings.tls.cert else "http"
        if via_proxy:
            forwarded = head.header_values("x-forwarded-proto")
            if len(forwarded) == 1 and forwarded[0].strip().lower() in ("http", "https"):
                scheme = forwarded[0].strip().lower()
        return len(hosts) == 1 and origin == f"{scheme}://{hosts[0]}"

    def _refuse(self, limit: str, message: str, retry_after_s: float) -> HandshakeError:
        metrics.LIMIT_REFUSALS.labels(limit).inc()
        return HandshakeError(
            503, Code.LIMIT_EXCEEDED, message, limits.retry_after_header(retry_after_s), limit
        )

    def _refuse_limits(self, peer: str, *, new_handshake: bool) -> None:
        """HandshakeError (503 XYW007 + Retry-After) when a limit stops ``peer`` from connecting."""
        srv = self.settings.server
        if self.shedder.shedding:
            raise self._refuse("shedding", "gateway is overloaded", srv.shed_retry_after_s)
        key = limits.address_key(peer)
        if new_handshake:
            wait = self.handshake_rate.allow(key, time.monotonic())
            if wait:
                raise self._refuse("handshake_rate", "too many handshakes from this address", wait)
        if self.sockets_held() > self.max_connections:
            raise self._refuse("worker_full", "worker is full", 5)
        if srv.max_connections_per_ip and self.per_ip[key] >= srv.max_connections_per_ip:
            raise self._refuse("per_ip", "too many connections from this address", 5)

    def sockets_held(self) -> int:
        """Every client socket this worker holds (the one asking included): the cap is on fds.

        WebSocket connections, closing ones, and sockets before the upgrade
        (request head pending, or a plain HTTP request being answered).
        """
        return len(self.connections) + len(self.closing) + len(self.pending_handshakes)

    def _refuse_principal(self, principal: Principal | None) -> None:
        cap = self.settings.server.max_connections_per_principal
        sub = principal.sub if principal is not None else None
        if cap and sub and self.per_principal[sub] >= cap:
            raise self._refuse("per_principal", "too many connections for this principal", 5)

    async def authenticate(self, token: str, source: str) -> Principal:
        """Verify a token; AuthError with XYW005 on anything wrong (revoked ``jti`` included).

        The flow is :class:`TokenCheck`'s; the gateway adds the tighter lifetime
        of a query-string token and the denylist.
        """
        lifetime = self.settings.jwt.query_token_max_lifetime_s if source == "query" else None
        principal = await self.tokens.verify(token, max_lifetime_s=lifetime)
        if principal.jti is not None and principal.jti in self.denylist:
            raise AuthError(Code.TOKEN_INVALID, "token revoked")
        return principal

    async def admit(
        self,
        head: websocket.RequestHead,
        transport: asyncio.Transport,
        peer: str,
        via_proxy: bool = False,
    ) -> WsConnection:
        """Every handshake check; HandshakeError or AuthError with the status and code."""
        if not self._origin_allowed(head, via_proxy):
            raise HandshakeError(403, Code.ORIGIN_DENIED, "origin not allowed")
        self._refuse_limits(peer, new_handshake=True)
        accept = websocket.check_upgrade(head)
        if len(head.header_values("host")) != 1:
            raise HandshakeError(400, Code.MALFORMED, "exactly one Host header required")
        jwt = self.settings.jwt
        principal: Principal | None = None
        token, source = extract_token(
            head.headers,
            head.query,
            cookie_name=jwt.cookie_name,
            allow_query=jwt.allow_query_token,
        )
        if token is None:
            if self.auth_required:
                raise AuthError(Code.UNAUTHORIZED, "a token is required")
        elif self.tokens.keys is not None:
            principal = await self.authenticate(token, source)
        self._refuse_principal(principal)
        self._refuse_limits(peer, new_handshake=False)
        if transport.is_closing():
            raise ConnectionResetError
        offered = websocket.subprotocols(head)
        transport.write(websocket.response_101(accept, "bearer" if "bearer" in offered else None))
        conn = WsConnection(
            self.settings,
            self.hub,
            self._events,
            transport,
            f"{self._prefix}-{next(self._ids):x}",
            peer,
            principal,
            self.acl_for(principal),
        )
        if principal is not None and self.settings.requests.forward_token:
            conn.token = token
        self.connections.add(conn)
        self.per_ip[limits.address_key(peer)] += 1
        if principal is not None and principal.sub:
            self.per_principal[principal.sub] += 1
        expires = principal.expires_at if principal is not None else None
        conn.send_control(
            websocket.text_frame(protocol.welcome(conn.conn_id, expires, self._limits))
        )
        if not self.hub.nats_up:
            conn.send_control(websocket.text_frame(protocol.status("down")))
        if self.draining:
            # accepted before the listener closed: finish the upgrade, then send the
            # worker's drain code (1012: reconnect now) instead of refusing it
            conn.close(self.drain_code, "gateway draining")
        return conn

    def acl_for(self, principal: Principal | None) -> SubjectAcl:
        ws = self.settings.ws
        return SubjectAcl.from_claims(
            self._whitelist,
            None if principal is None else principal.claims,
            self.settings.jwt.subjects_claim,
            allow_full_wildcard=ws.allow_full_wildcard,
            max_bytes=ws.max_subject_bytes,
        )

    def forget(self, conn: WsConnection, closing: bool = False) -> None:
        """A connection is closing or gone: release its subscriptions and its counts."""
        if closing:
            self.closing[conn] = conn.closing_since
        else:
            self.closing.pop(conn, None)
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.hub.remove(conn)
        metrics.CONNECTION_DURATION.observe(time.monotonic() - conn.opened_at)
        key = limits.address_key(conn.peer)
        self.per_ip[key] -= 1
        if self.per_ip[key] <= 0:
            del self.per_ip[key]
        sub = conn.principal.sub if conn.principal is not None else None
        if sub:
            self.per_principal[sub] -= 1
            if self.per_principal[sub] <= 0:
                del self.per_principal[sub]

    # -- ops --------------------------------------------------------------
    def error(self, conn: WsConnection, op_id: int | None, code: str, message: str) -> bytes:
        metrics.CLIENT_ERRORS.labels(code).inc()
        self.client_log.log(log, message, code=code, conn=conn.conn_id)
        return protocol.error(op_id, code, message)

    def handle(self, conn: WsConnection, op: protocol.ClientOp | FrameError) -> bytes | None:
        if isinstance(op, FrameError):
            return self.error(conn, op.id, op.code, op.message)
        if isinstance(op, protocol.Sub):
            return self.on_sub(conn, op)
        if isinstance(op, protocol.Unsub):
            if op.subject in conn.subs:
                conn.remove_sub(op.subject)
            return protocol.ack(op.id)
        if isinstance(op, protocol.Ping):
            return protocol.pong(op.id)
        if isinstance(op, protocol.Auth):
            asyncio.get_running_loop().create_task(self.reauthenticate(conn, op))
            return None
        if self.requests is None:
            return self.error(conn, op.id, Code.SUBJECT_DENIED, "requests are not enabled")
        return self.requests.handle(conn, op)

    def on_sub(self, conn: WsConnection, op: protocol.Sub) -> bytes | None:
        """The ack, or None when it waits for the pattern to be live (the hub sends it)."""
        if op.subject in conn.subs:
            return protocol.ack(op.id)
        reason = conn.acl.check(op.subject)
        if reason is not None:
            return self.error(conn, op.id, Code.SUBJECT_DENIED, reason)
        if len(conn.subs) >= self.settings.ws.max_subs:
            return self.error(conn, op.id, Code.LIMIT_EXCEEDED, "too many subscriptions")
        resume: history.Resume | history.Reason | None = None
        if op.since is not None or op.last is not None:
            since = op.since or protocol.Since()
            try:
                resume = history.resume_of(
                    op.id,
                    since.seq,
                    since.epoch,
                    since.time,
                    op.last,
                    now=time.time(),
                    max_replay=self.settings.history.max_replay,
                )
            except FrameError as exc:
                return self.error(conn, op.id, exc.code, exc.message)
        return conn.add_sub(op.subject, op.id, resume)

    async def reauthenticate(self, conn: WsConnection, op: protocol.Auth) -> None:
        """The ``auth`` op: same identity, fresh expiry, ACL re-applied.

        A connection never changes identity: the new token must name the same
        ``sub`` (an anonymous connection may take one identity, once, within
        the per-principal cap). On refusal the old token stays in force.
        """
        try:
            principal = await self.authenticate(op.token, "auth")
            old = conn.principal  # read after the await: another auth op may have landed
            if old is not None and principal.sub != old.sub:
                raise AuthError(Code.TOKEN_INVALID, "the new token names a different subject")
            if old is None:
                self._refuse_principal(principal)
        except (AuthError, HandshakeError) as exc:
            frame = self.error(conn, op.id, exc.code, exc.message)
            conn.send_control(websocket.text_frame(frame))
            return
        if conn.state != OPEN:
            return
        if old is None and principal.sub:
            self.per_principal[principal.sub] += 1
        conn.principal = principal
        if self.settings.requests.forward_token:
            conn.token = op.token
        # warn again only if the new token leaves more than the lead time (else: once a second)
        expires = principal.expires_at
        conn.warned = expires is not None and (
            expires - self.wall() <= self.settings.jwt.expiring_lead_s
        )
        conn.acl = self.acl_for(principal)
        frames: list[bytes] = []
        for pattern in list(conn.subs):
            if conn.acl.check(pattern) is not None:
                conn.remove_sub(pattern)
                frames.append(protocol.unsubscribed(pattern, Code.SUBJECT_DENIED))
        frames.append(protocol.ack(op.id) if expires is None else protocol.ack(op.id, expires))
        for frame in frames:
            conn.send_control(websocket.text_frame(frame))

    # -- periodic work ----------------------------------------------------
    def sweep(self, now: float) -> None:
        """Once a second: deadlines and expiry for every connection, no timer each."""
        wall = self.wall()
        stall = self.settings.outbox.write_timeout_s
        lead = self.settings.jwt.expiring_lead_s
        leeway = self.settings.jwt.leeway_s
        for conn, since in list(self.closing.items()):
            if now - since > CLOSE_TIMEOUT_S:  # the client never answered our close frame
                del self.closing[conn]
                conn.transport.abort()
        for conn in list(self.connections):
            if conn.paused and now - conn.paused_since > stall:
                self.hub.cut_slow_consumer(conn, "write stalled")
                continue
            principal = conn.principal
            if principal is not None and principal.expires_at is not None:
                left = principal.expires_at - wall
                if left <= -leeway:
                    conn.close(Close.TOKEN_EXPIRED, "token expired")
                elif left <= lead and not conn.warned:
                    conn.warned = True
                    conn.send_control(websocket.text_frame(protocol.expiring(principal.expires_at)))
        timeout = self.settings.server.handshake_timeout_s
        for gate, started in list(self.pending_handshakes.items()):
            if now - started > timeout:
                self.pending_handshakes.pop(gate, None)
                metrics.HANDSHAKE_TIMEOUTS.inc()
                transport = getattr(gate, "transport", None)
                if transport is not None:
                    transport.abort()
        self.handshake_rate.prune(now)
        self.client_log.flush(log)
        self.hub.publish_counts()

    def ping_idle(self, now: float) -> None:
        """One ping sweep for the worker: ping the quiet, close the dead."""
        ws = self.settings.ws
        ping = websocket.ping_frame()
        for conn in list(self.connections):
            idle = now - conn.last_rx
            if idle > ws.idle_timeout_s:
                conn.close(Close.GOING_AWAY, "idle timeout")
            elif idle >= ws.ping_interval_s:
                conn.send_control(ping)

    def close_all(self, code: int, reason: str) -> None:
        for conn in list(self.connections):
            conn.close(code, reason)
