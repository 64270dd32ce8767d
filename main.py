"""JWT login, refresh-token rotation, revocation on Redis and per-plan SlowAPI limits, in one file.

First read (about an hour and a half after FastAPI's tutorial): Part 1, the numbered
sections, in story order: 1. log in, 2. access and refresh tokens, 3. rotation with reuse
detection, 4. logout and revocation, 5. the cleanup task, 6. per-plan limits with SlowAPI, then the
endpoints. Skip every block between `# ~~~ Skip on a first read` and `# ~~~ end` lines: its first
lines say all the story needs of it. Part 2, at the end, is machinery (standards, hardening).
Run it with `uvicorn main:app`: with REDIS_URI unset it keeps its state in an embedded fake Redis.
"""

import asyncio
import base64
import functools
import hmac
import inspect
import ipaddress
import json
import logging
import math
import os
import secrets
import time
import urllib.parse
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar

import bcrypt
import fakeredis
import greenback
import jwt
import limits
import limits.storage
import redis.asyncio
import redis.asyncio.retry
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import OAuth2PasswordBearer
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
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# A child of uvicorn's logger, so these lines share its handler, format and level. Lines that a
# client can cause at will go to client_log, which lets through one a second of each (Part 2).
logger = logging.getLogger("uvicorn.app")
client_log = logging.getLogger("uvicorn.app.client")


# ================================ Part 1: the story ================================

# --- Settings ---

# ~~~ Skip on a first read: what the settings refuse ~~~
# A SECRET_KEY that is short, a placeholder or not random; a REDIS_URI that redis-py cannot use; a
# rate limit that is not one limit like "10/minute". Messages name the variable, never its value.
PLACEHOLDER_WORDS = ("change", "secret", "example", "placeholder", "password")
# FastAPI's security tutorial's key, the one most likely to be pasted into a demo built on it.
PUBLISHED_KEYS = {"09d25e094faa6ca2556c818166b7a9563b93f7099f6f0f4caa6cf63b88e8d3e7"}
# Six characters in a row of one of these appear in a generated key about once in 200,000 keys.
KEYBOARD_RUNS = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "qwertyuiop", "asdfghjkl", "zxcvbnm")
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


def usable_redis_uri(value: str) -> str:
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


def strong_secret(value: SecretStr | None) -> SecretStr | None:
    if value is None:
        return None
    secret = value.get_secret_value()
    if not secret.isprintable() or not secret.isascii() or secret != secret.strip():
        raise ValueError(
            f"must be printable ASCII without spaces at either end; generate one: {GENERATE_SECRET}"
        )
    if any(word in secret.lower() for word in PLACEHOLDER_WORDS):
        raise ValueError(f"is a placeholder; generate one: {GENERATE_SECRET}")
    if secret in PUBLISHED_KEYS:
        raise ValueError(f"is published (FastAPI's tutorial); generate one: {GENERATE_SECRET}")
    if len(secret) < 32:
        raise ValueError("must be at least 32 bytes for HS256")
    # A generated key of 32 characters or more uses far more distinct characters than this.
    if len(set(secret)) < MIN_DISTINCT_SECRET_CHARS:
        raise ValueError(f"repeats too few characters to be random; generate one: {GENERATE_SECRET}")
    if any(run[i : i + 6] in secret.lower() for run in KEYBOARD_RUNS for i in range(len(run) - 5)):
        raise ValueError(f"runs along the keyboard or the alphabet; generate one: {GENERATE_SECRET}")
    try:  # PyJWT refuses a PEM or SSH key as an HMAC secret: at start-up, not at every login
        jwt.encode({}, secret, algorithm="HS256")
    except jwt.InvalidKeyError:
        raise ValueError(
            f"is a public or private key, not a shared secret; generate one: {GENERATE_SECRET}"
        ) from None
    return value


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


def browser_origins(value: str) -> str:
    """Comma-separated origins, each a scheme and host (and port) as a browser sends it, or "*"."""
    origins = [origin.strip() for origin in value.split(",") if origin.strip()]
    for origin in origins:
        parts = urllib.parse.urlsplit(origin)
        bare = parts.netloc and not (parts.path or parts.query or parts.fragment or "@" in parts.netloc)
        if origin != "*" and not (parts.scheme in ("http", "https") and bare):
            raise ValueError("must list origins like https://app.example.com, comma-separated, or *")
    return ",".join(origins)


RedisUri = Annotated[str, AfterValidator(usable_redis_uri)]
SecretKey = Annotated[SecretStr | None, AfterValidator(strong_secret)]
RateLimitSetting = Annotated[str, AfterValidator(one_rate_limit)]
BrowserOrigins = Annotated[str, AfterValidator(browser_origins)]
# ~~~ end of what the settings refuse ~~~


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

    redis_uri: RedisUri = ""
    secret_key: SecretKey = None
    access_token_expire_minutes: int = Field(default=15, ge=1, le=MINUTES_PER_YEAR)
    refresh_token_expire_minutes: int = Field(default=7 * 24 * 60, ge=1, le=MINUTES_PER_YEAR)
    # A retried refresh gets the same pair within this many seconds (section 3); 0 turns it off.
    # At most a minute, as Cognito's: the longer, the longer a replayed token goes unnoticed.
    refresh_grace_seconds: int = Field(default=10, ge=0, le=60)
    cleanup_interval_seconds: float = Field(default=60, ge=0.01, le=24 * 3600, allow_inf_nan=False)
    rate_limit_free: RateLimitSetting = "2/minute"
    rate_limit_premium: RateLimitSetting = "10/minute"
    rate_limit_admin: RateLimitSetting = "9999/minute"
    rate_limit_anonymous: RateLimitSetting = "20/minute"
    rate_limit_login: RateLimitSetting = "5/minute"
    # Failed logins on one username in a row, from any address, before each next attempt waits:
    # 1 s, then twice as long each time, up to the longest wait (which is also how long a quiet
    # username takes to forget its failures).
    login_backoff_after: int = Field(default=5, ge=1, le=1000)
    login_backoff_max_seconds: int = Field(default=15 * 60, ge=1, le=24 * 3600)
    # Browser apps on these origins may call the API (CORS, Part 2); empty: none may.
    cors_allow_origins: BrowserOrigins = ""

    @model_validator(mode="after")
    def _key_and_store_go_together(self) -> "Settings":
        # Workers that share a Redis must sign and verify with the same key. And a fixed key without
        # a shared store would outlive the store's revocations: after a restart, or on another
        # worker, a logged-out token would be accepted again.
        if bool(self.redis_uri) != (self.secret_key is not None):
            raise ValueError("SECRET_KEY and REDIS_URI must be set together, or neither (embedded store)")
        return self


# ~~~ Skip on a first read: `settings = Settings()`, or exit with one line per bad variable ~~~
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
# ~~~ end ~~~

# Without a configured key, tokens only need to survive this process, so a random one is enough.
SECRET_KEY = settings.secret_key.get_secret_value() if settings.secret_key else secrets.token_urlsafe(64)
ACCESS_TOKEN_LIFETIME = settings.access_token_expire_minutes * 60
REFRESH_TOKEN_LIFETIME = settings.refresh_token_expire_minutes * 60


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
# Each plan's limit, written once: SlowAPI asks plan_limit() (section 6) for it on every call.
PLAN_LIMITS: dict[Plan, str] = {
    Plan.FREE: settings.rate_limit_free,
    Plan.PREMIUM: settings.rate_limit_premium,
    Plan.ADMIN: settings.rate_limit_admin,
}


# --- 1. Log in: check a password without blocking the server ---

# Checked for unknown usernames, so that they cost as much time as a wrong password.
DUMMY_HASH = b"$2b$12$KNfxKL0WSFpGO2q0aKO2XeBPXNqZr2MUPYVGo/UN77UIHZDBVTjTa"
# bcrypt is CPU-bound and holds a core for ~0.2 s: on the event loop it would stall every other
# request. It runs on its own pool, one thread fewer than there are cores, leaving one for the loop.
BCRYPT_THREADS = max(1, (os.cpu_count() or 1) - 1)
BCRYPT_POOL = ThreadPoolExecutor(max_workers=BCRYPT_THREADS, thread_name_prefix="bcrypt")


# ~~~ Skip on a first read: login_slot(), a bound on the logins waiting for bcrypt ~~~
# The pool takes logins in turn, so a flood of them from many addresses (which no per-IP limit
# stops) would make every login wait behind it. Past MAX_WAITING_LOGINS, a login gets a 503 at once.
MAX_WAITING_LOGINS = 8 * BCRYPT_THREADS  # at ~0.2 s each, at most ~1.6 s of waiting
waiting_logins = 0


def refuse_if_too_many_logins_wait() -> None:
    if waiting_logins >= MAX_WAITING_LOGINS:
        detail = "Too many logins at once; try again shortly"
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=detail, headers={"Retry-After": "1"})


