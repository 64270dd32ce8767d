"""JWT login, per-plan rate limits with SlowAPI, and token revocation on Redis, in one FastAPI file.

Read it top to bottom: settings, users and plans, passwords, tokens, the revocation store, rate
limits, request models and dependencies, the app with its cleanup task, then the endpoints. Run it
with `uvicorn main:app`: with no REDIS_URI set it keeps its state in an embedded, in-process fake
Redis; set REDIS_URI and SECRET_KEY to share state between workers. Modelled on FastAPI's security
tutorial and SlowAPI's docs; speaks OAuth2 (RFC 6749, 7009, 7662, 8414) to standard clients.
"""

import asyncio
import functools
import ipaddress
import logging
import math
import os
import secrets
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar

import bcrypt
import fakeredis
import jwt
import limits
import limits.storage
import redis.asyncio
import redis.asyncio.retry
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import OAuth2PasswordBearer
from greenlet import getcurrent, greenlet
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio.cluster import ClusterNode
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# A child of uvicorn's logger, so these lines share its handler, format and level.
logger = logging.getLogger("uvicorn.app")


class SafeRequestLines(logging.Filter):
    """Cleans what clients write into uvicorn's request lines: query strings go (GET
    /is_token_revoked carries a token there, under any spelling of its name, like `tok%65n=`), and
    control characters in a client address that a proxy passed on are escaped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.clean(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True

    @staticmethod
    def clean(text: str) -> str:
        if "?" in text:
            text = text.partition("?")[0] + "?[redacted]"
        return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


for uvicorn_logger in ("uvicorn.access", "uvicorn.error"):
    logging.getLogger(uvicorn_logger).addFilter(SafeRequestLines())
# SlowAPI logs every exceeded limit with the client's key unescaped; rate_limit_exceeded() below
# logs the same event safely, so keep only SlowAPI's errors.
logging.getLogger("slowapi").setLevel(logging.ERROR)


# --- Settings ---

# Words that only a hand-written or copied example key contains (compared in lower case).
PLACEHOLDER_WORDS = ("change", "secret", "example", "placeholder")
MIN_DISTINCT_SECRET_CHARS = 10
MINUTES_PER_YEAR = 365 * 24 * 60
# A moving window keeps one Redis entry per call it counts: past this many, memory gives out first.
MAX_CALLS_PER_WINDOW = 10_000_000
GENERATE_SECRET = "python3 -c 'import secrets; print(secrets.token_urlsafe(64))'"
SENTINEL_SCHEME, CLUSTER_SCHEME = "redis+sentinel://", "redis+cluster://"  # the forms `limits` documents
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", SENTINEL_SCHEME, CLUSTER_SCHEME)
BAD_REDIS_URI = "is not a URL that redis-py accepts (check hosts, ports, database, options)"


@dataclass(frozen=True)
class RedisNodes:
    """What a redis+sentinel:// or redis+cluster:// URI names: several hosts and one password."""

    hosts: list[tuple[str, int]]
    password: str | None
    service: str  # the Sentinel's name for the primary; empty for a cluster

    @classmethod
    def from_uri(cls, uri: str) -> "RedisNodes":
        """Raises ValueError for anything but `scheme://[:password@]host:port,host:port[/service]`."""
        parts = urllib.parse.urlsplit(uri)
        credentials, _, hosts = parts.netloc.rpartition("@")
        nodes = [node.rpartition(":") for node in hosts.split(",")]
        if any(not host or not port.isdigit() or not 0 < int(port) < 65536 for host, _, port in nodes):
            raise ValueError("every host needs a port")
        password = urllib.parse.unquote(credentials.partition(":")[2]) or None
        hosts_and_ports = [(host.strip("[]"), int(port)) for host, _, port in nodes]
        return cls(hosts_and_ports, password, parts.path.strip("/"))


def one_rate_limit(value: str) -> str:
    # The messages never repeat the value: it could be a secret pasted into the wrong variable.
    try:
        (limit,) = limits.parse_many(value)
    except ValueError:
        raise ValueError("is not a single rate limit like '10/minute'") from None
    if not 1 <= limit.amount <= MAX_CALLS_PER_WINDOW:
        raise ValueError(f"must allow from 1 to {MAX_CALLS_PER_WINDOW:,} calls")
    if limit.get_expiry() > MINUTES_PER_YEAR * 60:
        raise ValueError("must have a window of at most a year")
    return value


RateLimitSetting = Annotated[str, AfterValidator(one_rate_limit)]


