"""JWT login, per-plan rate limits with SlowAPI, and token revocation on Redis, in one FastAPI file.

Read it top to bottom: settings, users and plans, passwords, tokens, the revocation store, rate
limits, the app with its cleanup task, then the endpoints. Run it with `uvicorn main:app`: with no
REDIS_URI set it keeps its state in an embedded, in-process fake Redis; set REDIS_URI (and
SECRET_KEY) to share state between workers. Modelled on FastAPI's security tutorial and SlowAPI's
docs.
"""

import asyncio
import functools
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar

import bcrypt
import fakeredis
import jwt
import limits
import limits.aio.storage
import limits.aio.strategies
import limits.storage
import redis.asyncio
import redis.asyncio.retry
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import OAuth2PasswordBearer
from greenlet import getcurrent, greenlet
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# A child of uvicorn's logger, so these lines share its handler, format and level.
logger = logging.getLogger("uvicorn.app")


# --- Settings ---

# Words that only a hand-written or copied example key contains (compared in lower case).
PLACEHOLDER_WORDS = ("change", "secret", "example", "placeholder")
MIN_DISTINCT_SECRET_CHARS = 10
GENERATE_SECRET = "python3 -c 'import secrets; print(secrets.token_urlsafe(64))'"


class Settings(BaseModel):
    """Configuration, read once from environment variables (upper-case field names)."""

    # hide_input_in_errors: a rejected SECRET_KEY must not end up in the startup log.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    redis_uri: str = ""
    secret_key: SecretStr | None = None
    access_token_expire_minutes: PositiveInt = 15
    refresh_token_expire_minutes: PositiveInt = 7 * 24 * 60
    cleanup_interval_seconds: PositiveFloat = 60
    rate_limit_free: str = "2/minute"
    rate_limit_premium: str = "10/minute"
    rate_limit_admin: str = "9999/minute"
    rate_limit_anonymous: str = "20/minute"
    rate_limit_login: str = "5/minute"

    @field_validator("redis_uri")
    @classmethod
    def _usable_redis_uri(cls, value: str) -> str:
        if not value:
            return value
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix:// (or be empty)")
        try:
            # Building a connection object (it does not connect) checks every part that redis-py
            # reads: host, port, database and options. `from None`: its message may hold a password.
            redis.asyncio.ConnectionPool.from_url(value).make_connection()
        except (ValueError, TypeError):
            raise ValueError("is not a URL that redis-py accepts (check port, database, options)") from None
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

    @field_validator(
        "rate_limit_free",
        "rate_limit_premium",
        "rate_limit_admin",
        "rate_limit_anonymous",
        "rate_limit_login",
    )
    @classmethod
    def _one_rate_limit(cls, value: str) -> str:
        try:
            (limit,) = limits.parse_many(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a single rate limit like '10/minute'") from None
        if limit.amount < 1:
            raise ValueError(f"{value!r} allows no call at all; the smallest limit is 1")
        return value

    @model_validator(mode="after")
    def _key_and_store_go_together(self) -> "Settings":
        # Workers that share a Redis must sign and verify with the same key. And a fixed key without
        # a shared store would outlive the store's revocations: after a restart, or on another
        # worker, a logged-out token would be accepted again.
        if bool(self.redis_uri) != (self.secret_key is not None):
            raise ValueError("SECRET_KEY and REDIS_URI must be set together, or neither (embedded store)")
        return self

    @classmethod
    def from_environment(cls) -> "Settings":
        # An empty variable counts as unset, as in compose files and `.env` templates.
        return cls.model_validate(
            {name: value for name in cls.model_fields if (value := os.environ.get(name.upper()))}
        )


try:
    settings = Settings.from_environment()
except ValidationError as exc:
    problems = "\n".join(
        f"  {'.'.join(str(part) for part in error['loc']).upper() or 'SETTINGS'}: {error['msg']}"
        for error in exc.errors()
    )
    raise SystemExit(f"Refusing to start; fix these environment variables:\n{problems}") from None
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


def create_token(
    username: str, token_type: TokenType, session_id: str, now: float
) -> tuple[str, TokenClaims]:
    lifetime = ACCESS_TOKEN_LIFETIME if token_type == "access" else REFRESH_TOKEN_LIFETIME
    claims = TokenClaims(
        sub=username,
        iat=int(now),
        exp=int(now) + lifetime,
        jti=secrets.token_urlsafe(16),
        sid=session_id,
        type=token_type,
    )
    return jwt.encode(claims.model_dump(), SECRET_KEY, algorithm=ALGORITHM), claims


@functools.lru_cache(maxsize=4096)
def verified_claims(token: str) -> TokenClaims:
    """Check a token's signature and claims once: a client sends the same access token on every
    request for its whole lifetime. Failures raise, and lru_cache does not keep raised results."""
    payload = jwt.decode(
        token,
        SECRET_KEY,
        algorithms=[ALGORITHM],  # pinned: never let the token choose its own algorithm
        options={"verify_exp": False, "require": ["exp", "iat", "sub", "jti"]},
    )
    try:
        return TokenClaims.model_validate(payload)
    except ValidationError as exc:
        raise jwt.InvalidTokenError("unexpected claims") from exc


def decode_token(token: str, *, verify_exp: bool = True) -> TokenClaims:
    """The claims of a token this app signed; raises jwt.InvalidTokenError for anything else."""
    # Ours are short ASCII: refuse anything else before it costs a decode (or a cache lookup, which
    # hashes the whole string). A header of a megabyte would otherwise take ~50 ms of the loop.
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise jwt.InvalidTokenError("not a token of ours")
    claims = verified_claims(token)
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

# Two structures, both sized by what is revoked or alive, never by traffic:
# - "revoked", a sorted set. Member: a revoked access token's jti or a revoked session's sid.
#   Score: the epoch second after which nothing it blocks could be used anyway. Cleanup removes
#   entries by score, so it can never un-revoke a token that is still alive.
# - "refresh:<sid>", one string per live session: the jti of the session's one valid refresh
#   token, expiring with it. Refreshing overwrites it, which revokes every older refresh token of
#   the session at once (rotation), and makes presenting one of them detectable (reuse).
REVOKED_KEY = "revoked"
REFRESH_KEY_PREFIX = "refresh:"
# Fail fast while Redis is down: one immediate retry replaces a connection that went stale (after
# a Redis restart, say); past that the request gets a 503 instead of waiting on backoff.
REDIS_TIMEOUTS = {"socket_timeout": 2, "socket_connect_timeout": 2}

if settings.redis_uri:
    store: redis.asyncio.Redis = redis.asyncio.from_url(
        settings.redis_uri, retry=redis.asyncio.retry.Retry(NoBackoff(), 1), **REDIS_TIMEOUTS
    )
else:
    embedded_server = fakeredis.FakeServer()
    store = fakeredis.FakeAsyncRedis(server=embedded_server)


def refresh_key(session_id: str) -> str:
    return REFRESH_KEY_PREFIX + session_id


def session_revocation_deadline(now: float) -> int:
    # A session's entry blocks its access tokens (its refresh token is blocked by deleting its
    # record, which also stops any new ones being minted), and each of those was minted by now.
    return int(now) + ACCESS_TOKEN_LIFETIME


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


async def revoke_access_token(claims: TokenClaims) -> None:
    # GT: revoking again may lengthen an entry, never shorten it.
    await store.zadd(REVOKED_KEY, {claims.jti: claims.exp}, gt=True)


async def revoke_session(session_id: str, now: float) -> None:
    """Revoke every token of a login: its access tokens by sid, its refresh token by deletion."""
    async with store.pipeline(transaction=False) as pipe:
        pipe.zadd(REVOKED_KEY, {session_id: session_revocation_deadline(now)}, gt=True)
        pipe.delete(refresh_key(session_id))
        await pipe.execute()


async def is_revoked(claims: TokenClaims) -> bool:
    if claims.type == "refresh":
        return await store.get(refresh_key(claims.sid)) != claims.jti.encode()
    token_until, session_until = await store.zmscore(REVOKED_KEY, [claims.jti, claims.sid])
    return token_until is not None or session_until is not None


async def remove_expired_revocations(now: float) -> int:
    """Drop entries whose tokens have all expired; returns how many were removed."""
    return await store.zremrangebyscore(REVOKED_KEY, "-inf", f"({int(now)}")


# --- Rate limits ---

# SlowAPI is synchronous: it picks keys, counts and raises RateLimitExceeded in plain function
# calls, and waits for Redis through a sync `limits` storage. Rather than give it a thread (a GIL
# hand-off per call), count_call() runs it in a greenlet on the event loop's own thread, the
# technique of SQLAlchemy's asyncio support: the storage SlowAPI is given hands each Redis command
# back to greenlet_spawn() as a coroutine of `limits`' async storage (on the store's connections),
# which awaits it on the loop and resumes SlowAPI with the answer. One thread, no blocking call,
# SlowAPI unchanged; while a count waits for Redis, the loop serves other requests as at any await.
# headers_enabled=False because SlowAPI's own headers carry a fractional X-RateLimit-Reset and a
# Retry-After that can be a second early; rate_limit_headers() below writes exact ones.
T = TypeVar("T")


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


class AsyncBridgeStorage(limits.storage.Storage, limits.storage.MovingWindowSupport):
    """The sync `limits` storage that SlowAPI counts with, doing its I/O through an async one.

    `limits` registers it under its URI scheme, so SlowAPI builds it from its public settings:
    Limiter(storage_uri="async-bridge://", storage_options={"storage": ...}). The moving window
    calls only acquire_entry(); the other methods are abstract in Storage, so they forward too.
    """

    STORAGE_SCHEME = ["async-bridge"]  # noqa: RUF012 (a list, as limits declares it)

    def __init__(self, uri: str, *, storage: limits.aio.storage.RedisStorage) -> None:
        super().__init__(uri)
        self.storage = storage

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return self.storage.base_exceptions

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return await_only(self.storage.acquire_entry(key, limit, expiry, amount))

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        return await_only(self.storage.get_moving_window(key, limit, expiry))

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return await_only(self.storage.incr(key, expiry, amount))

    def get(self, key: str) -> int:
        return await_only(self.storage.get(key))

    def get_expiry(self, key: str) -> float:
        return await_only(self.storage.get_expiry(key))

    def check(self) -> bool:
        return await_only(self.storage.check())

    def reset(self) -> int | None:
        return await_only(self.storage.reset())

    def clear(self, key: str) -> None:
        await_only(self.storage.clear(key))


limits_storage = limits.aio.storage.RedisStorage(
    "async+redis://", implementation="redispy", connection_pool=store.connection_pool
)
limiter = Limiter(
    key_func=get_remote_address,
    strategy="moving-window",
    storage_uri="async-bridge://",
    storage_options={"storage": limits_storage},
    headers_enabled=False,
)
window_reader = limits.aio.strategies.MovingWindowRateLimiter(limits_storage)

TIMESTAMP_TOLERANCE = 0.001  # seconds


@dataclass(frozen=True)
class WindowState:
    limit: int
    remaining: int
    reset: float  # epoch seconds when the oldest hit in the window leaves it (inclusive)

    @property
    def next_second(self) -> int:
        """The first whole epoch second at which the window has room again."""
        return self.whole_seconds_after(0.0)

    def whole_seconds_after(self, now: float) -> int:
        """Whole seconds from `now` until the window has room again, never early.

        The window still holds a hit at exactly `reset`, hence floor() + 1 rather than ceil().
        Timestamps make a round trip through Redis as text, so allow for a last-digit difference.
        """
        return math.floor(self.reset - now + TIMESTAMP_TOLERANCE) + 1


async def window_state(limit: limits.RateLimitItem, *identifiers: str) -> WindowState:
    """Read a moving window without consuming from it."""
    stats = await window_reader.get_window_stats(limit, *identifiers)
    return WindowState(limit=limit.amount, remaining=stats.remaining, reset=stats.reset_time)


async def rate_limit_headers(request: Request, *, retry_after: bool = False) -> dict[str, str]:
    """The X-RateLimit-* headers (and Retry-After for a 429) of the limit SlowAPI just checked."""
    limit, identifiers = request.state.view_rate_limit
    state = await window_state(limit, *identifiers)
    headers = {
        "X-RateLimit-Limit": str(state.limit),
        "X-RateLimit-Remaining": str(state.remaining),
        "X-RateLimit-Reset": str(state.next_second),
    }
    if retry_after:
        headers["Retry-After"] = str(max(1, state.whole_seconds_after(time.time())))
    return headers


async def count_call(count: Callable[[Request], None], request: Request) -> dict[str, str]:
    """Run a SlowAPI-decorated counter; return the headers of its limit.

    Raises RateLimitExceeded when the call is over the limit.
    """
    await greenlet_spawn(count, request)
    return await rate_limit_headers(request)


def user_rate_limit_key(request: Request) -> str:
    return request.state.user.username


# One counter per plan, each with its own limit, picked by the user's plan on every request.
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


# --- Request models and dependencies ---


class ErrorOut(BaseModel):
    detail: str


class LoginForm(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=72)

    @field_validator("password")
    @classmethod
    def _fits_bcrypt(cls, value: str) -> str:
        # bcrypt reads at most 72 bytes; refuse longer passwords rather than silently cut them.
        if len(value.encode()) > 72:
            raise ValueError("must be at most 72 bytes in UTF-8")
        return value


class RefreshIn(BaseModel):
    refresh_token: str = Field(min_length=1, max_length=MAX_TOKEN_CHARS)


class RevokeIn(BaseModel):
    token: str = Field(min_length=1, max_length=MAX_TOKEN_CHARS)


FORM_TYPE = "application/x-www-form-urlencoded"


async def login_form(request: Request) -> LoginForm:
    """Credentials from a JSON body (curl) or an OAuth2 password form (Swagger UI's Authorize)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type == "application/json":
            data: Any = await request.json()
        elif content_type == FORM_TYPE:
            data = dict(await request.form())
        else:
            raise HTTPException(
                status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, detail=f"Send application/json or {FORM_TYPE}"
            )
    except ValueError:  # also what json raises for a malformed body
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="Request body is malformed") from None
    try:
        form = LoginForm.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    request.state.login_username = form.username  # the login limit's key reads it
    return form


def login_rate_limit_key(request: Request) -> str:
    # No IP address contains "|", so no two (IP, username) pairs share a key: with ":", the IPv6
    # address 2001:db8::1 and username 5:jane would share one with 2001:db8::1:5 and jane.
    return f"{get_remote_address(request)}|{request.state.login_username}"


# SlowAPI checks stacked limits top to bottom and stops at the first one exceeded: the per-IP limit
# goes first, so a client it refuses creates no per-username key for each name it tries.
@limiter.limit(settings.rate_limit_login, key_func=login_rate_limit_key)
@limiter.limit(settings.rate_limit_anonymous)
def count_login(request: Request) -> None:
    """SlowAPI counts a login attempt here, per client IP and per IP + username."""


async def rate_limited_login_form(
    request: Request, response: Response, form: Annotated[LoginForm, Depends(login_form)]
) -> LoginForm:
    response.headers.update(await count_call(count_login, request))
    return form


LimitedLoginForm = Annotated[LoginForm, Depends(rate_limited_login_form)]


@limiter.limit(settings.rate_limit_anonymous)
def count_anonymous_call(request: Request) -> None:
    """SlowAPI counts a call to an endpoint that needs no login here, per client IP."""


async def ip_rate_limit(request: Request, response: Response) -> None:
    response.headers.update(await count_call(count_anonymous_call, request))


IpRateLimit = Depends(ip_rate_limit)

oauth2_scheme = OAuth2PasswordBearer(tokenUrl="token", auto_error=False)


async def access_claims(token: Annotated[str | None, Depends(oauth2_scheme)]) -> TokenClaims:
    """The claims of a valid, unrevoked access token, or the 401 that says what is wrong."""
    if token is None:
        raise bearer_error("Not authenticated", invalid_token=False)
    claims = verify_token(token, "access")
    if await is_revoked(claims):
        logger.warning("revoked token used: sub=%s jti=%s", claims.sub, claims.jti)
        raise bearer_error("Token has been revoked")
    return claims


AccessClaims = Annotated[TokenClaims, Depends(access_claims)]


async def current_user(request: Request, token: Annotated[str | None, Depends(oauth2_scheme)]) -> User:
    # Calls access_claims() itself rather than depending on it: on this hot path, each level of
    # dependency costs FastAPI more than the call does.
    claims = await access_claims(token)
    user = USERS.get(claims.sub)
    if user is None:
        raise bearer_error("Unknown user")
    request.state.user = user  # the plan limit's key function reads it from here
    return user


CurrentUser = Annotated[User, Depends(current_user)]


async def plan_limited_user(request: Request, response: Response, user: CurrentUser) -> User:
    response.headers.update(await count_call(PLAN_COUNTERS[user.plan], request))
    return user


PlanLimitedUser = Annotated[User, Depends(plan_limited_user)]


async def require_premium(user: CurrentUser) -> None:
    if user.plan is Plan.FREE:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"This endpoint needs the premium or admin plan; yours is {user.plan.value}",
        )


# --- App, lifespan and cleanup task ---


class RedactQueries(logging.Filter):
    """Drops query strings from uvicorn's access log: GET /is_token_revoked carries a token there,
    and a client can spell its name any way it likes (`tok%65n=`), so no pattern could catch it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                arg.partition("?")[0] + "?[redacted]" if isinstance(arg, str) and "?" in arg else arg
                for arg in record.args
            )
        return True