@contextmanager
def login_slot() -> Iterator[None]:
    global waiting_logins  # one event loop per process: no lock needed
    refuse_if_too_many_logins_wait()
    waiting_logins += 1
    try:
        yield
    finally:
        waiting_logins -= 1


# ~~~ end ~~~


async def authenticate_user(username: str, password: str) -> User | None:
    """The user whose password this is, or None; takes the same time whether or not the user exists."""
    user = USERS.get(username)
    password_hash = user.password_hash if user else DUMMY_HASH
    loop = asyncio.get_running_loop()
    with login_slot():  # or a 503, when too many logins already wait
        matches = await loop.run_in_executor(BCRYPT_POOL, bcrypt.checkpw, password.encode(), password_hash)
    return user if matches and user else None


# --- 2. Access and refresh tokens ---

# A login returns two signed tokens (JWTs). The access token is sent with every call and lives
# minutes; the refresh token is sent only to get a new pair (at /refresh), and lives days. Both
# carry `sid`, the id of the login (the session) they belong to: sections 3 and 4 act on it.
ALGORITHM = "HS256"
TokenType = Literal["access", "refresh"]
# Times are kept in Redis as sorted-set scores (section 4), doubles exact up to 2**53.
EpochSeconds = Annotated[int, Field(gt=0, lt=2**53)]
NonEmpty = Annotated[str, Field(min_length=1)]


class TokenClaims(BaseModel):
    """What a token of ours says. `jti` is the token's own id, `sid` its session's."""

    # strict: we write integer times and string ids, so "exp": "1700000000" is not one of ours.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    sub: NonEmpty
    iat: EpochSeconds
    exp: EpochSeconds
    jti: NonEmpty
    sid: NonEmpty
    type: TokenType


class Token(BaseModel):
    """What /token and /refresh return (FastAPI's tutorial's `Token`, plus the refresh token)."""

    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Seconds until the access token expires")


def token_lifetime(token_type: TokenType) -> int:
    return ACCESS_TOKEN_LIFETIME if token_type == "access" else REFRESH_TOKEN_LIFETIME


def create_token(
    username: str, token_type: TokenType, session_id: str, now: float, jti: str | None = None
) -> tuple[str, TokenClaims]:
    """The tutorial's create_access_token(), for either type: the JWT and the claims it carries.
    `now` is passed in: a retried refresh mints its pair at the first refresh's moment (section 3)."""
    claims = TokenClaims(
        sub=username,
        iat=int(now),
        exp=int(now) + token_lifetime(token_type),
        jti=jti or secrets.token_urlsafe(16),
        sid=session_id,
        type=token_type,
    )
    return jwt.encode(claims.model_dump(), SECRET_KEY, algorithm=ALGORITHM), claims


def mint_token_pair(
    username: str, session_id: str, now: float, jtis: tuple[str, str] | None = None
) -> tuple[Token, TokenClaims]:
    """An access and a refresh token for a session, and the refresh token's claims. A login
    leaves their jtis random; a refresh passes them (section 3)."""
    access_jti, refresh_jti = jtis or (None, None)
    access_token, _ = create_token(username, "access", session_id, now, access_jti)
    refresh_token, refresh_claims = create_token(username, "refresh", session_id, now, refresh_jti)
    token = Token(access_token=access_token, refresh_token=refresh_token, expires_in=ACCESS_TOKEN_LIFETIME)
    return token, refresh_claims


# ~~~ Skip on a first read: verified_claims(), decode_token()'s signature check, cached ~~~
# jwt.decode() with the algorithm pinned, less the expiry check (decode_token() makes it); it also
# refuses claims this app does not write, and lifetimes longer than it issues. Cached.
#
# A client sends the same token on every call: with the cache, /users/me serves 0.44 of /health's
# rate, 0.35 without.