class Settings(BaseSettings):
    """Configuration from environment variables (the field names in upper case), or from a `.env`
    file in the working directory for those not set. An empty value counts as unset."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_ignore_empty=True,
        extra="ignore",  # the `.env` that compose reads also holds REDIS_PASSWORD
        frozen=True,
        hide_input_in_errors=True,  # a rejected SECRET_KEY must not end up in the startup log
    )

    redis_uri: str = ""
    secret_key: SecretStr | None = None
    access_token_expire_minutes: int = Field(default=15, ge=1, le=MINUTES_PER_YEAR)
    refresh_token_expire_minutes: int = Field(default=7 * 24 * 60, ge=1, le=MINUTES_PER_YEAR)
    cleanup_interval_seconds: float = Field(default=60, ge=0.01, le=24 * 3600, allow_inf_nan=False)
    rate_limit_free: RateLimitSetting = "2/minute"
    rate_limit_premium: RateLimitSetting = "10/minute"
    rate_limit_admin: RateLimitSetting = "9999/minute"
    rate_limit_anonymous: RateLimitSetting = "20/minute"
    rate_limit_login: RateLimitSetting = "5/minute"

    @field_validator("redis_uri")
    @classmethod
    def _usable_redis_uri(cls, value: str) -> str:
        if not value:
            return value
        if not value.startswith(REDIS_SCHEMES):
            raise ValueError(f"must start with one of {', '.join(REDIS_SCHEMES)}")
        if not value.isascii():
            raise ValueError(BAD_REDIS_URI)
        # `from None` below: redis-py's messages may hold the password.
        if value.startswith((SENTINEL_SCHEME, CLUSTER_SCHEME)):
            try:
                nodes = RedisNodes.from_uri(value)
            except ValueError:
                raise ValueError(BAD_REDIS_URI) from None
            if value.startswith(SENTINEL_SCHEME) and not nodes.service:
                raise ValueError("needs the service after the hosts, like redis+sentinel://h:26379/mymaster")
            if value.startswith(CLUSTER_SCHEME) and nodes.service:
                raise ValueError("takes hosts only, like redis+cluster://h1:7000,h2:7001")
            return value
        database = urllib.parse.urlsplit(value).path.strip("/") if not value.startswith("unix:") else ""
        if database and not database.isdigit():
            raise ValueError(BAD_REDIS_URI)
        try:
            # A connection object (not connected) checks what redis-py reads: host, port, db, options.
            redis.asyncio.ConnectionPool.from_url(value).make_connection()
        except (ValueError, TypeError, RedisError):
            raise ValueError(BAD_REDIS_URI) from None
        return value

    @field_validator("secret_key")
    @classmethod
    def _strong_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        if not secret.isprintable() or not secret.isascii() or secret != secret.strip():
            raise ValueError(
                f"must be printable ASCII without spaces at either end; generate one: {GENERATE_SECRET}"
            )
        if any(word in secret.lower() for word in PLACEHOLDER_WORDS):
            raise ValueError(f"is a placeholder; generate one: {GENERATE_SECRET}")
        if len(secret) < 32:
            raise ValueError("must be at least 32 bytes for HS256")
        # A generated key of 32 characters or more uses far more distinct characters than this.
        if len(set(secret)) < MIN_DISTINCT_SECRET_CHARS:
            raise ValueError(f"repeats too few characters to be random; generate one: {GENERATE_SECRET}")
        return value

    @model_validator(mode="after")
    def _key_and_store_go_together(self) -> "Settings":
        # Workers that share a Redis must sign and verify with the same key. And a fixed key without
        # a shared store would outlive the store's revocations: after a restart, or on another
        # worker, a logged-out token would be accepted again.
        if bool(self.redis_uri) != (self.secret_key is not None):
            raise ValueError("SECRET_KEY and REDIS_URI must be set together, or neither (embedded store)")
        return self


REFUSAL = "Refusing to start; fix these settings (environment or .env):"
try:
    settings = Settings()
except ValidationError as exc:
    problems = ""
    for error in exc.errors():  # led by its variable; the pair check names both in its message
        variable = f"{error['loc'][0]}: ".upper() if error["loc"] else ""
        problems += f"\n  {variable}{error['msg'].removeprefix('Value error, ')}"
    raise SystemExit(REFUSAL + problems) from None
except (OSError, UnicodeDecodeError) as exc:  # an unreadable .env; its content stays unprinted
    raise SystemExit(f"{REFUSAL}\n  .env: cannot be read as UTF-8 text ({type(exc).__name__})") from None
# Without a configured key, tokens only need to survive this process, so a random one is enough.
SECRET_KEY = settings.secret_key.get_secret_value() if settings.secret_key else secrets.token_urlsafe(64)
ACCESS_TOKEN_LIFETIME = settings.access_token_expire_minutes * 60
REFRESH_TOKEN_LIFETIME = settings.refresh_token_expire_minutes * 60
MAX_BODY_BYTES = 4096
MAX_TOKEN_CHARS = 2048  # ours are ~300; the cap keeps a token field well inside MAX_BODY_BYTES


# --- Users and plans ---


class Plan(str, Enum):
    FREE = "free"
    PREMIUM = "premium"
    ADMIN = "admin"


@dataclass(frozen=True)
class User:
    username: str
    full_name: str
    plan: Plan
    password_hash: bytes


# bcrypt hashes at cost 12, computed once and pasted here, so importing this file hashes nothing.
USERS: dict[str, User] = {
    "john_doe": User(
        "john_doe", "John Doe", Plan.PREMIUM, b"$2b$12$KCpS.jxMDzLAh2t6TCNQ2.cwKOk.SlyZnXpOH80ftge3Sfj0swCt."
    ),
    "jane_doe": User(
        "jane_doe", "Jane Doe", Plan.FREE, b"$2b$12$6i8AbJmkssCJrQQUcp8mT.zu2j9D2vWeg9UhYL57ZPOtWye81ghdy"
    ),
    "admin_doe": User(
        "admin_doe", "Admin Doe", Plan.ADMIN, b"$2b$12$rsrXh5XLXdqi8qFeVsWgFOB1jtw8E0ocIBWF/d/RH8n636a2qUFje"
    ),
}
PLAN_LIMITS: dict[Plan, limits.RateLimitItem] = {
    Plan.FREE: limits.parse(settings.rate_limit_free),
    Plan.PREMIUM: limits.parse(settings.rate_limit_premium),
    Plan.ADMIN: limits.parse(settings.rate_limit_admin),
}


# --- Passwords ---

# Checked for unknown usernames, so that they cost as much time as a wrong password.
DUMMY_HASH = b"$2b$12$KNfxKL0WSFpGO2q0aKO2XeBPXNqZr2MUPYVGo/UN77UIHZDBVTjTa"
# bcrypt is CPU-bound and holds a core for ~0.2 s: run it on its own small pool, leaving a core
# for the event loop. Extra logins queue here instead of starving every other request.
BCRYPT_POOL = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) - 1), thread_name_prefix="bcrypt")


async def authenticate_user(username: str, password: str) -> User | None:
    """The user whose password this is, or None; takes the same time whether or not the user exists."""
    user = USERS.get(username)
    password_hash = user.password_hash if user else DUMMY_HASH
    loop = asyncio.get_running_loop()
    matches = await loop.run_in_executor(BCRYPT_POOL, bcrypt.checkpw, password.encode(), password_hash)
    return user if matches and user else None


# --- Tokens ---

ALGORITHM = "HS256"
TokenType = Literal["access", "refresh"]


# Redis keeps scores as doubles, exact up to 2**53: no time of ours comes anywhere near it.
EpochSeconds = Annotated[int, Field(gt=0, lt=2**53)]
NonEmpty = Annotated[str, Field(min_length=1)]


class TokenClaims(BaseModel):
    """What a token of ours says. `sid` is shared by every token of one login (the session)."""

    # strict: we write integer times and string ids, so "exp": "1700000000" is not one of ours.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    sub: NonEmpty
    iat: EpochSeconds
    exp: EpochSeconds
    jti: NonEmpty
    sid: NonEmpty
    type: TokenType


def token_lifetime(token_type: TokenType) -> int:
    return ACCESS_TOKEN_LIFETIME if token_type == "access" else REFRESH_TOKEN_LIFETIME


def create_token(
    username: str, token_type: TokenType, session_id: str, now: float
) -> tuple[str, TokenClaims]:
    claims = TokenClaims(
        sub=username,
        iat=int(now),
        exp=int(now) + token_lifetime(token_type),
        jti=secrets.token_urlsafe(16),
        sid=session_id,
        type=token_type,
    )
    return jwt.encode(claims.model_dump(), SECRET_KEY, algorithm=ALGORITHM), claims


# Worth it: /users/me runs at 0.44 of /health's rate with this cache, 0.35 without. A client
# sends the same token on every request: its signature is checked once per token *and key* (a new
# key never reuses an old verdict), its expiry and revocation on every request.
@functools.lru_cache(maxsize=4096)
def verified_claims(token: str, key: str) -> TokenClaims:
    """The claims of a token that `key` signed, if they are ones this app writes."""
    payload = jwt.decode(
        token,
        key,
        algorithms=[ALGORITHM],  # pinned: never let the token choose its own algorithm
        options={"verify_exp": False},  # decode_token() checks it on every use, not once
    )
    try:
        claims = TokenClaims.model_validate(payload)
    except ValidationError as exc:
        raise jwt.InvalidTokenError("unexpected claims") from exc
    # One minted before its lifetime setting was lowered could outlive its session's revocation
    # entry, which lasts as long as the tokens this app issues now.
    if claims.exp - claims.iat > token_lifetime(claims.type):
        raise jwt.InvalidTokenError("lives longer than this app's tokens")
    return claims


def decode_token(token: str, *, verify_exp: bool = True) -> TokenClaims:
    """The claims of a token this app signed; raises jwt.InvalidTokenError for anything else."""
    # Ours are short ASCII: refuse anything else before it costs a decode (or a cache lookup, which
    # hashes the whole string). A header of a megabyte would otherwise take ~50 ms of the loop.
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise jwt.InvalidTokenError("not a token of ours")
    claims = verified_claims(token, SECRET_KEY)
    # Expiry changes with the clock, so it is checked on every use (as PyJWT does: exp <= now).
    if verify_exp and claims.exp <= time.time():
        raise jwt.ExpiredSignatureError("Signature has expired")
    return claims


def bearer_error(detail: str, *, invalid_token: bool = True) -> HTTPException:
    """A 401 that tells the client, per RFC 6750, whether the token it sent was the problem."""
    challenge = 'Bearer error="invalid_token"' if invalid_token else "Bearer"
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": challenge})


def verify_token(token: str, expected_type: TokenType) -> TokenClaims:
    """Decode a token presented as a credential, or raise the 401 that says what is wrong with it."""
    try:
        claims = decode_token(token)
    except jwt.ExpiredSignatureError:
        raise bearer_error("Token has expired") from None
    except jwt.InvalidTokenError:
        raise bearer_error("Invalid token") from None
    if claims.type != expected_type:
        raise bearer_error(f"Wrong token type: expected {expected_type}, got {claims.type}")
    return claims


# --- Revocation store ---

# Two structures, sized by what is revoked or alive, never by traffic:
# - "revoked:<n>", sorted sets of revoked access tokens' jti and revoked sessions' sid, each scored
#   with the epoch second after which nothing it blocks could be used: cleanup removes entries by
#   score, so it can never un-revoke a live token.
# - "refresh:<sid>", per live session: the jti of its one valid refresh token, expiring with it.
#   Refreshing overwrites it (rotation), so an older refresh token presented again is detected.
REVOKED_KEY_PREFIX = "revoked:"
# Spread over several sets, so that a cluster does not send every check to one node; a session's
# entries and its access tokens' share a set, chosen by its id, so one ZMSCORE answers a check.
# Changing the number strands existing entries in sets where they are no longer looked for.
REVOKED_SETS = 16
REFRESH_KEY_PREFIX = "refresh:"
REDIS_OPTIONS: dict[str, Any] = {
    "socket_timeout": 2,
    "socket_connect_timeout": 2,
    # Fail fast while Redis is down: one immediate retry replaces a connection that went stale
    # (after a Redis restart or a failover, say); past that the request gets a 503, not a wait.
    "retry": redis.asyncio.retry.Retry(NoBackoff(), 1),
}
# A redis-py cluster error (slots not covered, a node down) is not a RedisError.
STORE_ERRORS = (RedisError, RedisClusterException)
# A store with replicas acknowledges a revocation only once a replica has it (see durably()).
REPLICAS_TO_CONFIRM = 1 if settings.redis_uri.startswith(SENTINEL_SCHEME) else 0
REPLICA_WAIT_MS = 500


def redis_client(uri: str) -> redis.asyncio.Redis | redis.asyncio.RedisCluster:
    """The store's client for REDIS_URI. It connects on first use, not here."""
    if uri.startswith(SENTINEL_SCHEME):
        nodes = RedisNodes.from_uri(uri)
        sentinels = redis.asyncio.Sentinel(nodes.hosts, sentinel_kwargs={"socket_timeout": 2})
        return sentinels.master_for(nodes.service, password=nodes.password, **REDIS_OPTIONS)
    if uri.startswith(CLUSTER_SCHEME):
        nodes = RedisNodes.from_uri(uri)
        startup_nodes = [ClusterNode(host, port) for host, port in nodes.hosts]
        return redis.asyncio.RedisCluster(
            startup_nodes=startup_nodes, password=nodes.password, **REDIS_OPTIONS
        )
    return redis.asyncio.from_url(uri, **REDIS_OPTIONS)