logging.getLogger("uvicorn.access").addFilter(RedactQueries())
# SlowAPI logs every exceeded limit with the client's key unescaped; rate_limit_exceeded() below
# logs the same event safely, so keep only SlowAPI's errors.
logging.getLogger("slowapi").setLevel(logging.ERROR)


def error_response(status_code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


class BodySizeLimit:
    """Refuses request bodies over max_bytes with a JSON 413, whether or not they declare a length.

    (Starlette's own RequestBodyLimitMiddleware answers in plain text; every error here is JSON.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):  # bodies nobody reads
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await error_response(status.HTTP_413_CONTENT_TOO_LARGE, "Content Too Large")(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail="Content Too Large")
            return message

        await self.app(scope, counting_receive, send)


async def cleanup_revocations_forever(interval: float, stopping: asyncio.Event) -> None:
    """Every `interval` seconds, drop the revocations whose tokens have all expired."""
    while not stopping.is_set():
        await asyncio.sleep(interval)
        try:
            removed = await remove_expired_revocations(time.time())
        except RedisError as exc:
            # The store may be down for a while: try again next tick. (A cancellation that lands
            # inside a redis-py command can surface here as a ConnectionError; `stopping` ends
            # the loop then.)
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
        await asyncio.gather(cleanup, return_exceptions=True)
        # Connections belong to this event loop; the next one (a new test client) opens its own.
        await store.connection_pool.disconnect()


app = FastAPI(
    title="fastapi-users-slowapi",
    summary="JWT login, per-plan rate limits with SlowAPI, and token revocation on Redis.",
    lifespan=lifespan,
)
app.state.limiter = limiter
app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)


@app.exception_handler(RedisError)
async def store_unavailable(request: Request, exc: RedisError) -> JSONResponse:
    # Fail closed: without the store, no token can be checked for revocation and no limit counted.
    logger.error("store unavailable on %s %r: %r", request.method, request.url.path, exc)
    return error_response(status.HTTP_503_SERVICE_UNAVAILABLE, "Token store unavailable; try again shortly")


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default 422 echoes each rejected value as "input": a token or a password, sent back
    # in the response (and unencodable, a 500, when it holds a lone surrogate like "\ud800").
    errors = [{key: error[key] for key in ("type", "loc", "msg")} for error in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


@app.exception_handler(RateLimitExceeded)
async def rate_limit_exceeded(request: Request, exc: RateLimitExceeded) -> JSONResponse:
    try:
        headers = await rate_limit_headers(request, retry_after=True)
    except RedisError as store_error:
        return await store_unavailable(request, store_error)
    _, (key, scope) = request.state.view_rate_limit
    logger.warning("rate limit %s exceeded on %s by %r", exc.detail, scope, key)
    return error_response(status.HTTP_429_TOO_MANY_REQUESTS, f"Rate limit exceeded: {exc.detail}", headers)


# --- Endpoints: tokens ---


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Seconds until the access token expires")


class RevokedOut(BaseModel):
    revoked: bool


class TokenStatus(BaseModel):
    revoked: bool
    expired: bool


class MessageOut(BaseModel):
    message: str


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorOut} for code in codes}


def mint_token_pair(username: str, session_id: str) -> tuple[TokenPair, TokenClaims]:
    """A new access and refresh token for a session, and the refresh token's claims."""
    now = time.time()
    access_token, _ = create_token(username, "access", session_id, now)
    refresh_token, refresh_claims = create_token(username, "refresh", session_id, now)
    pair = TokenPair(access_token=access_token, refresh_token=refresh_token, expires_in=ACCESS_TOKEN_LIFETIME)
    return pair, refresh_claims


LOGIN_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["username", "password"],
    "properties": {
        "username": {"type": "string", "minLength": 1, "maxLength": 64},
        "password": {"type": "string", "minLength": 1, "maxLength": 72, "format": "password"},
    },
}