@functools.lru_cache(maxsize=4096)
def verified_claims(token: str, key: str) -> TokenClaims:
    # verify_exp off: a cached verdict must not outlive the token, so decode_token() checks exp.
    # verify_iat off: a worker whose clock runs a second ahead mints tokens "issued" in another's
    # future; they are ours all the same, and exp, checked against this worker's clock, bounds them.
    payload = jwt.decode(
        token, key, algorithms=[ALGORITHM], options={"verify_exp": False, "verify_iat": False}
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


# ~~~ end ~~~


MAX_TOKEN_CHARS = 2048  # ours are ~300


def decode_token(token: str, *, allow_expired: bool = False) -> TokenClaims:
    """The claims of a token this app signed; raises jwt.InvalidTokenError for anything else.
    allow_expired: for /revoke and /is_token_revoked (Part 2), which answer for expired ones too."""
    # Ours are short ASCII: refuse anything else before it costs a decode (or a cache lookup, which
    # hashes the whole string). A header of a megabyte would otherwise take ~50 ms of the loop.
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise jwt.InvalidTokenError("not a token of ours")
    claims = verified_claims(token, SECRET_KEY)  # pinned to HS256: a token never picks its algorithm
    if not allow_expired and claims.exp <= time.time():  # as PyJWT does: expired at exactly exp
        raise jwt.ExpiredSignatureError("Signature has expired")
    return claims


def bearer_error(detail: str) -> HTTPException:
    """The tutorial's credentials_exception: a 401 whose challenge (RFC 6750) blames the token."""
    challenge = 'Bearer error="invalid_token"'
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": challenge})


# ~~~ Skip on a first read: refused_grant(detail), how /token and /refresh say no ~~~
# A 400 with RFC 6749's "invalid_grant" and no challenge, where the tutorial sends a 401 with one:
# strict OAuth2 clients take a 401 with WWW-Authenticate for a challenge, and never read the error.
class OAuth2Error(HTTPException):
    """An error of the OAuth2 endpoints with its RFC 6749 `error` code (Part 2 puts it in the body)."""

    def __init__(self, status_code: int, error: str, detail: str) -> None:
        super().__init__(status_code, detail=detail)
        self.error = error


def refused_grant(detail: str) -> OAuth2Error:
    return OAuth2Error(status.HTTP_400_BAD_REQUEST, "invalid_grant", detail)


# ~~~ end ~~~


def verify_token(
    token: str, expected_type: TokenType, refuse: Callable[[str], HTTPException] = bearer_error
) -> TokenClaims:
    """Decode a token, or raise the error (a 401, or `refuse`'s) that says what is wrong with it."""
    try:
        claims = decode_token(token)
    except jwt.ExpiredSignatureError:
        raise refuse("Token has expired") from None
    except jwt.InvalidTokenError:
        raise refuse("Invalid token") from None
    if claims.type != expected_type:
        raise refuse(f"Wrong token type: expected {expected_type}, got {claims.type}")
    return claims


# --- The store: Redis, shared by every worker ---

# A signed token cannot be taken back, so ending one early (sections 3 and 4) needs state that
# every worker sees, and so do the rate limits (section 6). With REDIS_URI unset that state lives
# in fakeredis, a Redis inside this process: same commands, one process only.

# ~~~ Skip on a first read: redis_client() and embedded_store(), the two kinds of store ~~~
# redis_client(uri): the client for a Redis, Sentinel or Cluster URI; embedded_store(): fakeredis,
# with the same client interface. Either connects on first use. Every store error is one of
# STORE_ERRORS, which the app answers with a 503 (Part 2): without the store no revocation can be
# checked, so the app fails closed. When all of a worker's connections are busy, a request waits
# for one (up to 2 s).
REDIS_OPTIONS: dict[str, Any] = {
    "socket_timeout": 2,
    "socket_connect_timeout": 2,
    # Fail fast while Redis is down: one immediate retry replaces a connection that went stale
    # (after a Redis restart or a failover, say); past that the request gets a 503, not a wait.
    "retry": redis.asyncio.retry.Retry(NoBackoff(), 1),
}
# A redis-py cluster error (slots not covered, a node down) is not a RedisError.
STORE_ERRORS = (RedisError, RedisClusterException)
# redis-py's default pool refuses a command at once when its 100 connections are busy: under
# load, healthy requests would get 503s. Its BlockingConnectionPool waits for one instead. Its
# cluster client cannot wait, so each node may have more connections than a worker admits
# requests (uvicorn's --limit-concurrency, in the README's command).
WAITING_POOL: dict[str, Any] = {"max_connections": 100, "timeout": 2}
CLUSTER_MAX_CONNECTIONS = 1024


class BlockingSentinelPool(redis.asyncio.SentinelConnectionPool, redis.asyncio.BlockingConnectionPool):
    """The connections to whichever server the sentinels name as the primary, waited for."""


def redis_client(uri: str) -> redis.asyncio.Redis | redis.asyncio.RedisCluster:
    if uri.startswith(SENTINEL_SCHEME):
        nodes = RedisNodes.from_uri(uri)
        sentinels = redis.asyncio.Sentinel(nodes.hosts, sentinel_kwargs={"socket_timeout": 2})
        waiting: dict[str, Any] = {"connection_pool_class": BlockingSentinelPool, **WAITING_POOL}
        return sentinels.master_for(nodes.service, password=nodes.password, **waiting, **REDIS_OPTIONS)
    if uri.startswith(CLUSTER_SCHEME):
        nodes = RedisNodes.from_uri(uri)
        startup_nodes = [ClusterNode(host, port) for host, port in nodes.hosts]
        cluster: dict[str, Any] = {"startup_nodes": startup_nodes, "max_connections": CLUSTER_MAX_CONNECTIONS}
        return redis.asyncio.RedisCluster(password=nodes.password, **cluster, **REDIS_OPTIONS)
    return redis.asyncio.Redis.from_pool(
        redis.asyncio.BlockingConnectionPool.from_url(uri, **WAITING_POOL, **REDIS_OPTIONS)
    )


embedded_server = fakeredis.FakeServer()  # the embedded store's server (the tests stop it)


def embedded_store() -> fakeredis.FakeAsyncRedis:
    pool_class = redis.asyncio.BlockingConnectionPool
    connection_class = fakeredis.FakeAsyncRedisConnection
    pool = pool_class(connection_class=connection_class, server=embedded_server, **WAITING_POOL)
    return fakeredis.FakeAsyncRedis(connection_pool=pool)


# ~~~ end ~~~

store = redis_client(settings.redis_uri) if settings.redis_uri else embedded_store()


# --- 3. Refresh-token rotation with reuse detection ---

# A refresh token lives for days, so a stolen one would be good for days. Rotation makes each one
# work once: per session, the store keeps the jti of its one valid refresh token (in a Redis hash,
# a small dict under one key, "refresh:<sid>", expiring with it); a refresh swaps in the
# successor's. A used-up token presented again means two parties hold it (a thief and the owner,
# in some order): the app cannot tell which is which, so it revokes the whole session, and the
# owner logs in again.
#
# Except just after the swap: a client whose response was lost, or two tabs refreshing at once,
# send the same token a moment later. For REFRESH_GRACE_SECONDS, it gets the same pair again. The
# store keeps no token to hand back: the app mints the pair again, alike to the byte, from the
# presented jti (successor_jtis()) and the swap's moment. A thief who replays within the window
# gets what the owner got, and nothing more.
REFRESH_KEY_PREFIX = "refresh:"
REFRESH_GRACE_SECONDS = settings.refresh_grace_seconds


def refresh_key(session_id: str) -> str:
    return REFRESH_KEY_PREFIX + session_id


async def start_session(refresh: TokenClaims) -> None:
    # A pipeline sends several commands in one round trip; transaction=True wraps them in
    # MULTI/EXEC: both or neither, so that no record outlives its token.
    async with store.pipeline(transaction=True) as pipe:
        pipe.hset(refresh_key(refresh.sid), "jti", refresh.jti)
        pipe.expireat(refresh_key(refresh.sid), refresh.exp)  # gone when the token is
        await pipe.execute()


# ~~~ Skip on a first read: retries within the grace, and records from before it ~~~
# successor_jtis(token): the jtis of the pair a refresh with `token` mints, the same on every retry.
# retry_minted_at(token, now): for a token swapped out under REFRESH_GRACE_SECONDS ago, the swap's
# moment, to mint the same pair at; else None. Changes nothing. (is_live_refresh_token(), for
# /introspect in Part 2, also counts the current token.) Earlier versions of this app wrote the
# record as the jti alone, a string: the swap starts with UPGRADE_OLD_RECORD, which upgrades it.
def keyed_id(text: str) -> str:
    """22 URL-safe characters, as secrets.token_urlsafe(16), that only SECRET_KEY's holder can derive."""
    digest = hmac.digest(SECRET_KEY.encode(), text.encode(), "sha256")
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def successor_jtis(presented: TokenClaims) -> tuple[str, str]:
    # A keyed hash (HMAC), so that no one who sees a jti (the logs show some) can work out the next.
    return keyed_id(f"access after {presented.jti}"), keyed_id(f"refresh after {presented.jti}")


# Its expiry is kept; a swap that follows sets the successor's, and one that fails deletes it.
UPGRADE_OLD_RECORD = """
    if redis.call('TYPE', KEYS[1]).ok == 'string' then
        local jti, ttl = redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])
        redis.call('DEL', KEYS[1])
        redis.call('HSET', KEYS[1], 'jti', jti)
        if ttl >= 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
    end
"""
# The record's `previous` and `rotated_at` are written by the swap (ROTATE_REFRESH_TOKEN, below).
# A grace of 0 gives no grace at all, whatever the clocks say. Only with `current` does the
# current token itself answer `now`: after a failed swap it cannot be current, unless a failover
# lost that swap, and then minting without one would fork the session.
REFRESH_MINTED_AT = store.register_script(
    """
    local presented, now, grace, current = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
    if redis.call('TYPE', KEYS[1]).ok == 'string' then  -- an old record: no swap, no grace
        return current == 'current' and redis.call('GET', KEYS[1]) == presented and now
    end
    local jti, previous, rotated_at = unpack(redis.call('HMGET', KEYS[1], 'jti', 'previous', 'rotated_at'))
    if current == 'current' and jti == presented then return now end
    if grace > 0 and previous == presented and tonumber(now) < tonumber(rotated_at) + grace then
        return rotated_at
    end
    return false
    """
)


async def refresh_minted_at(presented: TokenClaims, now: float, *, current: bool) -> float | None:
    args: list[str | int] = [presented.jti, repr(now), REFRESH_GRACE_SECONDS, "current" if current else ""]
    minted_at = await REFRESH_MINTED_AT(keys=[refresh_key(presented.sid)], args=args)
    # Only a moment, as text, is a yes; a script's `false` comes back as None (or False or 0 in a
    # Redis told to speak RESP3 from Lua), which float() would take for the epoch.
    return float(minted_at) if isinstance(minted_at, bytes) else None


async def retry_minted_at(presented: TokenClaims, now: float) -> float | None:
    return await refresh_minted_at(presented, now, current=False)


async def is_live_refresh_token(presented: TokenClaims) -> bool:
    return await refresh_minted_at(presented, time.time(), current=True) is not None


# ~~~ end ~~~


# Compare-and-set in one step, so two requests can never both rotate the same refresh token: Redis
# runs a Lua script atomically. KEYS holds the keys it touches, ARGV its other arguments (as text,
# unpacked into locals); redis.call() runs a command; `~=` is "not equal", `--` starts a comment.
# register_script() gives an object that runs the script when awaited. The record also keeps the
# token swapped out, and when, for retries.
ROTATE_REFRESH_TOKEN = store.register_script(
    UPGRADE_OLD_RECORD  # just above
    + """
    local record = KEYS[1]
    local presented, successor, now, successor_exp = unpack(ARGV)
    if redis.call('HGET', record, 'jti') ~= presented then
        return 0  -- used up, or the session is gone
    end
    redis.call('HSET', record, 'jti', successor, 'previous', presented, 'rotated_at', now)
    redis.call('EXPIREAT', record, successor_exp)
    return 1
    """
)


async def rotate_refresh_token(presented: TokenClaims, successor: TokenClaims, now: float) -> bool:
    """Make `successor` (minted at `now`) its session's valid refresh token, if `presented` still is."""
    # repr(now): the exact float as text. A retry mints at the moment it reads back, and only the
    # same second gives the same iat, hence the same bytes; fewer digits could round up a second.
    args: list[str | int] = [presented.jti, successor.jti, repr(now), successor.exp]
    return bool(await ROTATE_REFRESH_TOKEN(keys=[refresh_key(presented.sid)], args=args))


async def refresh_session(refresh_token: str) -> Token:
    """Rotate a session's refresh token; a retry within the grace gets the same pair again; any
    other token that is no longer the current one revokes the session."""
    claims = verify_token(refresh_token, "refresh", refuse=refused_grant)  # a 400: see refused_grant()
    if claims.sub not in USERS:  # deleted since: no new tokens
        raise refused_grant("Unknown user")
    jtis, now = successor_jtis(claims), time.time()
    token, successor = mint_token_pair(claims.sub, claims.sid, now, jtis)
    if await rotate_refresh_token(claims, successor, now):
        return token
    swapped_at = await retry_minted_at(claims, now)  # a retry within the grace: the swap's moment
    if swapped_at is None:
        await revoke_session(claims.sid, now)  # section 4: blocks its tokens, deletes its record
        # Either reuse of a rotated token (theft, or a client bug) or a session already revoked.
        client_log.warning("stale refresh token, session revoked: sub=%s sid=%s", claims.sub, claims.sid)
        raise refused_grant("Refresh token has been revoked")
    token, _ = mint_token_pair(claims.sub, claims.sid, swapped_at, jtis)  # what the first refresh got
    token.expires_in -= max(0, int(now) - int(swapped_at))  # that pair is that much older
    return token


# --- 4. Logout and revocation ---

# A JWT is valid until its `exp`. To end one sooner, the app remembers it as revoked, and only
# until that `exp`: after it, the signature check refuses the token anyway. Logout ends a session:
# deleting its refresh record stops new tokens (section 3), and its access tokens, whose ids the
# server never stored, are blocked by their shared `sid` until the last of them has expired.
#
# Why sorted sets, not `SET revoked:<jti> 1 EX <ttl>`, which Redis would expire by itself? A sorted
# set is a set whose members each carry a number, the score: here the epoch second after which
# nothing the member blocks can be used. So:
# - one ZMSCORE checks a token (its jti; /revoke in Part 2 adds those) and its session (its sid);
# - revoking again can only raise an end (ZADD GT);
# - memory is the same (~120 bytes an entry).
# The price: Redis cannot expire a member, so a task deletes those whose score has passed (section 5).
REVOKED_KEY_PREFIX = "revoked:"
# Several sets, one chosen by sid, so that a Redis Cluster can spread them (changing the number
# strands entries where they are no longer looked for).
REVOKED_SETS = 16


def revoked_key(session_id: str) -> str:
    return f"{REVOKED_KEY_PREFIX}{zlib.crc32(session_id.encode()) % REVOKED_SETS}"


# An access token of a session being revoked may have been minted a little after `now`: by a
# refresh that raced the logout, or on a worker whose clock runs ahead. The entry outlives them.
REVOCATION_MARGIN = 60


async def revoke_session(session_id: str, now: float) -> None:
    """Revoke every token of a login: its access tokens by sid, its refresh token by deletion
    (which also stops new ones being minted)."""
    # transaction=False: no MULTI/EXEC, which a Redis Cluster refuses for keys on different nodes.
    async with store.pipeline(transaction=False) as pipe:
        # GT: revoking again (from a worker whose clock is behind, say) never shortens the entry.
        until = int(now) + ACCESS_TOKEN_LIFETIME + REVOCATION_MARGIN
        pipe.zadd(revoked_key(session_id), {session_id: until}, gt=True)
        pipe.delete(refresh_key(session_id))
        await durably(pipe)  # Part 2: runs it, and waits for a replica to have the writes if any


async def is_revoked(claims: TokenClaims) -> bool:
    """Whether an access token is revoked, by its own jti or by its session's sid."""
    # ZMSCORE: the score of each member named, or None where it is not in the set.
    token_until, session_until = await store.zmscore(revoked_key(claims.sid), [claims.jti, claims.sid])
    return token_until is not None or session_until is not None


# Every call with an access token checks it here: signature and expiry, then revocation.
# With no Authorization header, a 401 "Not authenticated" with WWW-Authenticate: Bearer.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="token")


async def get_access_claims(token: Annotated[str, Depends(oauth2_scheme)]) -> TokenClaims:
    """The claims of a valid, unrevoked access token, or the 401 that says what is wrong."""
    claims = verify_token(token, "access")
    if await is_revoked(claims):
        client_log.warning("revoked token used: sub=%s jti=%s", claims.sub, claims.jti)
        raise bearer_error("Token has been revoked")
    return claims


AccessClaims = Annotated[TokenClaims, Depends(get_access_claims)]


async def get_current_user(request: Request, claims: AccessClaims) -> User:
    user = USERS.get(claims.sub)
    if user is None:
        raise bearer_error("Unknown user")
    request.state.user = user  # for caller_username(), the plan limits' key function
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


# --- 5. The cleanup task ---

# Deleting by score cannot un-revoke a live token: an entry's score is the moment after which
# nothing it blocks could be used any more. The task starts and stops with the app (lifespan).


async def remove_expired_revocations(now: float) -> int:
    """Drop entries whose tokens have all expired, from every set; returns how many were removed."""
    # ZREMRANGEBYSCORE deletes the members whose scores fall in a range.
    async with store.pipeline(transaction=False) as pipe:
        for n in range(REVOKED_SETS):
            pipe.zremrangebyscore(f"{REVOKED_KEY_PREFIX}{n}", "-inf", f"({int(now)}")  # "(": strictly below
        return sum(await pipe.execute())


async def cleanup_revocations_forever(interval: float, stopping: asyncio.Event) -> None:
    """Every `interval` seconds, drop the revocations whose tokens have all expired."""
    while not stopping.is_set():
        await asyncio.sleep(interval)
        try:
            removed = await remove_expired_revocations(time.time())
        except STORE_ERRORS as exc:
            # The store may be down for a while: try again next tick. (A cancellation that reaches
            # a store call can surface here as a ConnectionError: `stopping` then ends the loop.)
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
    await warn_if_redis_may_evict()  # Part 2: a full Redis must refuse writes, not drop revocations
    await refuse_other_token_lifetimes()  # Part 2: apps on one Redis must agree on token lifetimes
    stopping = asyncio.Event()
    cleanup = asyncio.create_task(cleanup_revocations_forever(settings.cleanup_interval_seconds, stopping))
    app.state.cleanup_task = cleanup  # where the tests find it
    try:
        yield
    finally:
        stopping.set()  # as well as cancel(): a store call can swallow the cancellation (section 5)
        cleanup.cancel()
        (outcome,) = await asyncio.gather(cleanup, return_exceptions=True)
        if isinstance(outcome, Exception):  # it crashed, rather than being cancelled here
            logger.error("the revocation cleanup task had stopped: %r", outcome)
        await close_store()  # Part 2


# --- 6. Per-plan rate limits with SlowAPI ---

# SlowAPI counts calls per key (here: per user, or per client IP) and per endpoint, with a moving
# window: "2/minute" allows at most 2 calls in any 60 seconds. Its decorator, @limiter.limit(...),
# checks when the endpoint is called: after every dependency has run, so a key function can read
# what a dependency found (the user, the login's username), and a 401 or 403 costs no quota. Its
# checks are synchronous, and a synchronous Redis call would stop the event loop for every other
# request. SlowAPI's docs use storage_uri="redis://...", which counts the same but blocks the loop
# on each count; this app passes storage_uri="async-bridge://", the fenced storage below.

# ~~~ Skip on a first read: the storage SlowAPI counts with, awaited on the event loop ~~~
# Contract: SlowAPI counts as with storage_uri="redis://...", on the app's own Redis client,
# without blocking the loop, in the endpoints that PortalRoute (the app's route class) runs. A
# black box is enough on a first read.
#
# How: it runs `limits`' own moving-window scripts through greenback.await_(), which pauses
# SlowAPI's synchronous code while the loop awaits Redis. That needs a greenback "portal" (the
# endpoint's coroutine run inside a greenlet, to which sync code can hand an awaitable):
# PortalRoute, the app's route class, opens one around each endpoint SlowAPI limits. One thread,
# no blocking call. Each count's window comes back in the same round trip, for the rate-limit
# headers. (`limits` finds this class by its STORAGE_SCHEME, as it finds its own storages.)
COUNT_SCRIPT = store.register_script(limits.storage.RedisStorage.SCRIPT_ACQUIRE_MOVING_WINDOW)
WINDOW_SCRIPT = store.register_script(limits.storage.RedisStorage.SCRIPT_MOVING_WINDOW)
LIMITS_KEY_PREFIX = "LIMITS:"  # what `limits`' own Redis storage puts before SlowAPI's keys


@dataclass(frozen=True)
class Window:
    """A moving window as one count saw it: a limit of `limit` calls in `seconds`."""

    key: str  # SlowAPI's key: LIMITER/<its key function's value>/<path>/<limit>
    limit: int
    seconds: int
    hits: int
    oldest_hit: float  # epoch seconds; for an empty window, as if one had just left it

    @property
    def reset(self) -> float:  # until when the oldest hit still counts
        return self.oldest_hit + self.seconds

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.hits)