if settings.redis_uri:
    store = redis_client(settings.redis_uri)
else:
    # fakeredis: a Redis inside this process, behind the same client API (the tests can stop it).
    embedded_server = fakeredis.FakeServer()
    store = fakeredis.FakeAsyncRedis(server=embedded_server)


def refresh_key(session_id: str) -> str:
    return REFRESH_KEY_PREFIX + session_id


async def start_session(refresh: TokenClaims) -> None:
    await store.set(refresh_key(refresh.sid), refresh.jti, exat=refresh.exp)


# Compare-and-set in one step, so two requests can never both rotate the same refresh token.
ROTATE_REFRESH_TOKEN = store.register_script(
    """
    if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
    redis.call('SET', KEYS[1], ARGV[2], 'EXAT', ARGV[3])
    return 1
    """
)


async def rotate_refresh_token(presented: TokenClaims, successor: TokenClaims) -> bool:
    """Make `successor` its session's valid refresh token, if `presented` still is."""
    key = refresh_key(presented.sid)
    return bool(await ROTATE_REFRESH_TOKEN(keys=[key], args=[presented.jti, successor.jti, successor.exp]))


def revoked_key(session_id: str) -> str:
    return f"{REVOKED_KEY_PREFIX}{zlib.crc32(session_id.encode()) % REVOKED_SETS}"


class NotReplicated(RedisError):
    """No replica confirmed a revocation in time: a failover now could undo it."""


async def durably(pipe: Any) -> None:
    """Run a pipeline of revocation writes. Redis replicates asynchronously, so with replicas
    (Sentinel) wait until one has them: a revocation acknowledged only by a primary that then
    died would be lost with it. Fails closed: NotReplicated is a 503, and the client retries."""
    if REPLICAS_TO_CONFIRM:
        pipe.execute_command("WAIT", REPLICAS_TO_CONFIRM, REPLICA_WAIT_MS)  # on the writes' connection
    results = await pipe.execute()
    if REPLICAS_TO_CONFIRM and results[-1] < REPLICAS_TO_CONFIRM:
        raise NotReplicated(f"no replica confirmed a revocation within {REPLICA_WAIT_MS} ms")


async def revoke_access_token(claims: TokenClaims) -> None:
    async with store.pipeline(transaction=False) as pipe:
        pipe.zadd(revoked_key(claims.sid), {claims.jti: claims.exp})  # the same score every time
        await durably(pipe)


async def revoke_session(session_id: str, now: float) -> None:
    """Revoke every token of a login: its access tokens by sid, its refresh token by deletion
    (which also stops new ones being minted). The access tokens were all minted by `now`."""
    async with store.pipeline(transaction=False) as pipe:
        # GT: revoking again (from a worker whose clock is behind, say) never shortens the entry.
        pipe.zadd(revoked_key(session_id), {session_id: int(now) + ACCESS_TOKEN_LIFETIME}, gt=True)
        pipe.delete(refresh_key(session_id))
        await durably(pipe)


async def is_revoked(claims: TokenClaims) -> bool:
    if claims.type == "refresh":
        return await store.get(refresh_key(claims.sid)) != claims.jti.encode()
    token_until, session_until = await store.zmscore(revoked_key(claims.sid), [claims.jti, claims.sid])
    return token_until is not None or session_until is not None


async def remove_expired_revocations(now: float) -> int:
    """Drop entries whose tokens have all expired, from every set; returns how many were removed."""
    async with store.pipeline(transaction=False) as pipe:
        for n in range(REVOKED_SETS):
            pipe.zremrangebyscore(f"{REVOKED_KEY_PREFIX}{n}", "-inf", f"({int(now)}")
        return sum(await pipe.execute())


# --- Rate limits ---