@app.post(
    "/token",
    summary="Log in: trade a username and password for an access and a refresh token",
    responses={**errors(400, 401, 413, 415, 429, 503), 422: {"description": "Validation Error"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": LOGIN_BODY_SCHEMA},
                FORM_TYPE: {"schema": LOGIN_BODY_SCHEMA},
            },
        }
    },
)
async def login(form: LimitedLoginForm) -> TokenPair:
    """Accepts JSON or an OAuth2 password form. Limited per client IP and per IP + username."""
    user = await authenticate_user(form.username, form.password)
    if user is None:
        logger.warning("failed login for username %r", form.username)
        raise bearer_error("Incorrect username or password", invalid_token=False)
    pair, refresh_claims = mint_token_pair(user.username, session_id=secrets.token_urlsafe(16))
    await start_session(refresh_claims)
    return pair


@app.post(
    "/refresh",
    summary="Trade a refresh token for a new token pair",
    responses=errors(400, 401, 413, 429, 503),
    dependencies=[IpRateLimit],
)
async def refresh(body: RefreshIn) -> TokenPair:
    """The refresh token is used up. Presenting it again revokes its whole session."""
    claims = verify_token(body.refresh_token, "refresh")
    pair, successor = mint_token_pair(claims.sub, claims.sid)
    if not await rotate_refresh_token(claims, successor):
        await revoke_session(claims.sid, time.time())
        # Either reuse of a rotated token (theft, or a client bug) or a session already revoked.
        logger.warning("stale refresh token, session revoked: sub=%s sid=%s", claims.sub, claims.sid)
        raise bearer_error("Refresh token has been revoked")
    return pair