# Each request's windows, in the order SlowAPI counted them. Set per request by RequestPlumbing
# (Part 2), which writes their rate-limit headers; read also by the 429 handler (Part 2).
windows_counted: ContextVar[list[Window]] = ContextVar("windows_counted")


def as_window(key: str, limit: int, seconds: int, reply: Any, now: float) -> Window:
    """WINDOW_SCRIPT's reply: [oldest hit, hits], or nothing for an empty window."""
    oldest_hit, hits = (float(reply[0]), int(reply[1])) if reply else (now - seconds, 0)
    return Window(key, limit, seconds, hits, oldest_hit)


async def read_window(key: str, limit: int, seconds: int) -> Window:
    """A moving window's state, without consuming from it."""
    now = time.time()
    reply = await WINDOW_SCRIPT(keys=[LIMITS_KEY_PREFIX + key], args=[now - seconds, limit])
    return as_window(key, limit, seconds, reply, now)


async def count_and_read(key: str, limit: int, seconds: int, amount: int) -> tuple[bool, Window]:
    """Count a hit if the window has room, then read the window: one round trip for both."""
    redis_key, now = LIMITS_KEY_PREFIX + key, time.time()
    # execute_command(): redis-py's cluster pipeline refuses pipe.evalsha(), though this one-key
    # EVALSHA is routed like any command.
    async with store.pipeline(transaction=False) as pipe:
        pipe.execute_command("EVALSHA", COUNT_SCRIPT.sha, 1, redis_key, now, limit, seconds, amount)
        pipe.execute_command("EVALSHA", WINDOW_SCRIPT.sha, 1, redis_key, now - seconds, limit)
        acquired, reply = await pipe.execute(raise_on_error=False)
    # A Redis that restarted has lost the scripts; calling a script object loads it again. If the
    # count did run, only the read is redone, so nothing counts twice.
    if isinstance(acquired, NoScriptError):
        acquired = await COUNT_SCRIPT(keys=[redis_key], args=[now, limit, seconds, amount])
        return bool(acquired), await read_window(key, limit, seconds)
    if isinstance(reply, NoScriptError):
        return bool(acquired), await read_window(key, limit, seconds)
    for result in (acquired, reply):
        if isinstance(result, Exception):
            raise result
    return bool(acquired), as_window(key, limit, seconds, reply, now)