# SlowAPI is synchronous: it picks keys, counts and raises RateLimitExceeded in plain calls, and
# waits for Redis through a sync `limits` storage. Rather than a thread (a GIL hand-off per call),
# count_call() runs it in a greenlet on the event loop's thread, as SQLAlchemy's asyncio support
# does: the storage hands each Redis call (`limits`' own scripts, on the store's client) back to
# greenlet_spawn() as a coroutine, which awaits it on the loop and resumes SlowAPI with the answer.
# One thread, no blocking call, SlowAPI unchanged; while a count waits, the loop serves others.
T = TypeVar("T")
Window = tuple[float, int]  # a moving window's oldest hit (epoch seconds) and its number of hits
# The windows that this request's counts read, by key: count_call() gives each request its own.
windows_read: ContextVar[dict[str, Window]] = ContextVar("windows_read")


class _Bridged(greenlet):
    """A greenlet that greenlet_spawn() started; its parent is the event loop's task."""


async def greenlet_spawn(fn: Callable[[Request], None], request: Request) -> None:
    """Run the sync `fn` here, awaiting on its behalf whatever it passes to await_only()."""
    child = _Bridged(fn, getcurrent())
    child.gr_context = getcurrent().gr_context  # the task's contextvars, as plain sync code sees them
    awaited = child.switch(request)  # runs fn up to its first await_only(), or to its end
    while not child.dead:
        try:
            value = await awaited
        except BaseException as exc:  # a Redis error, or this task's cancellation: fn gets it
            awaited = child.throw(exc)  # where it waits, and it ends the greenlet unless fn catches it
        else:
            awaited = child.switch(value)


def await_only(awaitable: Awaitable[T]) -> T:
    """From sync code run by greenlet_spawn(): pause it until the loop has awaited `awaitable`."""
    current = getcurrent()
    if not isinstance(current, _Bridged):
        raise RuntimeError("await_only() works only inside greenlet_spawn()")
    return current.parent.switch(awaitable)  # type: ignore[no-any-return]


# `limits`' own moving-window scripts, run on the store's one client, whatever its topology.
COUNT_SCRIPT = store.register_script(limits.storage.RedisStorage.SCRIPT_ACQUIRE_MOVING_WINDOW)
WINDOW_SCRIPT = store.register_script(limits.storage.RedisStorage.SCRIPT_MOVING_WINDOW)
LIMITS_KEY_PREFIX = "LIMITS:"  # what `limits`' own Redis storage puts before SlowAPI's keys


def as_window(reply: Any, window_start: float) -> Window:
    """WINDOW_SCRIPT's reply: [oldest hit, hits], or nothing for an empty window, which reads as
    if its oldest hit had just left it: it has room now."""
    return (float(reply[0]), int(reply[1])) if reply else (window_start, 0)


async def read_window(key: str, limit: int, expiry: int) -> Window:
    """A moving window's oldest hit and number of hits, without consuming from it."""
    window_start = time.time() - expiry
    reply = await WINDOW_SCRIPT(keys=[LIMITS_KEY_PREFIX + key], args=[window_start, limit])
    return as_window(reply, window_start)


async def count_and_read(key: str, limit: int, expiry: int, amount: int) -> tuple[bool, Window]:
    """Count a hit if the window has room, then read the window: one round trip for both."""
    redis_key, now = LIMITS_KEY_PREFIX + key, time.time()
    # execute_command(): redis-py's cluster pipeline refuses pipe.evalsha(), though this one-key
    # EVALSHA is routed like any command.
    async with store.pipeline(transaction=False) as pipe:
        pipe.execute_command("EVALSHA", COUNT_SCRIPT.sha, 1, redis_key, now, limit, expiry, amount)
        pipe.execute_command("EVALSHA", WINDOW_SCRIPT.sha, 1, redis_key, now - expiry, limit)
        acquired, window = await pipe.execute(raise_on_error=False)
    # A Redis that restarted has lost the scripts; calling a script object loads it again. If the
    # count did run, only the read is redone, so nothing counts twice.
    if isinstance(acquired, NoScriptError):
        acquired = await COUNT_SCRIPT(keys=[redis_key], args=[now, limit, expiry, amount])
        return bool(acquired), await read_window(key, limit, expiry)
    if isinstance(window, NoScriptError):
        return bool(acquired), await read_window(key, limit, expiry)
    for result in (acquired, window):
        if isinstance(result, Exception):
            raise result
    return bool(acquired), as_window(window, now - expiry)