@app.post("/logout", summary="Log out: revoke every token of this session", responses=errors(401, 503))
async def logout(claims: AccessClaims) -> MessageOut:
    """Revokes the access token used here and the refresh token of the same login. Never rate-limited."""
    await revoke_session(claims.sid, time.time())
    return MessageOut(message="Logged out")


def claims_of_presented_token(token: str) -> TokenClaims:
    """The claims of a token presented for revocation or inspection, expired or not."""
    try:
        return decode_token(token, verify_exp=False)
    except jwt.InvalidTokenError:
        raise bearer_error("Not a token issued by this service") from None


@app.post(
    "/revoke",
    summary="Revoke a token you hold",
    responses=errors(400, 401, 413, 429, 503),
    dependencies=[IpRateLimit],
)
async def revoke_token(body: RevokeIn) -> RevokedOut:
    """Holding a token is the authority to revoke it (as in RFC 7009). A refresh token takes its
    whole session with it. Revoking an expired or already revoked token succeeds and changes nothing."""
    claims = claims_of_presented_token(body.token)
    now = time.time()
    if claims.exp > now:
        if claims.type == "refresh":
            await revoke_session(claims.sid, now)
        else:
            await revoke_access_token(claims)
    return RevokedOut(revoked=True)


@app.get(
    "/is_token_revoked",
    summary="Check whether a token has been revoked",
    responses=errors(401, 429, 503),
    dependencies=[IpRateLimit],
)
async def is_token_revoked(
    token: Annotated[str, Query(min_length=1, max_length=MAX_TOKEN_CHARS)],
) -> TokenStatus:
    """For a token this service signed. Once a token has expired, the store forgets whether it was
    revoked (nothing it blocked can be used any more), so it reports `revoked: false, expired: true`."""
    claims = claims_of_presented_token(token)
    if claims.exp <= time.time():
        return TokenStatus(revoked=False, expired=True)
    return TokenStatus(revoked=await is_revoked(claims), expired=False)


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