class AsyncBridgeStorage(limits.storage.Storage, limits.storage.MovingWindowSupport):
    STORAGE_SCHEME = ["async-bridge"]  # noqa: RUF012 (a list, as limits declares it)
    base_exceptions = STORE_ERRORS

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        acquired, window = greenback.await_(count_and_read(key, limit, expiry, amount))
        windows_counted.get().append(window)
        return acquired

    def _not_called(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("SlowAPI's moving window calls only acquire_entry()")

    # Abstract in `limits`' storages, but never called here: they serve other strategies.
    get_moving_window = check = incr = get = get_expiry = reset = clear = _not_called


class PortalRoute(APIRoute):
    """Runs each endpoint that SlowAPI limits (its decorator wraps it, setting __wrapped__) in a
    greenback portal, so that the storage can await. Only those: a portal costs ~20 µs a call."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if hasattr(endpoint, "__wrapped__"):
            # A call of `endpoint` becomes `await greenback.with_portal_run(endpoint, ...)`; wraps()
            # keeps its name and signature, which FastAPI reads.
            endpoint = functools.wraps(endpoint)(functools.partial(greenback.with_portal_run, endpoint))
        super().__init__(path, endpoint, **kwargs)


# ~~~ end ~~~


# ~~~ Skip on a first read: client_ip(request), whom the per-IP limits count ~~~
# The client's IP address (SlowAPI's get_remote_address(), but an IPv6 /64, what one host is
# usually given, counts as one client; anything unparsable, as one client, UNKNOWN_CLIENT).
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
UNKNOWN_CLIENT = "unknown"


def client_ip(request: Request) -> str:
    try:
        address = ipaddress.ip_address(request.client.host if request.client else "")
    except ValueError:
        return UNKNOWN_CLIENT
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 client, as a listener on both IPv4 and IPv6 (::ffff:a.b.c.d) or NAT64
        # (64:ff9b::a.b.c.d) shows it: counted by its IPv4 address, not with every other one.
        if address.ipv4_mapped or address in NAT64:
            return str(address.ipv4_mapped or ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        return str(ipaddress.ip_network((address, 64), strict=False))
    return str(address)


# ~~~ end ~~~


# The default key is the client's IP; the plan limits pass key_func=caller_username.
# headers_enabled=False: SlowAPI's headers can say a second too early when to retry; Part 2
# writes exact ones.
limiter = Limiter(
    key_func=client_ip, strategy="moving-window", storage_uri="async-bridge://", headers_enabled=False
)


def caller_username(request: Request) -> str:
    """SlowAPI's key for the plan limits: the logged-in user (get_current_user() puts it there)."""
    return request.state.user.username


def plan_limit(key: str) -> str:
    """The caller's plan's limit, like "2/minute". SlowAPI takes a callable limit and, as this one's
    parameter is named `key`, passes it the key function's value. Read on every call: a plan change
    applies at once."""
    return PLAN_LIMITS[USERS[key].plan]


# ~~~ Skip on a first read: a speed trick, no change in what SlowAPI does ~~~
# SlowAPI reads these functions' signatures on every call, with inspect.signature() (~7 µs each,
# three a call); given one computed once, that takes ~2 µs: /users/me ~8 % faster.
caller_username.__signature__ = inspect.signature(caller_username)  # type: ignore[attr-defined]
plan_limit.__signature__ = inspect.signature(plan_limit)  # type: ignore[attr-defined]
# ~~~ end ~~~


# --- The app ---

app = FastAPI(
    title="fastapi-users-slowapi",
    summary="JWT login, per-plan rate limits with SlowAPI, and token revocation on Redis.",
    lifespan=lifespan,
)
# As SlowAPI's docs show: its decorator finds the limiter here. Its RateLimitExceeded becomes a 429
# with Retry-After in Part 2, where the app's other error handlers are.
app.state.limiter = limiter
# PortalRoute (fenced in section 6) runs the limited endpoints so that SlowAPI's storage can await.
app.router.route_class = PortalRoute


# --- Endpoints: log in, refresh, log out ---


# ~~~ Skip on a first read: request bodies, and what /docs shows of errors ~~~
# The token endpoints take JSON (what curl sends here) or a form (what OAuth2 clients send).
# token_grant() gives /token a PasswordGrant (username, password) or a RefreshGrant
# (refresh_token), and keeps it in request.state.grant for the login limit's key functions below;
# refresh_grant() gives /refresh a RefreshGrant. A bad body gets a 400, 415 or 422.
# error_responses() and request_body() describe an endpoint's errors and body for /docs.
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


async def refresh_grant(request: Request) -> RefreshGrant:
    return parsed(RefreshGrant, await request_fields(request))


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


FORM_TYPE = "application/x-www-form-urlencoded"


def request_body(*models: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body that request_fields() reads: the same fields as JSON or as a form."""
    schemas = [model.model_json_schema() for model in models]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    content = {media_type: {"schema": schema} for media_type in ("application/json", FORM_TYPE)}
    return {"requestBody": {"required": True, "content": content}}


async def token_grant(request: Request) -> PasswordGrant | RefreshGrant:
    """The grant a /token request carries: a password grant unless it names refresh_token."""
    fields = await request_fields(request)
    grant_type = fields.get("grant_type", "password") if isinstance(fields, dict) else "password"
    if grant_type not in ("password", "refresh_token"):
        detail = "grant_type must be password or refresh_token"
        raise OAuth2Error(status.HTTP_400_BAD_REQUEST, "unsupported_grant_type", detail)
    grant: PasswordGrant | RefreshGrant
    grant = parsed(RefreshGrant, fields) if grant_type == "refresh_token" else parsed(PasswordGrant, fields)
    request.state.grant = grant  # read by ip_and_username() and is_refresh_grant(), below
    return grant


# ~~~ end ~~~


def ip_and_username(request: Request) -> str:
    """The login limit's key: no IP address contains "|", so no two (IP, username) pairs share one."""
    return f"{client_ip(request)}|{request.state.grant.username}"


def is_refresh_grant(request: Request) -> bool:
    """A refresh at /token is limited per IP only, as at /refresh."""
    return isinstance(request.state.grant, RefreshGrant)


def logged_name(username: str) -> str:
    """How the logs name a username a client sent: only a known one, as an unknown one may be a
    password typed into the wrong field; repr() escapes what it holds (a newline, say)."""
    return f"username {username!r}" if username in USERS else "an unknown username"


# ~~~ Skip on a first read: per-username backoff, against guessing from many addresses ~~~
# refuse_during_backoff() answers 429 with Retry-After while a username must wait, and otherwise
# counts the attempt as failed until login_succeeded() clears the count. Past LOGIN_BACKOFF_AFTER
# failures in a row, from any addresses, each next attempt waits: 1 s, 2 s, 4 s, ... up to
# LOGIN_BACKOFF_MAX_SECONDS. An address this username logged in from (within the refresh
# lifetime) never waits, so a stranger cannot lock the owner out there. Times are the workers'
# clocks, as everywhere in this app: keep them in sync.
LOGIN_BACKOFF_AFTER = settings.login_backoff_after
LOGIN_BACKOFF_MAX_SECONDS = settings.login_backoff_max_seconds


def login_keys(username: str, ip: str) -> list[str]:
    """The username's failure count, and this address's mark of a past login with it. The part in
    braces (a hash tag) puts both keys in one cluster slot; a keyed hash of the username, because a
    tag cannot hold braces, and so that a million usernames tried leave keys of one short length."""
    account = f"login:{{{keyed_id(f'login {username}')}}}"  # keyed_id(): section 3
    return [account, f"{account}:{ip}"]


# The attempt counts before its password is checked, so a burst of guesses sent at once cannot
# all start before the first failure is known. Times go in and out as %.17g text: exact doubles.
BEGIN_LOGIN = store.register_script(
    """
    local account, known_address = KEYS[1], KEYS[2]
    local now, after, longest = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
    if redis.call('EXISTS', known_address) == 1 then return '0' end
    local wait_until = tonumber(redis.call('HGET', account, 'until') or '0')
    if now < wait_until then return string.format('%.17g', wait_until) end
    local failures = redis.call('HINCRBY', account, 'failures', 1)
    if failures >= after then
        wait_until = now + math.min(2 ^ (failures - after), longest)
        redis.call('HSET', account, 'until', string.format('%.17g', wait_until))
    end
    redis.call('EXPIREAT', account, math.ceil(math.max(wait_until, now) + longest))
    return '0'
    """
)


async def refuse_during_backoff(username: str, ip: str) -> None:
    """A 429 while this username must wait, whatever the password: known or not, right or wrong,
    the answer is the same, and no bcrypt runs."""
    refuse_if_too_many_logins_wait()  # a login the bcrypt queue refuses is not counted
    now = time.time()
    args: list[str | int] = [repr(now), LOGIN_BACKOFF_AFTER, LOGIN_BACKOFF_MAX_SECONDS]
    wait_until = float(await BEGIN_LOGIN(keys=login_keys(username, ip), args=args))
    if wait_until > now:
        retry_after = str(math.ceil(wait_until - now))  # allowed at wait_until itself: never early
        client_log.warning(
            "login refused during a backoff of %s s for %s", retry_after, logged_name(username)
        )
        detail = "Too many failed logins for this username; try again later"
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail, headers={"Retry-After": retry_after})


# Marks the address as known. A success from a new address also clears the count; one from a
# known address (never counted) leaves it, or strangers would see their waits vanish whenever the
# owner logs in, and so learn that the account exists. No mark for unparsable addresses: they
# all share one key, UNKNOWN_CLIENT.
LOGIN_SUCCEEDED = store.register_script(
    """
    if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('DEL', KEYS[1]) end
    if ARGV[2] == '1' then redis.call('SET', KEYS[2], 1, 'EXAT', ARGV[1]) end
    """
)


async def login_succeeded(username: str, ip: str) -> None:
    args = [int(time.time()) + REFRESH_TOKEN_LIFETIME, int(ip != UNKNOWN_CLIENT)]
    await LOGIN_SUCCEEDED(keys=login_keys(username, ip), args=args)


# ~~~ end ~~~


# SlowAPI checks stacked limits from the decorator nearest the function upwards, and stops at the
# first one exceeded: the per-IP limit first, so a client it refuses adds no key per username tried.
# exempt_when: SlowAPI calls it with the request, and skips the limit when it returns True.
@app.post(
    "/token",
    summary="Log in, or refresh: the OAuth2 token endpoint",
    responses=error_responses(400, 401, 413, 415, 422, 429, 503),
    openapi_extra=request_body(PasswordGrant, RefreshGrant),
)
@limiter.limit(settings.rate_limit_login, key_func=ip_and_username, exempt_when=is_refresh_grant)
@limiter.limit(settings.rate_limit_anonymous)
async def login_for_access_token(
    request: Request,  # SlowAPI's decorator reads it (it must be named `request`)
    grant: Annotated[PasswordGrant | RefreshGrant, Depends(token_grant)],
) -> Token:
    """`grant_type=password` (the default in JSON) trades a username and password for a new pair;
    `grant_type=refresh_token` works as /refresh does. JSON or an OAuth2 form. A login is limited
    per client IP and per IP + username, a refresh per client IP."""
    if isinstance(grant, RefreshGrant):
        return await refresh_session(grant.refresh_token)
    ip = client_ip(request)
    await refuse_during_backoff(grant.username, ip)  # just above
    user = await authenticate_user(grant.username, grant.password)
    if user is None:
        client_log.warning("failed login for %s", logged_name(grant.username))
        raise refused_grant("Incorrect username or password")  # not the tutorial's 401: see refused_grant()
    await login_succeeded(user.username, ip)
    session_id = secrets.token_urlsafe(16)  # a new login, a new session: its `sid`
    token, refresh_claims = mint_token_pair(user.username, session_id, time.time())
    await start_session(refresh_claims)
    return token


@app.post(
    "/refresh",
    summary="Trade a refresh token for a new token pair",
    responses=error_responses(400, 401, 413, 415, 422, 429, 503),
    openapi_extra=request_body(RefreshGrant),
)
@limiter.limit(settings.rate_limit_anonymous)
async def refresh(request: Request, grant: Annotated[RefreshGrant, Depends(refresh_grant)]) -> Token:
    """JSON `{"refresh_token": ...}` or the RFC 6749 §6 form. The refresh token is used up: sent
    again within REFRESH_GRACE_SECONDS it gets the same pair, later it revokes its whole session."""
    return await refresh_session(grant.refresh_token)


class MessageOut(BaseModel):
    message: str


@app.post(
    "/logout", summary="Log out: revoke every token of this session", responses=error_responses(401, 503)
)
async def logout(claims: AccessClaims) -> MessageOut:
    """Revokes the access token used here and the refresh token of the same login. Never rate-limited."""
    await revoke_session(claims.sid, time.time())
    return MessageOut(message="Logged out")


# --- Endpoints: limited by plan ---

# The decorator counts; the tag only lists a route in /rate-limit-status (Part 2). A test checks
# that every tagged route counts the plan's limit.
PLAN_LIMITED = "plan-limited"


# Both this and the endpoint ask for CurrentUser: FastAPI runs get_current_user() once a request.
async def require_premium(user: CurrentUser) -> None:
    if user.plan is Plan.FREE:
        detail = f"This endpoint needs the premium or admin plan; yours is {user.plan.value}"
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=detail)