class AsyncBridgeStorage(limits.storage.Storage, limits.storage.MovingWindowSupport):
    """The sync `limits` storage that SlowAPI counts with; its I/O is awaited on the loop. `limits`
    registers it by its URI scheme, so SlowAPI builds it from Limiter(storage_uri="async-bridge://")."""

    STORAGE_SCHEME = ["async-bridge"]  # noqa: RUF012 (a list, as limits declares it)
    base_exceptions = STORE_ERRORS

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        # The window's state after the count comes back in the same round trip, for the headers.
        acquired, windows_read.get()[key] = await_only(count_and_read(key, limit, expiry, amount))
        return acquired

    def _not_called(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("SlowAPI's moving window calls only acquire_entry()")

    # Abstract in `limits`' storages, but never called here: they serve other strategies.
    get_moving_window = check = incr = get = get_expiry = reset = clear = _not_called


def client_address(request: Request) -> str:
    """Whom the per-IP limits count: the client's IP address, an IPv6 /64 (what one host is usually
    given) as one client, and anything else (a bad X-Forwarded-For) as one client, "unknown"."""
    try:
        address = ipaddress.ip_address(request.client.host if request.client else "")
    except ValueError:
        return "unknown"
    if address.version == 6:
        return str(ipaddress.ip_network((address, 64), strict=False))
    return str(address)


# headers_enabled=False: SlowAPI's own headers carry a fractional X-RateLimit-Reset and a
# Retry-After that can be a second early; rate_limit_headers() below writes exact ones.
limiter = Limiter(
    key_func=client_address, strategy="moving-window", storage_uri="async-bridge://", headers_enabled=False
)
# SlowAPI also reads RATELIMIT_* settings of its own, from the environment and .env (with its own
# parser), over the arguments above: RATELIMIT_ENABLED=false would switch every limit off. This
# app's limits are set in code and by RATE_LIMIT_*, so it refuses to start while SlowAPI sees any.
seen_by_slowapi = {*limiter.app_config.environ, *limiter.app_config.file_values}
if its_own := sorted(name for name in seen_by_slowapi if name.startswith("RATELIMIT_")):
    names = ascii(", ".join(its_own))[1:-1]  # escaped: a name can hold control characters
    raise SystemExit(f"{REFUSAL}\n  {names}: SlowAPI would read these; remove them (see RATE_LIMIT_*)")


@dataclass(frozen=True)
class CountedWindow:
    """One limit's moving window: the calls of one client at one path, as SlowAPI counts them."""

    policy: str  # its name in the IETF RateLimit fields: a plan, "ip" or "ip+username"
    limit: limits.RateLimitItem
    key: str  # what the limit's SlowAPI key function returns for this client
    path: str  # SlowAPI counts each path apart


@dataclass(frozen=True)
class WindowState:
    policy: str
    limit: int
    window_seconds: int
    remaining: int
    reset: float  # epoch seconds until which the window's oldest hit still counts; now if empty


# A hit counts while its age is at most the window, so at exactly `reset` the window is still
# full, and room comes in the whole second after it: floor(reset) + 1, not ceil(reset). The window
# script returns the oldest hit's time through Lua's tostring(), with 14 significant digits: up to
# 0.05 ms off at today's epoch, either way. Adding TIMESTAMP_TOLERANCE before flooring covers that,
# so these answers are never early, at worst one second late.
TIMESTAMP_TOLERANCE = 0.001


def first_second_with_room(reset: float) -> int:
    """The first whole epoch second at which the window has room again (X-RateLimit-Reset)."""
    return math.floor(reset + TIMESTAMP_TOLERANCE) + 1


def seconds_until_room(reset: float, now: float) -> int:
    """Whole seconds from `now` until the window has room again (Retry-After, RateLimit's t)."""
    return math.floor(reset - now + TIMESTAMP_TOLERANCE) + 1


async def window_state(window: CountedWindow, read: dict[str, Window] | None = None) -> WindowState:
    """A moving window's state: as a count just read it, or read now without consuming from it."""
    # The key SlowAPI counted under: the limit's key_for(), from its key function's value and path.
    key, seconds = window.limit.key_for(window.key, window.path), window.limit.get_expiry()
    oldest_hit, hits = (read or {}).get(key) or await read_window(key, window.limit.amount, seconds)
    return WindowState(
        policy=window.policy,
        limit=window.limit.amount,
        window_seconds=seconds,
        remaining=max(0, window.limit.amount - hits),
        reset=oldest_hit + seconds,
    )


async def rate_limit_headers(
    windows: tuple[CountedWindow, ...], *, retry_after: bool = False
) -> dict[str, str]:
    """X-RateLimit-* and the IETF RateLimit field (draft-ietf-httpapi-ratelimit-headers) for the
    window nearest exhaustion, RateLimit-Policy for all of them, and Retry-After for a 429."""
    read = windows_read.get()
    states = [await window_state(window, read) for window in windows]
    nearest = min(states, key=lambda state: (state.remaining, -state.reset))
    seconds_left = seconds_until_room(nearest.reset, time.time())
    headers = {
        "X-RateLimit-Limit": str(nearest.limit),
        "X-RateLimit-Remaining": str(nearest.remaining),
        "X-RateLimit-Reset": str(first_second_with_room(nearest.reset)),
        "RateLimit-Policy": ", ".join(f'"{s.policy}";q={s.limit};w={s.window_seconds}' for s in states),
        "RateLimit": f'"{nearest.policy}";r={nearest.remaining};t={seconds_left}',
    }
    if retry_after:
        headers["Retry-After"] = str(max(1, seconds_left))
    return headers


async def count_call(
    count: Callable[[Request], None], request: Request, response: Response, *windows: CountedWindow
) -> None:
    """Count a call with a SlowAPI-decorated counter whose limits are `windows` (RateLimitExceeded
    if over one), and put their headers on the response and on request.state, for error responses."""
    # SlowAPI counts once per request (it marks request.state), so a request counts in one call.
    request.state.counted_windows = windows  # for the 429's headers
    windows_read.set({})
    await greenlet_spawn(count, request)
    request.state.rate_limit_headers = await rate_limit_headers(windows)
    response.headers.update(request.state.rate_limit_headers)


def user_rate_limit_key(request: Request) -> str:
    return request.state.user.username


# Per endpoint: SlowAPI stores a count under the key function's value *and the request's path*
# (key_for(key, request["path"])), so one decorated counter counts each endpoint apart. One
# counter per plan, picked by the user's plan on every request: a plan change applies at once.
@limiter.limit(settings.rate_limit_free, key_func=user_rate_limit_key)
def count_free_plan_call(request: Request) -> None:
    """SlowAPI counts a free-plan call here, per user and endpoint."""


@limiter.limit(settings.rate_limit_premium, key_func=user_rate_limit_key)
def count_premium_plan_call(request: Request) -> None:
    """SlowAPI counts a premium-plan call here, per user and endpoint."""


@limiter.limit(settings.rate_limit_admin, key_func=user_rate_limit_key)
def count_admin_plan_call(request: Request) -> None:
    """SlowAPI counts an admin-plan call here, per user and endpoint."""


PLAN_COUNTERS: dict[Plan, Callable[[Request], None]] = {
    Plan.FREE: count_free_plan_call,
    Plan.PREMIUM: count_premium_plan_call,
    Plan.ADMIN: count_admin_plan_call,
}


@limiter.limit(settings.rate_limit_anonymous)
def count_anonymous_call(request: Request) -> None:
    """SlowAPI counts a call to an endpoint that needs no login here, per client IP."""


def login_rate_limit_key(request: Request) -> str:
    # No IP address contains "|", so no two (IP, username) pairs share a key: with ":", the IPv6
    # address 2001:db8::1 and username 5:jane would share one with 2001:db8::1:5 and jane.
    return f"{client_address(request)}|{request.state.login_username}"


# SlowAPI checks stacked limits from the innermost decorator out, and stops at the first one
# exceeded: the per-IP limit goes first, so a client it refuses creates no key per username tried.
@limiter.limit(settings.rate_limit_login, key_func=login_rate_limit_key)
@limiter.limit(settings.rate_limit_anonymous)
def count_login(request: Request) -> None:
    """SlowAPI counts a login attempt here, per client IP and per IP + username."""


ANONYMOUS_LIMIT = limits.parse(settings.rate_limit_anonymous)
LOGIN_LIMIT = limits.parse(settings.rate_limit_login)


# --- Request models and dependencies ---


class PasswordGrant(BaseModel):
    """RFC 6749 §4.3: log in with a username and password."""

    grant_type: Literal["password"] = "password"
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=72, json_schema_extra={"format": "password"})

    @field_validator("password")
    @classmethod
    def _fits_bcrypt(cls, value: str) -> str:
        # bcrypt reads at most 72 bytes; refuse longer passwords rather than silently cut them.
        if len(value.encode()) > 72:
            raise ValueError("must be at most 72 bytes in UTF-8")
        return value


# No max_length: decode_token() refuses anything longer than our tokens, as it does in a header.
TokenString = Annotated[str, Field(min_length=1)]


class RefreshGrant(BaseModel):
    """RFC 6749 §6: trade a refresh token for a new pair."""

    grant_type: Literal["refresh_token"] = "refresh_token"
    refresh_token: TokenString


class TokenRequest(BaseModel):
    """RFC 7009 §2.1 (revocation) and RFC 7662 §2.1 (introspection)."""

    token: TokenString
    token_type_hint: str | None = Field(
        default=None, max_length=64, description="Ignored: every token of ours says what type it is"
    )


FORM_TYPE = "application/x-www-form-urlencoded"
REQUEST_FIELDS = {*PasswordGrant.model_fields, *RefreshGrant.model_fields, *TokenRequest.model_fields}