PLAN_LIMITED_PATHS = ("/plan-limited-endpoint", "/premium-only-endpoint", "/users/me")


@app.get(
    "/plan-limited-endpoint",
    summary="An endpoint limited by the caller's plan",
    responses=errors(401, 429, 503),
)
async def plan_limited(user: PlanLimitedUser) -> MessageOut:
    """Each user gets their plan's number of calls in any rolling window."""
    return MessageOut(message=f"Hello {user.username}, you are on the {user.plan.value} plan")


@app.get(
    "/premium-only-endpoint",
    summary="An endpoint for the premium and admin plans",
    responses=errors(401, 403, 429, 503),
    dependencies=[Depends(require_premium)],  # route dependencies run first: a 403 costs no quota
)
async def premium_only(user: PlanLimitedUser) -> MessageOut:
    """Free users get a 403 that names their plan."""
    return MessageOut(message=f"Welcome to the premium area, {user.username}")


@app.get("/users/me", summary="The logged-in user", responses=errors(401, 429, 503))
async def read_me(user: PlanLimitedUser) -> UserOut:
    return UserOut(username=user.username, full_name=user.full_name, plan=user.plan)


@app.get("/rate-limit-status", summary="Your plan and what is left of each limit", responses=errors(401, 503))
async def rate_limit_status(user: CurrentUser) -> RateLimitStatus:
    """Reads every plan-limited endpoint's window without consuming from it."""
    limit = PLAN_LIMITS[user.plan]
    states = await asyncio.gather(*(window_state(limit, user.username, path) for path in PLAN_LIMITED_PATHS))
    endpoints = {
        path: EndpointLimit(limit=state.limit, remaining=state.remaining, reset=state.next_second)
        for path, state in zip(PLAN_LIMITED_PATHS, states, strict=True)
    }
    return RateLimitStatus(plan=user.plan, endpoints=endpoints)


# --- Endpoints: health ---


class HealthOut(BaseModel):
    status: Literal["ok"]
    store: Literal["redis", "embedded"]


@app.get("/health", summary="Liveness and store reachability", responses=errors(503))
async def health() -> HealthOut:
    """200 when the store answers, 503 when it does not. Never rate-limited."""
    await store.ping()
    return HealthOut(status="ok", store="redis" if settings.redis_uri else "embedded")