class UserOut(BaseModel):
    username: str
    full_name: str
    plan: Plan


@app.get(
    "/users/me", tags=[PLAN_LIMITED], summary="The logged-in user", responses=error_responses(401, 429, 503)
)
@limiter.limit(plan_limit, key_func=caller_username)
async def read_users_me(request: Request, current_user: CurrentUser) -> UserOut:
    """Your username, full name and plan."""
    return UserOut(username=current_user.username, full_name=current_user.full_name, plan=current_user.plan)


@app.get(
    "/plan-limited-endpoint",
    tags=[PLAN_LIMITED],
    summary="An endpoint limited by the caller's plan",
    responses=error_responses(401, 429, 503),
)
@limiter.limit(plan_limit, key_func=caller_username)
async def plan_limited(request: Request, current_user: CurrentUser) -> MessageOut:
    """Each user gets their plan's number of calls in any rolling window."""
    return MessageOut(message=f"Hello {current_user.username}, you are on the {current_user.plan.value} plan")


@app.get(
    "/premium-only-endpoint",
    tags=[PLAN_LIMITED],
    summary="An endpoint for the premium and admin plans",
    responses=error_responses(401, 403, 429, 503),
    # SlowAPI counts after every dependency has run, so a free user's 403 costs no quota.
    dependencies=[Depends(require_premium)],
)
@limiter.limit(plan_limit, key_func=caller_username)
async def premium_only(request: Request, current_user: CurrentUser) -> MessageOut:
    """Free users get a 403 that names their plan."""
    return MessageOut(message=f"Welcome to the premium area, {current_user.username}")


# ================================ Part 2: machinery ================================
# Skip all of it on a first read. What it does, in order: reads request bodies (JSON or form);
# builds every error response (the 429, the 503, OAuth2's fields); writes the rate-limit headers;
# limits body size; CORS; the OAuth2 endpoints /revoke, /introspect and server metadata, with
# /is_token_revoked, /rate-limit-status and /health; replicated writes; closing the store; safe logs.


# --- Request bodies: JSON or an OAuth2 form ---

MULTIPART_TYPE = "multipart/form-data"
REQUEST_FIELDS = {"grant_type", "username", "password", "refresh_token", "token", "token_type_hint"}


async def request_fields(request: Request) -> Any:
    """A JSON body or a form, as Python data (what the models above are then validated from)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type == "application/json":
            return json.loads(await request.body(), object_pairs_hook=without_duplicates)
        if content_type in (FORM_TYPE, MULTIPART_TYPE):  # multipart: what a browser's FormData sends
            form = await request.form(max_files=0)  # a file part: a 400
            # RFC 6749 §3.2: no parameter twice. Which copy counts would be anyone's guess (a proxy
            # might read the first, this app the last). Fields this app does not read are ignored.
            if any(len(form.getlist(name)) > 1 for name in REQUEST_FIELDS):
                raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="A form field appears more than once")
            return dict(form)
    except (ValueError, RecursionError):  # what json raises for a malformed or too deeply nested body
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="Request body is malformed") from None
    detail = f"Send application/json, {FORM_TYPE} or {MULTIPART_TYPE}"
    raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, detail=detail)


def without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # As for a form: which copy of a key counts would be anyone's guess (a proxy might read the
    # first, this app the last).
    if len({key for key, _ in pairs}) < len(pairs):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="A JSON field appears more than once")
    return dict(pairs)


ModelT = TypeVar("ModelT", bound=BaseModel)


def parsed(model: type[ModelT], fields: Any) -> ModelT:
    """`fields` as a `model`, or the same 422 that FastAPI gives a body it parses itself."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


# --- Error responses ---