async def request_fields(request: Request) -> Any:
    """A JSON body (what curl sends here) or a form (what OAuth2 clients send), as Python data."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type == "application/json":
            return await request.json()
        if content_type == FORM_TYPE:
            form = await request.form()
            # RFC 6749 §3.2: no parameter twice. Which copy counts would be anyone's guess (a proxy
            # might read the first, this app the last). Fields this app does not read are ignored.
            if any(len(form.getlist(name)) > 1 for name in REQUEST_FIELDS):
                raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="A form field appears more than once")
            return dict(form)
    except (ValueError, RecursionError):  # what json raises for a malformed or too deeply nested body
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="Request body is malformed") from None
    detail = f"Send application/json or {FORM_TYPE}"
    raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, detail=detail)


ModelT = TypeVar("ModelT", bound=BaseModel)


def parsed(model: type[ModelT], fields: Any) -> ModelT:
    """`fields` as a `model`, or the same 422 that FastAPI gives a body it parses itself."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


class OAuth2Error(HTTPException):
    """An error whose RFC 6749 code is not the one its status implies (see error_response())."""

    def __init__(self, status_code: int, error: str, detail: str) -> None:
        super().__init__(status_code, detail=detail)
        self.error = error


def ip_window(request: Request) -> CountedWindow:
    return CountedWindow("ip", ANONYMOUS_LIMIT, client_address(request), request["path"])


async def ip_rate_limit(request: Request, response: Response) -> None:
    await count_call(count_anonymous_call, request, response, ip_window(request))


async def refresh_grant(request: Request) -> RefreshGrant:
    return parsed(RefreshGrant, await request_fields(request))


async def token_request(request: Request) -> TokenRequest:
    return parsed(TokenRequest, await request_fields(request))


PresentedToken = Annotated[TokenRequest, Depends(token_request)]


async def token_grant(request: Request, response: Response) -> PasswordGrant | RefreshGrant:
    """The grant a /token request carries (password when it names none), counted by its limits."""
    fields = await request_fields(request)
    grant_type = fields.get("grant_type", "password") if isinstance(fields, dict) else "password"
    if grant_type == "refresh_token":
        await ip_rate_limit(request, response)  # as on /refresh
        return parsed(RefreshGrant, fields)
    if grant_type != "password":
        detail = "grant_type must be password or refresh_token"
        raise OAuth2Error(status.HTTP_400_BAD_REQUEST, "unsupported_grant_type", detail)
    grant = parsed(PasswordGrant, fields)
    request.state.login_username = grant.username  # the login limit's key reads it
    ip_and_username = CountedWindow(
        "ip+username", LOGIN_LIMIT, login_rate_limit_key(request), request["path"]
    )
    await count_call(count_login, request, response, ip_window(request), ip_and_username)
    return grant


TokenGrant = Annotated[PasswordGrant | RefreshGrant, Depends(token_grant)]

# With no Authorization header, a 401 "Not authenticated" with WWW-Authenticate: Bearer.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="token")


async def access_claims(token: Annotated[str, Depends(oauth2_scheme)]) -> TokenClaims:
    """The claims of a valid, unrevoked access token, or the 401 that says what is wrong."""
    claims = verify_token(token, "access")
    if await is_revoked(claims):
        logger.warning("revoked token used: sub=%s jti=%s", claims.sub, claims.jti)
        raise bearer_error("Token has been revoked")
    return claims


AccessClaims = Annotated[TokenClaims, Depends(access_claims)]


async def current_user(claims: AccessClaims) -> User:
    user = USERS.get(claims.sub)
    if user is None:
        raise bearer_error("Unknown user")
    return user


CurrentUser = Annotated[User, Depends(current_user)]


async def plan_limited_user(request: Request, response: Response, user: CurrentUser) -> User:
    request.state.user = user  # the plan limit's key function reads it from here
    window = CountedWindow(user.plan.value, PLAN_LIMITS[user.plan], user.username, request["path"])
    await count_call(PLAN_COUNTERS[user.plan], request, response, window)
    return user


PlanLimitedUser = Annotated[User, Depends(plan_limited_user)]


async def require_premium(user: CurrentUser) -> None:
    if user.plan is Plan.FREE:
        detail = f"This endpoint needs the premium or admin plan; yours is {user.plan.value}"
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=detail)


# --- App, lifespan and cleanup task ---


# Token responses must not be cached (RFC 6749 §5.1); Pragma for HTTP/1.0 caches.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
OAUTH2_PATHS = {"/token", "/refresh", "/revoke", "/introspect"}
# RFC 6749 §5.2's code for each error status of those endpoints; any other 4xx is invalid_request.
# (RFC 6749 answers a bad grant with 400; this app answers 401, as FastAPI's tutorial does, and
# clients go by `error`.)
OAUTH2_ERROR_CODES = {
    status.HTTP_401_UNAUTHORIZED: "invalid_grant",
    status.HTTP_429_TOO_MANY_REQUESTS: "temporarily_unavailable",
    status.HTTP_503_SERVICE_UNAVAILABLE: "temporarily_unavailable",
}


def error_response(
    request: Request,
    status_code: int,
    detail: Any,
    headers: Mapping[str, str] | None = None,
    *,
    error: str = "",
) -> JSONResponse:
    """Every error this app sends: JSON with `detail`, and the rate-limit headers of a counted call.
    From the OAuth2 endpoints also RFC 6749's `error` and `error_description`, which clients read."""
    body = {"detail": detail}
    headers = {**getattr(request.state, "rate_limit_headers", {}), **(headers or {})}
    # Behind a proxy, uvicorn --root-path puts the app's prefix in front of the path; not ours.
    if request["path"].removeprefix(request.scope.get("root_path", "")) in OAUTH2_PATHS:
        body["error"] = error or OAUTH2_ERROR_CODES.get(status_code, "invalid_request")
        body["error_description"] = detail if isinstance(detail, str) else "A field is missing or invalid"
        headers.update(NO_STORE)
    return JSONResponse(body, status_code=status_code, headers=headers)