# Token responses must not be cached (RFC 6749 §5.1); Pragma for HTTP/1.0 caches.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
OAUTH2_PATHS = {"/token", "/refresh", "/revoke", "/introspect"}
# RFC 6749 §5.2's code for each error status of those endpoints, unless the error names its own
# (an OAuth2Error, as a refused grant does); any other 4xx is invalid_request.
OAUTH2_ERROR_CODES = {
    status.HTTP_429_TOO_MANY_REQUESTS: "temporarily_unavailable",
    status.HTTP_503_SERVICE_UNAVAILABLE: "temporarily_unavailable",
}


def oauth2_path(scope: Scope) -> bool:
    # Behind a proxy, uvicorn --root-path puts the app's prefix in front of the path; not ours.
    return scope["path"].removeprefix(scope.get("root_path", "")) in OAUTH2_PATHS


def error_response(
    request: Request,
    status_code: int,
    detail: Any,
    headers: Mapping[str, str] | None = None,
    *,
    error: str = "",
) -> JSONResponse:
    """Every error this app sends: JSON with `detail`; from the OAuth2 endpoints also RFC 6749's
    `error` and `error_description`, which clients read."""
    body = {"detail": detail}
    if oauth2_path(request.scope):
        body["error"] = error or OAUTH2_ERROR_CODES.get(status_code, "invalid_request")
        body["error_description"] = detail if isinstance(detail, str) else "A field is missing or invalid"
    return JSONResponse(body, status_code=status_code, headers=headers)


@app.exception_handler(RedisError)
@app.exception_handler(RedisClusterException)
async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # Fail closed: without the store, no token can be checked for revocation and no limit counted.
    client_log.error("store unavailable on %s %r: %r", request.method, request.url.path, exc)
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
    # FastAPI's own handler, but through error_response(), for OAuth2's fields.
    return error_response(request, exc.status_code, exc.detail, exc.headers, error=getattr(exc, "error", ""))


@app.exception_handler(RateLimitExceeded)
async def rate_limit_exceeded(request: Request, exc: RateLimitExceeded) -> JSONResponse:
    """SlowAPI's _rate_limit_exceeded_handler, with an exact Retry-After and this app's JSON body."""
    refused = exc.limit  # the limit that refused: on /token, the IP one or the IP + username one
    key = refused.key_func(request) if refused else "unknown"
    client_log.warning("rate limit %s exceeded on %s by %r", exc.detail, request["path"], key)
    headers = {"Retry-After": str(max(1, seconds_until_room(nearest_exhaustion(windows_counted.get()))))}
    detail = f"Rate limit exceeded: {exc.detail}"
    return error_response(request, status.HTTP_429_TOO_MANY_REQUESTS, detail, headers)


# --- Rate-limit headers, exact ---

# X-RateLimit-* and the IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers) for the
# window nearest exhaustion, RateLimit-Policy for every window the call counted in.
#
# A hit counts while its age is at most the window, so at exactly `reset` the window is still full,
# and room comes in the whole second after it: floor(reset) + 1, not ceil(reset). The window script
# returns the oldest hit's time through Lua's tostring(), with 14 significant digits: up to 0.05 ms
# off at today's epoch, either way. Adding TIMESTAMP_TOLERANCE before flooring covers that, so
# these answers are never early, at worst one second late.
TIMESTAMP_TOLERANCE = 0.001


def first_second_with_room(reset: float) -> int:
    """The first whole epoch second at which the window has room again (X-RateLimit-Reset)."""
    return math.floor(reset + TIMESTAMP_TOLERANCE) + 1


def seconds_until_room(window: Window) -> int:
    """Whole seconds from now until the window has room again (Retry-After, RateLimit's t)."""
    return math.floor(window.reset - time.time() + TIMESTAMP_TOLERANCE) + 1


def nearest_exhaustion(windows: list[Window]) -> Window:
    return min(windows, key=lambda window: (window.remaining, -window.reset))


def policy_name(window: Window) -> str:
    """Whose calls a window counts, read from its SlowAPI key (LIMITER/<key>/<path>/<limit>): the
    login limit's holds "|" (nothing else does), a user's key names a plan, else it is per IP."""
    if "|" in window.key:
        return "ip+username"
    key = window.key.split("/")[1]
    return USERS[key].plan.value if key in USERS else "ip"


def rate_limit_headers(windows: list[Window]) -> dict[str, str]:
    nearest = nearest_exhaustion(windows)
    return {
        "X-RateLimit-Limit": str(nearest.limit),
        "X-RateLimit-Remaining": str(nearest.remaining),
        "X-RateLimit-Reset": str(first_second_with_room(nearest.reset)),
        "RateLimit-Policy": ", ".join(f'"{policy_name(w)}";q={w.limit};w={w.seconds}' for w in windows),
        "RateLimit": f'"{policy_name(nearest)}";r={nearest.remaining};t={seconds_until_room(nearest)}',
    }