class BodySizeLimit:
    """Refuses request bodies over max_bytes with a JSON 413, whether or not they declare a length
    (Starlette's own RequestBodyLimitMiddleware answers in plain text; every error here is JSON)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):  # bodies nobody reads
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            response = error_response(Request(scope), status.HTTP_413_CONTENT_TOO_LARGE, "Content Too Large")
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # Raised where a route reads its body, so the app's own handler (http_error())
                # answers it, as JSON, like every other error.
                raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail="Content Too Large")
            return message

        await self.app(scope, counting_receive, send)


async def cleanup_revocations_forever(interval: float, stopping: asyncio.Event) -> None:
    """Every `interval` seconds, drop the revocations whose tokens have all expired."""
    while not stopping.is_set():
        await asyncio.sleep(interval)
        try:
            removed = await remove_expired_revocations(time.time())
        except STORE_ERRORS as exc:
            # The store may be down for a while: try again next tick. (A cancellation inside a
            # redis-py command can surface here as a ConnectionError; `stopping` ends the loop.)
            logger.warning("revocation cleanup failed, retrying in %ss: %r", interval, exc)
            continue
        if removed:
            logger.info("revocation cleanup removed %d expired entries", removed)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if not settings.redis_uri:
        logger.warning("REDIS_URI is not set: using an embedded in-process store (one process only)")
    if settings.secret_key is None:
        logger.warning("SECRET_KEY is not set: using a random key; tokens die with this process")
    stopping = asyncio.Event()
    cleanup = asyncio.create_task(cleanup_revocations_forever(settings.cleanup_interval_seconds, stopping))
    app.state.cleanup_task = cleanup
    try:
        yield
    finally:
        stopping.set()
        cleanup.cancel()
        (outcome,) = await asyncio.gather(cleanup, return_exceptions=True)
        if isinstance(outcome, Exception):  # it crashed, rather than being cancelled here
            logger.error("the revocation cleanup task had stopped: %r", outcome)
        # Connections belong to this event loop; the next one (a new test client) opens its own.
        await store.aclose()
        # Behind Sentinel, the client also holds one connection to each sentinel it asks.
        sentinels = getattr(getattr(store, "connection_pool", None), "sentinel_manager", None)
        for sentinel in sentinels.sentinels if sentinels else []:
            await sentinel.aclose()


app = FastAPI(
    title="fastapi-users-slowapi",
    summary="JWT login, per-plan rate limits with SlowAPI, and token revocation on Redis.",
    lifespan=lifespan,
)
app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)


@app.exception_handler(RedisError)
@app.exception_handler(RedisClusterException)
async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # Fail closed: without the store, no token can be checked for revocation and no limit counted.
    logger.error("store unavailable on %s %r: %r", request.method, request.url.path, exc)
    detail = "Token store unavailable; try again shortly"
    return error_response(request, status.HTTP_503_SERVICE_UNAVAILABLE, detail)


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default 422 echoes each rejected value as "input": a token or a password, sent back
    # in the response (and unencodable, a 500, when it holds a lone surrogate like "\ud800").
    errors = [{key: error[key] for key in ("type", "loc", "msg")} for error in exc.errors()]
    return error_response(request, status.HTTP_422_UNPROCESSABLE_CONTENT, errors)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI's own handler, but through error_response(): a counted failure (a wrong password, a
    # stale refresh token) still tells the client what it has left.
    return error_response(request, exc.status_code, exc.detail, exc.headers, error=getattr(exc, "error", ""))


@app.exception_handler(RateLimitExceeded)
async def rate_limit_exceeded(request: Request, exc: RateLimitExceeded) -> JSONResponse:
    try:
        headers = await rate_limit_headers(request.state.counted_windows, retry_after=True)
    except STORE_ERRORS as store_error:
        return await store_unavailable(request, store_error)
    refused = exc.limit  # the limit that refused: on /token, the IP one or the IP + username one
    key = refused.key_func(request) if refused else "unknown"
    logger.warning("rate limit %s exceeded on %s by %r", exc.detail, request["path"], key)
    detail = f"Rate limit exceeded: {exc.detail}"
    return error_response(request, status.HTTP_429_TOO_MANY_REQUESTS, detail, headers)


# --- Endpoints: tokens ---


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Seconds until the access token expires")


class RevokedOut(BaseModel):
    revoked: bool = Field(description="false: not a token of this service, so nothing was done")


class TokenStatus(BaseModel):
    revoked: bool
    expired: bool


class Introspection(BaseModel):
    """RFC 7662 §2.2. Everything but `active` is left out for a token that is not active."""

    active: bool
    token_type: Literal["access_token", "refresh_token"] | None = None
    sub: str | None = None
    username: str | None = None
    exp: int | None = None
    iat: int | None = None
    jti: str | None = None


class ServerMetadata(BaseModel):
    """RFC 8414 §2, for what this server has: no authorization endpoint, no client secrets."""

    issuer: str
    token_endpoint: str
    revocation_endpoint: str
    introspection_endpoint: str
    grant_types_supported: list[str]
    response_types_supported: list[str]
    token_endpoint_auth_methods_supported: list[str]
    revocation_endpoint_auth_methods_supported: list[str]
    introspection_endpoint_auth_methods_supported: list[str]


class MessageOut(BaseModel):
    message: str


class ErrorOut(BaseModel):
    detail: str
    error: str | None = Field(default=None, description="RFC 6749 error code (OAuth2 endpoints only)")
    error_description: str | None = None


class FieldError(BaseModel):
    type: str
    loc: list[str | int]
    msg: str


class ValidationErrorOut(BaseModel):
    detail: list[FieldError]
    error: str | None = None
    error_description: str | None = None


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ValidationErrorOut if code == 422 else ErrorOut} for code in codes}


def request_body(*models: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body that request_fields() reads: the same fields as JSON or as a form."""
    schemas = [model.model_json_schema() for model in models]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    content = {media_type: {"schema": schema} for media_type in ("application/json", FORM_TYPE)}
    return {"requestBody": {"required": True, "content": content}}


def mint_token_pair(username: str, session_id: str) -> tuple[TokenPair, TokenClaims]:
    """A new access and refresh token for a session, and the refresh token's claims."""
    now = time.time()
    access_token, _ = create_token(username, "access", session_id, now)
    refresh_token, refresh_claims = create_token(username, "refresh", session_id, now)
    pair = TokenPair(access_token=access_token, refresh_token=refresh_token, expires_in=ACCESS_TOKEN_LIFETIME)
    return pair, refresh_claims


async def refresh_session(refresh_token: str) -> TokenPair:
    """Rotate a session's refresh token; one that is no longer the current one revokes the session."""
    claims = verify_token(refresh_token, "refresh")
    pair, successor = mint_token_pair(claims.sub, claims.sid)
    if not await rotate_refresh_token(claims, successor):
        await revoke_session(claims.sid, time.time())
        # Either reuse of a rotated token (theft, or a client bug) or a session already revoked.
        logger.warning("stale refresh token, session revoked: sub=%s sid=%s", claims.sub, claims.sid)
        raise bearer_error("Refresh token has been revoked")
    return pair


@app.post(
    "/token",
    summary="Log in, or refresh: the OAuth2 token endpoint",
    responses=error_responses(400, 401, 413, 415, 422, 429, 503),
    openapi_extra=request_body(PasswordGrant, RefreshGrant),
)
async def login(grant: TokenGrant, response: Response) -> TokenPair:
    """`grant_type=password` (the default in JSON) trades a username and password for a new pair;
    `grant_type=refresh_token` works as /refresh does. JSON or an OAuth2 form. A login is limited
    per client IP and per IP + username, a refresh per client IP."""
    response.headers.update(NO_STORE)
    if isinstance(grant, RefreshGrant):
        return await refresh_session(grant.refresh_token)
    user = await authenticate_user(grant.username, grant.password)
    if user is None:
        logger.warning("failed login for username %r", grant.username)
        raise bearer_error("Incorrect username or password", invalid_token=False)
    pair, refresh_claims = mint_token_pair(user.username, session_id=secrets.token_urlsafe(16))
    await start_session(refresh_claims)
    return pair


@app.post(
    "/refresh",
    summary="Trade a refresh token for a new token pair",
    responses=error_responses(400, 401, 413, 415, 422, 429, 503),
    dependencies=[Depends(ip_rate_limit)],
    openapi_extra=request_body(RefreshGrant),
)
async def refresh(grant: Annotated[RefreshGrant, Depends(refresh_grant)], response: Response) -> TokenPair:
    """JSON `{"refresh_token": ...}` or the RFC 6749 §6 form. The refresh token is used up;
    presenting it again revokes its whole session."""
    response.headers.update(NO_STORE)
    return await refresh_session(grant.refresh_token)


@app.post(
    "/logout", summary="Log out: revoke every token of this session", responses=error_responses(401, 503)
)
async def logout(claims: AccessClaims) -> MessageOut:
    """Revokes the access token used here and the refresh token of the same login. Never rate-limited."""
    await revoke_session(claims.sid, time.time())
    return MessageOut(message="Logged out")


@app.post(
    "/revoke",
    summary="Revoke a token you hold (RFC 7009)",
    responses=error_responses(400, 413, 415, 422, 429, 503),
    dependencies=[Depends(ip_rate_limit)],
    openapi_extra=request_body(TokenRequest),
)
async def revoke_token(body: PresentedToken) -> RevokedOut:
    """Holding a token is the authority to revoke it. A refresh token takes its whole session with
    it. Revoking an expired or already revoked token succeeds and changes nothing; a token this
    service did not sign gets `revoked: false` and no error (RFC 7009 §2.2)."""
    try:
        claims = decode_token(body.token, verify_exp=False)
    except jwt.InvalidTokenError:
        return RevokedOut(revoked=False)
    now = time.time()
    if claims.exp > now:
        if claims.type == "refresh":
            await revoke_session(claims.sid, now)
        else:
            await revoke_access_token(claims)
    return RevokedOut(revoked=True)


@app.post(
    "/introspect",
    summary="Is this token active, and whose is it? (RFC 7662)",
    responses=error_responses(400, 413, 415, 422, 429, 503),
    dependencies=[Depends(ip_rate_limit)],
    openapi_extra=request_body(TokenRequest),
    response_model_exclude_none=True,
)
async def introspect(body: PresentedToken, response: Response) -> Introspection:
    """`active: true` with the token's claims for a live, unrevoked token of this service, and
    exactly `{"active": false}` for anything else: expired, revoked, used up, foreign or garbage."""
    response.headers.update(NO_STORE)
    try:
        claims = decode_token(body.token)
    except jwt.InvalidTokenError:
        return Introspection(active=False)
    if claims.sub not in USERS or await is_revoked(claims):
        return Introspection(active=False)
    return Introspection(
        active=True,
        token_type="access_token" if claims.type == "access" else "refresh_token",
        sub=claims.sub,
        username=claims.sub,
        exp=claims.exp,
        iat=claims.iat,
        jti=claims.jti,
    )


@app.get(
    "/is_token_revoked",
    summary="Check whether a token has been revoked",
    responses=error_responses(401, 422, 429, 503),
    dependencies=[Depends(ip_rate_limit)],
)
async def is_token_revoked(
    token: Annotated[str, Query(min_length=1, max_length=MAX_TOKEN_CHARS)],
) -> TokenStatus:
    """For a token this service signed. Once a token has expired, the store forgets whether it was
    revoked (nothing it blocked can be used any more), so it reports `revoked: false, expired: true`."""
    try:
        claims = decode_token(token, verify_exp=False)
    except jwt.InvalidTokenError:
        raise bearer_error("Not a token issued by this service") from None
    if claims.exp <= time.time():
        return TokenStatus(revoked=False, expired=True)
    return TokenStatus(revoked=await is_revoked(claims), expired=False)


@app.get(
    "/.well-known/oauth-authorization-server", summary="Where OAuth2 clients find the endpoints (RFC 8414)"
)
async def server_metadata(request: Request) -> ServerMetadata:
    """Public clients only: no client secret is needed or checked."""
    no_client_auth = ["none"]
    return ServerMetadata(
        issuer=str(request.base_url).rstrip("/"),
        token_endpoint=str(request.url_for("login")),
        revocation_endpoint=str(request.url_for("revoke_token")),
        introspection_endpoint=str(request.url_for("introspect")),
        grant_types_supported=["password", "refresh_token"],
        response_types_supported=[],
        token_endpoint_auth_methods_supported=no_client_auth,
        revocation_endpoint_auth_methods_supported=no_client_auth,
        introspection_endpoint_auth_methods_supported=no_client_auth,
    )


# --- Endpoints: plan-limited ---


class UserOut(BaseModel):
    username: str
    full_name: str
    plan: Plan


class EndpointLimit(BaseModel):
    limit: int
    remaining: int
    reset: int


class RateLimitStatus(BaseModel):
    plan: Plan
    endpoints: dict[str, EndpointLimit]


@app.get(
    "/plan-limited-endpoint",
    summary="An endpoint limited by the caller's plan",
    responses=error_responses(401, 429, 503),
)
async def plan_limited(user: PlanLimitedUser) -> MessageOut:
    """Each user gets their plan's number of calls in any rolling window."""
    return MessageOut(message=f"Hello {user.username}, you are on the {user.plan.value} plan")


@app.get(
    "/premium-only-endpoint",
    summary="An endpoint for the premium and admin plans",
    responses=error_responses(401, 403, 429, 503),
    # Route dependencies run before the parameters' ones, so a free user's 403 costs no quota. Both
    # need CurrentUser: FastAPI resolves a dependency once per request, so the token is checked once.
    dependencies=[Depends(require_premium)],
)
async def premium_only(user: PlanLimitedUser) -> MessageOut:
    """Free users get a 403 that names their plan."""
    return MessageOut(message=f"Welcome to the premium area, {user.username}")


@app.get("/users/me", summary="The logged-in user", responses=error_responses(401, 429, 503))
async def read_me(user: PlanLimitedUser) -> UserOut:
    """Your username, full name and plan."""
    return UserOut(username=user.username, full_name=user.full_name, plan=user.plan)


def depends_on(dependant: Dependant, dependency: Callable[..., Any]) -> bool:
    return any(sub.call is dependency or depends_on(sub, dependency) for sub in dependant.dependencies)


@functools.cache
def plan_limited_paths(plan: Plan) -> tuple[str, ...]:
    """The endpoints that count a plan's calls, read from the routes, so that a new route that
    takes a PlanLimitedUser is listed by itself: all of them, less those it can only get a 403 from."""
    return tuple(
        route.path
        for route in app.routes
        if isinstance(route, APIRoute)
        and depends_on(route.dependant, plan_limited_user)
        and not (plan is Plan.FREE and depends_on(route.dependant, require_premium))
    )


@app.get(
    "/rate-limit-status",
    summary="Your plan and what is left of each limit",
    responses=error_responses(401, 503),
)
async def rate_limit_status(request: Request, user: CurrentUser) -> RateLimitStatus:
    """Reads the window of every endpoint your plan can call, without consuming from it. `reset`
    is the first epoch second with room; an unused window has room now, so it says the next one."""
    limit, paths = PLAN_LIMITS[user.plan], plan_limited_paths(user.plan)
    counted_at = request.scope.get("root_path", "")  # SlowAPI's paths include a proxy's prefix
    windows = [CountedWindow(user.plan.value, limit, user.username, counted_at + path) for path in paths]
    states = await asyncio.gather(*(window_state(window) for window in windows))
    endpoints = {
        path: EndpointLimit(
            limit=state.limit, remaining=state.remaining, reset=first_second_with_room(state.reset)
        )
        for path, state in zip(paths, states, strict=True)
    }
    return RateLimitStatus(plan=user.plan, endpoints=endpoints)


# --- Endpoints: health ---


class HealthOut(BaseModel):
    status: Literal["ok"]
    store: Literal["redis", "embedded"]


@app.get("/health", summary="Liveness and store reachability", responses=error_responses(503))
async def health() -> HealthOut:
    """200 when the store answers, 503 when it does not. Never rate-limited."""
    await store.ping()
    return HealthOut(status="ok", store="redis" if settings.redis_uri else "embedded")