class RequestPlumbing:
    """Per request: gives the request its list of counted windows (AsyncBridgeStorage adds to it),
    and adds their headers to the response (a 429 or an error after a count included), with
    no-store on the OAuth2 endpoints."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counted: list[Window] = []
        windows_counted.set(counted)
        no_store = oauth2_path(scope)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and (counted or no_store):
                headers = MutableHeaders(scope=message)  # none of these is set elsewhere: append
                for name, value in (rate_limit_headers(counted) if counted else {}).items():
                    headers.append(name, value)
                for name, value in NO_STORE.items() if no_store else ():
                    headers.append(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


app.add_middleware(RequestPlumbing)


# --- Body size ---

MAX_BODY_BYTES = 4096


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
        # The length check first: int() refuses more than 4,300 digits, even zero-padded ones.
        if declared is not None and (
            not declared.isdigit()
            or len(declared) > len(str(self.max_bytes)) + 16
            or int(declared) > self.max_bytes
        ):
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


app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)


# --- Browser apps on other origins (CORS) ---

# Off unless CORS_ALLOW_ORIGINS lists origins. Then Starlette's middleware, outermost, answers
# their preflights (OPTIONS) and lets their scripts read the answers, the rate-limit headers and
# Retry-After included. Tokens travel in headers and bodies, never cookies: no credentials mode.
RATE_LIMIT_HEADERS = "X-RateLimit-Limit X-RateLimit-Remaining X-RateLimit-Reset RateLimit RateLimit-Policy"
if settings.cors_allow_origins:
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_allow_origins.split(","),
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=[*RATE_LIMIT_HEADERS.split(), "Retry-After", "WWW-Authenticate"],
        max_age=600,
    )


# --- OAuth2 endpoints for standard clients: revocation, introspection, metadata ---


class TokenRequest(BaseModel):
    """RFC 7009 §2.1 (revocation) and RFC 7662 §2.1 (introspection)."""

    token: TokenString
    token_type_hint: str | None = Field(
        default=None, max_length=64, description="Ignored: every token of ours says what type it is"
    )


async def token_request(request: Request) -> TokenRequest:
    return parsed(TokenRequest, await request_fields(request))


PresentedToken = Annotated[TokenRequest, Depends(token_request)]


class RevokedOut(BaseModel):
    revoked: bool = Field(description="false: not a token of this service, so nothing was done")


class Introspection(BaseModel):
    """RFC 7662 §2.2. Everything but `active` is left out for a token that is not active."""

    active: bool
    # RFC 6749 §7.1's type, which says how an access token is used; a refresh token is used only
    # here, at the token endpoints, so it has none. Which kind of token it is: token_use.
    token_type: Literal["Bearer"] | None = None
    token_use: TokenType | None = None
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


async def revoke_access_token(claims: TokenClaims) -> None:
    """One access token, not its session: an entry of its own jti (section 4), until its exp."""
    async with store.pipeline(transaction=False) as pipe:
        pipe.zadd(revoked_key(claims.sid), {claims.jti: claims.exp})  # its own exp: no longer, no shorter
        await durably(pipe)


async def token_revoked(claims: TokenClaims) -> bool:
    """is_revoked() (section 4) for either type: a refresh token, unless a refresh would take it."""
    if claims.type == "refresh":
        return not await is_live_refresh_token(claims)
    return await is_revoked(claims)


@app.post(
    "/revoke",
    summary="Revoke a token you hold (RFC 7009)",
    responses=error_responses(400, 413, 415, 422, 429, 503),
    openapi_extra=request_body(TokenRequest),
)
@limiter.limit(settings.rate_limit_anonymous)
async def revoke_token(request: Request, body: PresentedToken) -> RevokedOut:
    """Holding a token is the authority to revoke it. A refresh token takes its whole session with
    it. Revoking an expired or already revoked token succeeds and changes nothing; a token this
    service did not sign gets `revoked: false` and no error (RFC 7009 §2.2)."""
    try:
        claims = decode_token(body.token, allow_expired=True)
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
    openapi_extra=request_body(TokenRequest),
    response_model_exclude_none=True,
)
@limiter.limit(settings.rate_limit_anonymous)
async def introspect(request: Request, body: PresentedToken) -> Introspection:
    """`active: true` with the token's claims for a live, unrevoked token of this service, and
    exactly `{"active": false}` for anything else: expired, revoked, used up, foreign or garbage."""
    try:
        claims = decode_token(body.token)
    except jwt.InvalidTokenError:
        return Introspection(active=False)
    if claims.sub not in USERS or await token_revoked(claims):
        return Introspection(active=False)
    token_type: Literal["Bearer"] | None = "Bearer" if claims.type == "access" else None
    claimed = claims.model_dump(include={"sub", "exp", "iat", "jti"})
    return Introspection(
        active=True, token_type=token_type, token_use=claims.type, username=claims.sub, **claimed
    )


@app.get(
    "/.well-known/oauth-authorization-server", summary="Where OAuth2 clients find the endpoints (RFC 8414)"
)
async def server_metadata(request: Request) -> ServerMetadata:
    """Public clients only: no client secret is needed or checked."""
    no_client_auth = ["none"]
    return ServerMetadata(
        issuer=str(request.base_url).rstrip("/"),
        token_endpoint=str(request.url_for("login_for_access_token")),
        revocation_endpoint=str(request.url_for("revoke_token")),
        introspection_endpoint=str(request.url_for("introspect")),
        grant_types_supported=["password", "refresh_token"],
        # REQUIRED (RFC 8414), though this server has no authorization endpoint: "none" is the
        # registered response type that issues nothing (OAuth 2.0 Multiple Response Types).
        response_types_supported=["none"],
        token_endpoint_auth_methods_supported=no_client_auth,
        revocation_endpoint_auth_methods_supported=no_client_auth,
        introspection_endpoint_auth_methods_supported=no_client_auth,
    )


# --- Token status, limit status and health ---


class TokenStatus(BaseModel):
    revoked: bool
    expired: bool


@app.get(
    "/is_token_revoked",
    summary="Check whether a token has been revoked",
    responses=error_responses(401, 422, 429, 503),
)
@limiter.limit(settings.rate_limit_anonymous)
async def is_token_revoked(
    request: Request, token: Annotated[str, Query(min_length=1, max_length=MAX_TOKEN_CHARS)]
) -> TokenStatus:
    """For a token this service signed. Once a token has expired, the store forgets whether it was
    revoked (nothing it blocked can be used any more), so it reports `revoked: false, expired: true`."""
    try:
        claims = decode_token(token, allow_expired=True)
    except jwt.InvalidTokenError:
        raise bearer_error("Not a token issued by this service") from None
    if claims.exp <= time.time():
        return TokenStatus(revoked=False, expired=True)
    return TokenStatus(revoked=await token_revoked(claims), expired=False)


class EndpointLimit(BaseModel):
    limit: int
    remaining: int
    reset: int


class RateLimitStatus(BaseModel):
    plan: Plan
    endpoints: dict[str, EndpointLimit]


@functools.cache
def plan_limited_paths(plan: Plan) -> tuple[str, ...]:
    """The routes tagged PLAN_LIMITED, less those this plan can only get a 403 from, by path."""
    routes = [route for route in app.routes if isinstance(route, APIRoute) and PLAN_LIMITED in route.tags]
    premium = [route for route in routes if any(d.dependency is require_premium for d in route.dependencies)]
    return tuple(sorted(route.path for route in routes if plan is not Plan.FREE or route not in premium))


@app.get(
    "/rate-limit-status",
    summary="Your plan and what is left of each limit",
    responses=error_responses(401, 503),
)
async def rate_limit_status(request: Request, user: CurrentUser) -> RateLimitStatus:
    """Reads the window of every endpoint your plan can call, without consuming from it. `reset`
    is the first epoch second with room; an unused window has room now, so it says the next one."""
    limit, paths = limits.parse(PLAN_LIMITS[user.plan]), plan_limited_paths(user.plan)
    counted_at = request.scope.get("root_path", "")  # SlowAPI's paths include a proxy's prefix
    keys = [limit.key_for(user.username, counted_at + path) for path in paths]
    windows = await asyncio.gather(*(read_window(key, limit.amount, limit.get_expiry()) for key in keys))
    endpoints = {
        path: EndpointLimit(limit=w.limit, remaining=w.remaining, reset=first_second_with_room(w.reset))
        for path, w in zip(paths, windows, strict=True)
    }
    return RateLimitStatus(plan=user.plan, endpoints=endpoints)


class HealthOut(BaseModel):
    status: Literal["ok"]
    store: Literal["redis", "embedded"]


@app.get("/health", summary="Liveness and store reachability", responses=error_responses(503))
async def health() -> HealthOut:
    """200 when the store answers, 503 when it does not. Never rate-limited."""
    await store.ping()
    return HealthOut(status="ok", store="redis" if settings.redis_uri else "embedded")


# --- Writes that survive a failover; closing the store ---

# A store with replicas (Sentinel) acknowledges a revocation only once a replica has it.
REPLICAS_TO_CONFIRM = 1 if settings.redis_uri.startswith(SENTINEL_SCHEME) else 0
REPLICA_WAIT_MS = 500


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


async def warn_if_redis_may_evict() -> None:
    """A Redis full under `maxmemory` makes room by its policy: allkeys-* evicts revocations (a
    logged-out token works again), volatile-* the rate-limit windows first. The app needs
    noeviction, under which a full Redis refuses writes and the app answers 503: it fails closed."""
    try:
        policy = (await store.config_get("maxmemory-policy")).get("maxmemory-policy", "noeviction")
    except STORE_ERRORS:  # CONFIG is often not allowed (managed Redis, fakeredis); Redis may be down
        return
    if policy != "noeviction":
        logger.warning("Redis maxmemory-policy is %s: it may evict revocations; set it to noeviction", policy)


LIFETIME_KEY = "settings:access_token_lifetime"


async def refuse_other_token_lifetimes() -> None:
    """Apps sharing a Redis must agree on ACCESS_TOKEN_EXPIRE_MINUTES: a logout's entry lasts as
    long as the access tokens of the app that wrote it, so an app with a longer setting would
    accept its own revoked tokens again once the entry is gone. The first app to start records its
    setting; one with another refuses to start. (To change it: stop them all, DEL the key.)"""
    try:
        recorded = await store.set(LIFETIME_KEY, ACCESS_TOKEN_LIFETIME, nx=True, get=True)
    except STORE_ERRORS:  # Redis is down: the app starts, and answers 503 until it is back
        return
    if recorded is not None and int(recorded) != ACCESS_TOKEN_LIFETIME:
        await close_store()  # the app stops here: leave no connection behind for the next loop
        problem = f"is {ACCESS_TOKEN_LIFETIME // 60}, but apps on this Redis use {int(recorded) // 60}"
        raise RuntimeError(f"{REFUSAL}\n  ACCESS_TOKEN_EXPIRE_MINUTES: {problem} (key {LIFETIME_KEY})")


async def close_store() -> None:
    # Connections belong to this event loop; the next one (a new test client) opens its own.
    await store.aclose()
    # Behind Sentinel, the client also holds one connection to each sentinel it asks.
    sentinels = getattr(getattr(store, "connection_pool", None), "sentinel_manager", None)
    for sentinel in sentinels.sentinels if sentinels else []:
        await sentinel.aclose()


# --- Logs that clients cannot abuse ---


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


class OneLineASecond(logging.Filter):
    """At most one line a second of each message: clients can make the app log at will (a revoked
    token, a 429, a 503 during an outage). The next line that passes counts those held back."""

    def __init__(self) -> None:
        super().__init__()
        self.next_line_at: dict[str, float] = {}
        self.held_back: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        template, now = str(record.msg), record.created
        if now < self.next_line_at.get(template, 0.0):
            self.held_back[template] += 1
            return False
        self.next_line_at[template] = now + 1
        if held_back := self.held_back.pop(template, 0):
            record.msg = f"{template} (and {held_back} more since the last such line)"
        return True


client_log_limit = OneLineASecond()
client_log.addFilter(client_log_limit)
for uvicorn_logger in ("uvicorn.access", "uvicorn.error"):
    logging.getLogger(uvicorn_logger).addFilter(SafeRequestLines())
# SlowAPI logs every exceeded limit with the client's key unescaped; rate_limit_exceeded() logs the
# same event safely, so keep only SlowAPI's errors.
logging.getLogger("slowapi").setLevel(logging.ERROR)

# SlowAPI also reads RATELIMIT_* settings of its own, from the environment and .env (with its own
# parser), over the arguments above: RATELIMIT_ENABLED=false would switch every limit off. This
# app's limits are set in code and by RATE_LIMIT_*, so it refuses to start while SlowAPI sees any.
seen_by_slowapi = {*limiter.app_config.environ, *limiter.app_config.file_values}
if its_own := sorted(name for name in seen_by_slowapi if name.startswith("RATELIMIT_")):
    names = ascii(", ".join(its_own))[1:-1]  # escaped: a name can hold control characters
    raise SystemExit(f"{REFUSAL}\n  {names}: SlowAPI would read these; remove them (see RATE_LIMIT_*)")
