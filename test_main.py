"""Tests for main.py, in the order main.py tells its story: settings, logging in (and the backoff
against password guessing), tokens, the store, refresh rotation, logout and revocation, the cleanup
task, rate limits, the endpoints; then Part 2's machinery, in its order. Each behaviour has one
`# --- heading ---`, and every test of it is under that heading. Helpers and fixtures that several
sections use come first; a section's own come at its head. Last come the tests that need a real
Redis, cluster or Sentinel, and those that run the README's commands against uvicorn. The tests run
on the embedded fake Redis, or on a real one when REDIS_URI is set."""

import ast
import asyncio
import base64
import functools
import gc
import importlib.metadata
import itertools
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import bcrypt
import fakeredis
import greenlet
import httpx2
import jwt
import pytest
import redis
import redis.asyncio
import redis.cluster
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError
from redis.exceptions import ClusterDownError
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.requests import Request
from starlette.types import Message
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

import main

# --- Helpers and fixtures ---

HERE = Path(__file__).parent
PASSWORDS = {"john_doe": "password123", "jane_doe": "password456", "admin_doe": "password789"}
WAIT_SECONDS = 15  # the bound on every wait in these tests
EMBEDDED_ONLY = pytest.mark.skipif(bool(main.settings.redis_uri), reason="switches the embedded store off")
CLUSTER = isinstance(main.store, redis.asyncio.RedisCluster)
# What the store's connections are made of (a cluster's nodes use redis-py's plain one).
STORE_CONNECTION_CLASS = redis.asyncio.Connection if CLUSTER else main.store.connection_pool.connection_class
STORE_DOWN = {"detail": "Token store unavailable; try again shortly"}
NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}


# The app in-process, with its lifespan running; cheap password hashes; a clock to move by hand.


@pytest.fixture(scope="session")
def cheap_hashes() -> dict[str, bytes]:
    """Cost-4 hashes of the same passwords: the app keeps cost 12, the suite stays fast."""
    salt = bcrypt.gensalt(4)
    return {name: bcrypt.hashpw(password.encode(), salt) for name, password in PASSWORDS.items()}


@pytest.fixture(autouse=True)
def fast_logins(monkeypatch: pytest.MonkeyPatch, cheap_hashes: dict[str, bytes]) -> None:
    for name, password_hash in cheap_hashes.items():
        monkeypatch.setitem(main.USERS, name, replace(main.USERS[name], password_hash=password_hash))
    monkeypatch.setattr(main, "DUMMY_HASH", bcrypt.hashpw(b"dummy", bcrypt.gensalt(4)))


@pytest.fixture(autouse=True)
def fresh_client_log_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the first line of each kind it causes (one a second would hide them)."""
    monkeypatch.setattr(main, "client_log_limit", main.OneLineASecond())
    monkeypatch.setattr(main.client_log, "filters", [main.client_log_limit])


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(main.app) as test_client:
        test_client.portal.call(main.store.flushdb)  # no test sees another's quota or revocations
        yield test_client


@pytest.fixture
def proxied_client() -> Iterator[TestClient]:
    """The app behind uvicorn's proxy-headers middleware, as `uvicorn main:app` runs it, called
    from 127.0.0.1, which uvicorn trusts: each request's X-Forwarded-For is its client address."""
    with TestClient(ProxyHeadersMiddleware(main.app), client=("127.0.0.1", 50000)) as test_client:
        test_client.portal.call(main.store.flushdb)
        yield test_client


class FakeClock:
    """Stands in for the `time` module in main and in the limits storages."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


# Fractions of a second that a timestamp's round trip through Redis as text can blur (which
# TIMESTAMP_TOLERANCE absorbs), and one late in the second.
@pytest.fixture(params=[0.25, 0.12344, 0.99], ids=["quarter", "odd-digits", "late-in-the-second"])
def clock(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock(int(time.time()) + request.param)
    monkeypatch.setattr(main, "time", fake)
    return fake


@pytest.fixture
def stopped_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """main's clock, stopped at the present: a test moves it on by hand."""
    fake = FakeClock(time.time())
    monkeypatch.setattr(main, "time", fake)
    return fake


# Calls, tokens, and what the app answers.


def login(client: TestClient, username: str = "jane_doe", password: str | None = None) -> dict[str, Any]:
    r = client.post("/token", json={"username": username, "password": password or PASSWORDS[username]})
    assert r.status_code == 200, r.text
    return r.json()


def used_up_refresh_token(client: TestClient) -> str:
    """A refresh token two rotations old: past any grace, whatever the clock."""
    token = login(client)["refresh_token"]
    successor = client.post("/refresh", json={"refresh_token": token}).json()["refresh_token"]
    assert client.post("/refresh", json={"refresh_token": successor}).status_code == 200
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def mint(
    token_type: main.TokenType = "access", *, username: str = "jane_doe", now: float | None = None
) -> str:
    token, _ = main.create_token(username, token_type, "session-1", time.time() if now is None else now)
    return token


def call_statuses(client: TestClient, token: str, times: int, path: str = "/users/me") -> list[int]:
    return [client.get(path, headers=bearer(token)).status_code for _ in range(times)]


def oauth2_error(detail: str, error: str) -> dict[str, str]:
    """The body of an error from the OAuth2 endpoints: `detail`, and RFC 6749's fields beside it."""
    return {"detail": detail, "error": error, "error_description": detail}


def rate_headers(r: Any) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("x-ratelimit") or k == "retry-after"}


def no_store_headers(r: Any) -> dict[str, str]:
    return {name: r.headers.get(name) for name in NO_STORE}


async def call_app(path: str, query: bytes = b"", token: str = "") -> int:
    """One GET through the whole app, as uvicorn would make it: its status."""
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query, "headers": headers,
        "client": ("198.51.100.7", 1), "server": ("testserver", 80),
    }  # fmt: skip
    statuses = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await main.app(scope, receive, send)
    return statuses[0]


def log_record(logger: str, template: str, *args: Any) -> logging.LogRecord:
    """A line as `logger` hands it to its filters, before they have run."""
    return logging.LogRecord(logger, logging.INFO, __file__, 1, template, args, None)


# The store: read directly, or stopped.


def store_keys(client: TestClient, pattern: str = "*") -> list[bytes]:
    """KEYS, from every node of a cluster."""
    target = {"target_nodes": redis.asyncio.RedisCluster.PRIMARIES} if CLUSTER else {}
    return client.portal.call(lambda: main.store.keys(pattern, **target))


def revoked_entries(client: TestClient) -> dict[bytes, float]:
    """Every entry of every revoked:<n> set."""
    entries: dict[bytes, float] = {}
    for n in range(main.REVOKED_SETS):
        key = f"{main.REVOKED_KEY_PREFIX}{n}"
        entries.update(client.portal.call(lambda key=key: main.store.zrange(key, 0, -1, withscores=True)))
    return entries


def session_records(client: TestClient) -> dict[bytes, dict[bytes, bytes]]:
    """The refresh:<sid> records: session key -> its fields (jti, and previous and rotated_at)."""
    keys = store_keys(client, main.REFRESH_KEY_PREFIX + "*")
    return {key: client.portal.call(main.store.hgetall, key) for key in keys}


def everything_stored(client: TestClient) -> bytes:
    """Every key in the store and what it holds, as one byte string."""

    async def contents(key: bytes) -> list[bytes]:
        kind = await main.store.type(key)
        if kind == b"string":
            return [await main.store.get(key)]
        if kind == b"hash":
            return [b"%s=%s" % item for item in (await main.store.hgetall(key)).items()]
        if kind == b"zset":
            return [b"%s=%r" % item for item in await main.store.zrange(key, 0, -1, withscores=True)]
        if kind == b"list":
            return await main.store.lrange(key, 0, -1)
        raise AssertionError(f"a {kind!r} at {key!r}: read it here too")

    return b"\n".join(key + b" " + b" ".join(client.portal.call(contents, key)) for key in store_keys(client))


@contextmanager
def embedded_store_down() -> Iterator[None]:
    """The embedded store refuses every command until the block ends, even if an assert fails."""
    main.embedded_server.connected = False
    try:
        yield
    finally:
        main.embedded_server.connected = True


@pytest.fixture
def store_down(client: TestClient) -> Iterator[None]:
    with embedded_store_down():
        yield


# The app in a uvicorn process of its own.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.05)  # polls another process; no test waits for time to pass


def answers(url: str) -> bool:
    try:
        return httpx2.get(url, timeout=1).status_code == 200
    except httpx2.TransportError:
        return False


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()  # never leave a server behind; the test still fails
        raise


def environment_without_settings() -> dict[str, str]:
    return {
        name: value for name, value in os.environ.items() if name.lower() not in main.Settings.model_fields
    }


@contextmanager
def uvicorn_app(env: dict[str, str], *uvicorn_args: str, folder: Path = HERE) -> Iterator[str]:
    """`uvicorn main:app` in its own process, started in `folder` with `env`; yields its base URL."""
    port = free_port()
    uvicorn = [sys.executable, "-m", "uvicorn", "main:app", "--app-dir", str(HERE), "--log-level", "warning"]
    process = subprocess.Popen([*uvicorn, "--port", str(port), *uvicorn_args], cwd=folder, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(f"{base}/health") or process.poll() is not None, "the app to start")
        assert process.poll() is None, "the app exited at start"
        yield base
    finally:
        stop_process(process)


def default_app(folder: Path, *uvicorn_args: str) -> AbstractContextManager[str]:
    """The app on the embedded store with every setting at its default: started in `folder`,
    away from any .env of the project."""
    return uvicorn_app(environment_without_settings(), *uvicorn_args, folder=folder)


def http_login(base: str, username: str = "jane_doe") -> dict[str, Any]:
    r = httpx2.post(f"{base}/token", json={"username": username, "password": PASSWORDS[username]})
    assert r.status_code == 200, r.text
    return r.json()


# --- Settings ---


@pytest.fixture
def bare_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No setting in the environment, and a working directory of its own (no `.env` in it yet)."""
    for name in main.Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


GOOD_SECRET = "k3Q9vXr2LmT8wYp4ZsN6bHc1JfD7gUe5"  # 32 characters, 32 distinct
GOOD_URI = "redis://localhost:6379/0"
SLOWAPI_REFUSAL = "RATELIMIT_ENABLED: SlowAPI would read these; remove them (see RATE_LIMIT_*)"


def import_main_in(folder: Path, env: dict[str, str]) -> str:
    """What `import main` prints to stderr, failing, in `folder`, with only `env` as settings."""
    result = subprocess.run(
        [sys.executable, "-c", "import main"],
        cwd=folder,
        env={**environment_without_settings(), "PYTHONPATH": str(HERE), **env},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr
    return result.stderr


def refusal(problems: list[str]) -> str:
    return "Refusing to start; fix these settings (environment or .env):\n" + "".join(
        f"  {problem}\n" for problem in problems
    )


def test_settings_read_from_environment(monkeypatch: pytest.MonkeyPatch, bare_environment: Path) -> None:
    monkeypatch.setenv("RATE_LIMIT_FREE", "3/minute")
    monkeypatch.setenv("ACCESS_TOKEN_EXPIRE_MINUTES", "5")
    settings = main.Settings()
    assert (settings.rate_limit_free, settings.access_token_expire_minutes) == ("3/minute", 5)


def test_settings_read_a_dotenv_file(bare_environment: Path) -> None:
    (bare_environment / ".env").write_text("RATE_LIMIT_FREE=3/minute\nREDIS_PASSWORD=for-compose\n")
    assert main.Settings().rate_limit_free == "3/minute"


def test_environment_wins_over_the_dotenv_file(
    monkeypatch: pytest.MonkeyPatch, bare_environment: Path
) -> None:
    (bare_environment / ".env").write_text("RATE_LIMIT_FREE=3/minute\n")
    monkeypatch.setenv("RATE_LIMIT_FREE", "4/minute")
    assert main.Settings().rate_limit_free == "4/minute"


def test_env_example_copied_as_it_comes_runs_the_embedded_store(bare_environment: Path) -> None:
    example = (HERE / ".env.example").read_text()
    (bare_environment / ".env").write_text(example)
    assert main.Settings() == main.Settings(_env_file=None)  # every value the default
    assert (main.Settings().redis_uri, main.Settings().secret_key) == ("", None)


def test_settings_treat_empty_variables_as_unset(
    monkeypatch: pytest.MonkeyPatch, bare_environment: Path
) -> None:
    monkeypatch.setenv("SECRET_KEY", "")
    monkeypatch.setenv("REDIS_URI", "")
    settings = main.Settings()
    assert (settings.secret_key, settings.redis_uri) == (None, "")


def test_dotenv_refusals_name_the_variable(bare_environment: Path) -> None:
    (bare_environment / ".env").write_text("SECRET_KEY=change-me-to-a-long-random-string-of-64-chars\n")
    with pytest.raises(ValidationError) as error:
        main.Settings()
    assert [(e["loc"], e["msg"]) for e in error.value.errors()] == [
        (("secret_key",), f"Value error, is a placeholder; generate one: {main.GENERATE_SECRET}")
    ]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"secret_key": "too-short-Xy7"}, "must be at least 32 bytes"),
        ({"secret_key": "change-me-to-a-long-random-string-of-64-chars"}, "is a placeholder"),
        ({"secret_key": "CHANGE-ME-TO-A-LONG-RANDOM-STRING-OF-64-CHARS"}, "is a placeholder"),
        ({"secret_key": "a" * 32}, "repeats too few characters"),
        ({"secret_key": "ab" * 32}, "repeats too few characters"),
        ({"secret_key": "09d25e094faa6ca2556c818166b7a9563b93f7099f6f0f4caa6cf63b88e8d3e7"}, "is published"),
        ({"secret_key": "passwordpasswordpassword12345678"}, "is a placeholder"),
        ({"secret_key": "qwertyuiopasdfghjklzxcvbnm123456"}, "runs along the keyboard or the alphabet"),
        ({"secret_key": "0123456789abcdefghijklmnopqrstuv"}, "runs along the keyboard or the alphabet"),
        ({"secret_key": GOOD_SECRET[:26] + "uvwxyz"}, "runs along the keyboard or the alphabet"),
        ({"secret_key": GOOD_SECRET[:31] + "\u00e9"}, "must be printable ASCII"),  # printable, not ASCII
        ({"secret_key": "Xq7" + "asdfgh" + GOOD_SECRET[:30]}, "runs along the keyboard or the alphabet"),
        ({"secret_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq8v2 me@host"}, "is a public or private key"),
        (
            {"secret_key": "-----BEGIN PRIVATE KEY-----MIIEvQIBADANBgkqhkiG9w0B-----END PRIVATE KEY-----"},
            "is a public",
        ),
        ({"secret_key": " " * 32}, "must be printable ASCII"),
        ({"secret_key": GOOD_SECRET + " "}, "must be printable ASCII"),
        ({"secret_key": GOOD_SECRET + "\udcff"}, "must be printable ASCII"),  # a non-UTF-8 byte
        ({"redis_uri": GOOD_URI}, "SECRET_KEY and REDIS_URI must be set together"),
        ({"secret_key": GOOD_SECRET}, "SECRET_KEY and REDIS_URI must be set together"),
        ({"redis_uri": "http://localhost"}, "must start with one of redis://, rediss://, unix://"),
        ({"redis_uri": "redis://localhost:99999/0"}, "is not a URL that redis-py accepts"),
        ({"redis_uri": "redis://localhost:port/0"}, "is not a URL that redis-py accepts"),
        ({"redis_uri": "redis://localhost:6379/0?colour=blue"}, "is not a URL that redis-py accepts"),
        ({"redis_uri": "redis://localhost:6379/0?db=zero"}, "is not a URL that redis-py accepts"),
        ({"rate_limit_free": "lots"}, "is not a single rate limit"),
        ({"rate_limit_free": "2/minute;5/hour"}, "is not a single rate limit"),
        ({"rate_limit_free": "0/minute"}, "must allow from 1 to 10,000,000 calls"),
        ({"rate_limit_admin": "99999999999999999999/second"}, "must allow from 1 to 10,000,000 calls"),
        ({"rate_limit_premium": "1/1000000 year"}, "must have a window of at most a year"),
        ({"access_token_expire_minutes": "0"}, "greater than or equal to 1"),
        ({"refresh_token_expire_minutes": str(10**20)}, "less than or equal to 525600"),
        ({"refresh_grace_seconds": "61"}, "less than or equal to 60"),
        ({"cors_allow_origins": "https://app.example/"}, "must list origins like https://app.example.com"),
        ({"cors_allow_origins": "app.example"}, "must list origins like https://app.example.com"),
        (
            {"cors_allow_origins": "https://user@app.example"},
            "must list origins like https://app.example.com",
        ),
        ({"cors_allow_origins": "ftp://app.example"}, "must list origins like https://app.example.com"),
        ({"cors_allow_origins": "https://app.example?x=1"}, "must list origins like https://app.example.com"),
        ({"cors_allow_origins": "https://app.example#top"}, "must list origins like https://app.example.com"),
        ({"login_backoff_after": "0"}, "greater than or equal to 1"),
        ({"login_backoff_max_seconds": "0"}, "greater than or equal to 1"),
        ({"refresh_grace_seconds": "-1"}, "greater than or equal to 0"),
        ({"cleanup_interval_seconds": "inf"}, "finite number"),
        ({"cleanup_interval_seconds": "1e-300"}, "greater than or equal to 0.01"),
        ({"redis_uri": "redis://localhost:6379/-1"}, "is not a URL that redis-py accepts"),
        ({"redis_uri": "redis://localhost:6379/abc"}, "is not a URL that redis-py accepts"),
        ({"redis_uri": "redis://:p\udcffw@localhost:6379/0"}, "is not a URL that redis-py accepts"),
        ({"redis_uri": "redis+sentinel://h1:26379,h2:26379"}, "needs the service after the hosts"),
        ({"redis_uri": "redis+cluster://h1:7000,h2:7001/0"}, "takes hosts only"),
        ({"redis_uri": "redis+cluster://h1,h2:7001"}, "is not a URL that redis-py accepts"),
        ({"redis_uri": "redis+cluster://h1:7000,:7001"}, "is not a URL that redis-py accepts"),
        ({"redis_uri": "redis+sentinel://h1:99999/mymaster"}, "is not a URL that redis-py accepts"),
        (
            {"redis_uri": "rediss://localhost:6379/0?ssl_cert_reqs=bogus"},
            "is not a URL that redis-py accepts",
        ),
    ],
)
@pytest.mark.usefixtures("bare_environment")
def test_settings_refuse_bad_values(values: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        main.Settings.model_validate(values)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("lots", "is not a single rate limit like '10/minute'"),
        ("2/minute;5/hour", "is not a single rate limit like '10/minute'"),
        ("0/minute", "must allow from 1 to 10,000,000 calls"),
        ("10000001/minute", "must allow from 1 to 10,000,000 calls"),
        ("1/525601 minute", "must have a window of at most a year"),  # a year and a minute
    ],
)
def test_rate_limit_settings_refuse_what_is_past_their_bounds(value: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        main.one_rate_limit(value)
    assert str(error.value) == message


@pytest.mark.parametrize("value", ["1/second", "10000000/minute", "1/day", "1/525600 minute"])
def test_rate_limit_settings_accept_up_to_their_bounds(value: str) -> None:
    assert main.one_rate_limit(value) == value


def test_a_key_of_exactly_ten_distinct_characters_is_accepted() -> None:
    key = "q8w3e1r9t7" * 4  # 10 distinct, no run of six
    assert main.strong_secret(SecretStr(key)) == SecretStr(key)


@pytest.mark.parametrize(
    "uri",
    [
        GOOD_URI,
        "rediss://:pw@redis.example:6380/1",
        "unix:///run/redis.sock?password=pw&db=2",
        "redis+sentinel://h1:26379,h2:26379,h3:26379/mymaster",
        "redis+sentinel://:pw@h1:26379/mymaster",
        "redis+cluster://h1:7000,h2:7001,h3:7002",
        "redis+cluster://:pw@[::1]:7000,10.0.0.2:7001",
    ],
)
@pytest.mark.usefixtures("bare_environment")
def test_settings_accept_redis_uris_with_their_key(uri: str) -> None:
    settings = main.Settings.model_validate({"redis_uri": uri, "secret_key": GOOD_SECRET})
    assert settings.redis_uri == uri


@pytest.mark.parametrize(
    ("value", "origins"),
    [
        (" https://app.example ,http://localhost:5173 ", "https://app.example,http://localhost:5173"),
        ("*", "*"),
    ],
)
@pytest.mark.usefixtures("bare_environment")
def test_cors_origins_are_read_as_a_comma_separated_list(value: str, origins: str) -> None:
    assert main.Settings(cors_allow_origins=value).cors_allow_origins == origins


@pytest.mark.parametrize(
    ("values", "secret"),
    [
        ({"secret_key": "short-Xy7k"}, "short-Xy7k"),
        ({"secret_key": GOOD_SECRET + "\udcff"}, "\udcff"),
        (
            {"redis_uri": "unix:///tmp/r.sock?password=hunter2&colour=blue", "secret_key": GOOD_SECRET},
            "hunter2",
        ),
        ({"redis_uri": "redis://:hunter2@localhost:port/0", "secret_key": GOOD_SECRET}, "hunter2"),
        ({"redis_uri": "redis+cluster://:hunter2@h1:port", "secret_key": GOOD_SECRET}, "hunter2"),
        ({"redis_uri": "redis+sentinel://:hunter2@h1:26379", "secret_key": GOOD_SECRET}, "hunter2"),
    ],
)
@pytest.mark.usefixtures("bare_environment")
def test_settings_errors_never_echo_a_secret(values: dict[str, str], secret: str) -> None:
    with pytest.raises(ValidationError) as error:
        main.Settings.model_validate(values)
    assert secret not in str(error.value) and repr(secret)[1:-1] not in str(error.value)


@pytest.mark.parametrize(
    ("env", "problems"),
    [
        (
            {"SECRET_KEY": "short-Xy7k", "RATE_LIMIT_FREE": "lots", "REDIS_URI": "redis://h:0x/0"},
            [
                f"REDIS_URI: {main.BAD_REDIS_URI}",
                "SECRET_KEY: must be at least 32 bytes for HS256",
                "RATE_LIMIT_FREE: is not a single rate limit like '10/minute'",
            ],
        ),
        (
            {"SECRET_KEY": GOOD_SECRET},
            ["SECRET_KEY and REDIS_URI must be set together, or neither (embedded store)"],
        ),
    ],
)
def test_bad_settings_stop_the_app_with_one_line_each(
    tmp_path: Path, env: dict[str, str], problems: list[str]
) -> None:
    assert import_main_in(tmp_path, env) == refusal(problems)


def test_slowapis_own_variables_stop_the_app(tmp_path: Path) -> None:
    # RATELIMIT_ENABLED=false would switch every limit off inside SlowAPI.
    assert import_main_in(tmp_path, {"RATELIMIT_ENABLED": "false"}) == refusal([SLOWAPI_REFUSAL])


@pytest.mark.parametrize(
    "dotenv",
    [
        "RATELIMIT_ENABLED=false\n",
        'RATELIMIT_ENABLED="false\n',  # unterminated: python-dotenv skips it, SlowAPI does not
        'NOTES="a value over\nRATELIMIT_ENABLED=false\nlines"\n',  # one value to dotenv, a line to SlowAPI
    ],
    ids=["plain", "unterminated-quote", "inside-a-multiline-value"],
)
def test_slowapis_own_variables_in_dotenv_stop_the_app(tmp_path: Path, dotenv: str) -> None:
    (tmp_path / ".env").write_text(dotenv)
    assert import_main_in(tmp_path, {}).endswith(refusal([SLOWAPI_REFUSAL]))


def test_an_unreadable_dotenv_stops_the_app_without_printing_it(tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"SECRET_KEY=\xffk3Q9vXr2LmT8wYp4ZsN6bHc1JfD7gUe5\n")
    assert import_main_in(tmp_path, {}) == refusal(
        [".env: cannot be read as UTF-8 text (UnicodeDecodeError)"]
    )


# --- 1. Log in: a password checked off the event loop ---


def test_login_with_json_returns_token_pair(client: TestClient) -> None:
    r = client.post("/token", json={"username": "jane_doe", "password": "password456"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert (body["token_type"], body["expires_in"]) == ("bearer", 900)
    access, refresh = main.decode_token(body["access_token"]), main.decode_token(body["refresh_token"])
    assert (access.type, refresh.type, access.sub) == ("access", "refresh", "jane_doe")
    assert access.sid == refresh.sid and access.jti != refresh.jti
    assert access.exp - access.iat == 15 * 60 and refresh.exp - refresh.iat == 7 * 24 * 3600


def test_login_with_oauth2_form_returns_token_pair(client: TestClient) -> None:
    r = client.post(
        "/token", data={"username": "john_doe", "password": "password123", "grant_type": "password"}
    )
    assert r.status_code == 200, r.text
    assert main.decode_token(r.json()["access_token"]).sub == "john_doe"


def test_login_wrong_password(client: TestClient) -> None:
    r = client.post("/token", json={"username": "jane_doe", "password": "wrong"})
    assert r.status_code == 400, r.text
    assert r.json() == oauth2_error("Incorrect username or password", "invalid_grant")
    assert "www-authenticate" not in r.headers  # a refused grant, not a challenge (RFC 6749 §5.2)


def test_login_unknown_user_answers_like_wrong_password(client: TestClient) -> None:
    wrong = client.post("/token", json={"username": "jane_doe", "password": "wrong"})
    unknown = client.post("/token", json={"username": "nobody", "password": "wrong"})
    assert unknown.status_code == 400, unknown.text
    assert (unknown.status_code, unknown.json(), unknown.headers.keys()) == (
        wrong.status_code,
        wrong.json(),
        wrong.headers.keys(),
    )


def test_login_unknown_user_still_checks_a_hash(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[bytes] = []
    real_checkpw = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return real_checkpw(password, hashed)

    monkeypatch.setattr(main.bcrypt, "checkpw", spy)
    r = client.post("/token", json={"username": "nobody", "password": "whatever"})
    assert r.status_code == 400, r.text
    assert checked == [main.DUMMY_HASH]


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({"username": "jane_doe"}, ["password"]),
        ({"password": "password456"}, ["username"]),
        ({"username": "", "password": "password456"}, ["username"]),
        ({"username": "jane_doe", "password": ""}, ["password"]),
        ({"username": 7, "password": "password456"}, ["username"]),
        ({"username": "x" * 65, "password": "password456"}, ["username"]),
        (["jane_doe", "password456"], []),
    ],
)
def test_login_rejects_malformed_credentials(client: TestClient, body: Any, location: list[str]) -> None:
    r = client.post("/token", json=body)
    assert r.status_code == 422, r.text
    assert [error["loc"] for error in r.json()["detail"]] == [location]


def test_login_rejects_password_over_72_bytes_with_reason(client: TestClient) -> None:
    r = client.post("/token", json={"username": "jane_doe", "password": "é" * 37})  # 37 chars, 74 bytes
    assert r.status_code == 422, r.text
    assert r.json() == {
        "detail": [
            {
                "type": "value_error",
                "loc": ["password"],
                "msg": "Value error, must be at most 72 bytes in UTF-8",
            }
        ],
        "error": "invalid_request",
        "error_description": "A field is missing or invalid",
    }


def test_logins_run_bcrypt_off_the_loop_and_leave_it_a_core(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One login more than bcrypt has threads, all at once: bcrypt runs on threads of its own,
    never more at once than there are cores less one (one at least), so the loop always has a core."""
    running, most, lock = 0, 0, threading.Lock()
    pool_full, release = threading.Event(), threading.Event()
    threads: set[str] = set()
    real_checkpw = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            threads.add(threading.current_thread().name)
            if running == main.BCRYPT_THREADS:
                pool_full.set()
        release.wait(WAIT_SECONDS)  # held until the pool has filled up
        with lock:
            running -= 1
        return real_checkpw(password, hashed)

    async def one_more_login_than_threads() -> list[Any]:
        logins = range(main.BCRYPT_THREADS + 1)
        tasks = [asyncio.ensure_future(main.authenticate_user("jane_doe", "password456")) for _ in logins]
        await asyncio.to_thread(pool_full.wait, WAIT_SECONDS)
        release.set()
        return await asyncio.gather(*tasks)

    monkeypatch.setattr(main.bcrypt, "checkpw", spy)
    users = client.portal.call(one_more_login_than_threads)
    assert [user.username for user in users] == ["jane_doe"] * (main.BCRYPT_THREADS + 1)
    assert most == main.BCRYPT_THREADS == max(1, (os.cpu_count() or 1) - 1)
    assert threads and all(name.startswith("bcrypt") for name in threads)


def test_a_login_past_the_waiting_bound_is_refused_at_once(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of logins must not make every login wait behind it: past the bound, a 503 at once."""
    monkeypatch.setattr(main, "waiting_logins", main.MAX_WAITING_LOGINS)
    r = client.post("/token", json={"username": "jane_doe", "password": "password456"})
    assert r.status_code == 503, r.text
    assert r.json() == oauth2_error("Too many logins at once; try again shortly", "temporarily_unavailable")
    assert r.headers["retry-after"] == "1"
    monkeypatch.setattr(main, "waiting_logins", main.MAX_WAITING_LOGINS - 1)
    login(client)
    assert main.waiting_logins == main.MAX_WAITING_LOGINS - 1  # its place is given back


def test_failed_login_is_logged_without_password(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="uvicorn.app"):
        client.post("/token", json={"username": "jane_doe", "password": "hunter2-secret"})
    assert "failed login for username 'jane_doe'" in caplog.text
    assert "hunter2-secret" not in caplog.text


def test_a_failed_login_with_an_unknown_username_does_not_log_it(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A password typed into the username field must not reach the log."""
    with caplog.at_level(logging.WARNING, logger="uvicorn.app"):
        client.post("/token", json={"username": "hunter2-secret", "password": "x"})
    assert "failed login for an unknown username" in caplog.text
    assert "hunter2-secret" not in caplog.text


# --- Password guessing: per-username backoff ---

# Fifty addresses, a guess from each in turn: the per-IP limits never see more than one.
ATTACKERS = [f"198.51.100.{n}" for n in range(1, 51)]
BACKOFF = oauth2_error("Too many failed logins for this username; try again later", "temporarily_unavailable")
WRONG_PASSWORD = oauth2_error("Incorrect username or password", "invalid_grant")


def login_from(client: TestClient, address: str, username: str = "jane_doe", password: str = "wrong") -> Any:
    body = {"username": username, "password": password}
    return client.post("/token", json=body, headers={"X-Forwarded-For": address})


def answer(r: Any) -> tuple[int, Any, str | None]:
    return r.status_code, r.json(), r.headers.get("retry-after")


def test_an_attempt_at_the_announced_moment_is_let_through(
    proxied_client: TestClient, stopped_clock: FakeClock
) -> None:
    for attacker in ATTACKERS[:5]:  # the fifth sets a wait of 1 s from now
        login_from(proxied_client, attacker)
    stopped_clock.now += 1
    assert answer(login_from(proxied_client, ATTACKERS[5])) == (400, WRONG_PASSWORD, None)


def test_guesses_from_fifty_addresses_wait_twice_as_long_each_time(
    proxied_client: TestClient, stopped_clock: FakeClock
) -> None:
    attackers = iter(ATTACKERS)
    failures = [answer(login_from(proxied_client, next(attackers))) for _ in range(5)]
    assert failures == [(400, WRONG_PASSWORD, None)] * 5
    for wait in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]:
        assert answer(login_from(proxied_client, next(attackers))) == (429, BACKOFF, str(wait))
        stopped_clock.now += wait - 0.001
        assert answer(login_from(proxied_client, next(attackers))) == (429, BACKOFF, "1")  # never early
        stopped_clock.now += 0.001
        assert answer(login_from(proxied_client, next(attackers))) == (400, WRONG_PASSWORD, None)


def test_fifty_addresses_get_17_guesses_in_the_first_hour_then_4_an_hour(
    proxied_client: TestClient, stopped_clock: FakeClock
) -> None:
    """The README's figure: an attacker who retries the moment Retry-After allows."""
    start, attackers, guesses = stopped_clock.now, itertools.cycle(ATTACKERS), []
    while stopped_clock.now < start + 2 * 3600:
        r = login_from(proxied_client, next(attackers))
        if r.status_code == 429:
            stopped_clock.now += int(r.headers["retry-after"])
        else:
            guesses.append(stopped_clock.now - start)
    assert sum(1 for at in guesses if at < 3600) == 17
    assert sum(1 for at in guesses if 3600 <= at < 2 * 3600) == 4


def test_waits_stop_doubling_at_the_longest_wait(
    proxied_client: TestClient, stopped_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(main, "LOGIN_BACKOFF_MAX_SECONDS", 3)
    retry_afters = []
    for attacker in ATTACKERS[:13]:
        r = login_from(proxied_client, attacker)
        if r.status_code == 429:
            retry_afters.append(r.headers["retry-after"])
            stopped_clock.now += int(r.headers["retry-after"])
    assert retry_afters == ["1", "2", "3", "3"]


def test_an_attempt_during_a_wait_checks_no_password(
    proxied_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for attacker in ATTACKERS[:5]:
        login_from(proxied_client, attacker)
    checked: list[bytes] = []
    checkpw = bcrypt.checkpw
    monkeypatch.setattr(
        bcrypt, "checkpw", lambda password, hashed: checked.append(password) or checkpw(password, hashed)
    )
    assert login_from(proxied_client, ATTACKERS[5], password=PASSWORDS["jane_doe"]).status_code == 429
    assert checked == []


def test_the_owners_known_address_logs_in_during_an_attack(
    proxied_client: TestClient, stopped_clock: FakeClock
) -> None:
    home = "203.0.113.9"
    assert login_from(proxied_client, home, password=PASSWORDS["jane_doe"]).status_code == 200
    for attacker in ATTACKERS[:6]:
        login_from(proxied_client, attacker)
    assert login_from(proxied_client, ATTACKERS[6]).status_code == 429
    assert login_from(proxied_client, home, password=PASSWORDS["jane_doe"]).status_code == 200


def test_the_right_password_from_a_new_address_waits_then_gets_in(
    proxied_client: TestClient, stopped_clock: FakeClock
) -> None:
    for attacker in ATTACKERS[:5]:
        login_from(proxied_client, attacker)
    traveller = "192.0.2.44"
    right = login_from(proxied_client, traveller, password=PASSWORDS["jane_doe"])
    wrong = login_from(proxied_client, "192.0.2.45")
    assert answer(right) == answer(wrong) == (429, BACKOFF, "1")  # no hint that the password was right
    stopped_clock.now += 1
    assert login_from(proxied_client, traveller, password=PASSWORDS["jane_doe"]).status_code == 200


def test_unknown_usernames_back_off_exactly_as_known_ones(
    proxied_client: TestClient, stopped_clock: FakeClock
) -> None:
    def attack(username: str) -> list[tuple[int, Any, str | None]]:
        replies = []
        for attacker in ATTACKERS[:8]:
            replies.append(answer(login_from(proxied_client, attacker, username)))
            stopped_clock.now += 0.5
        return replies

    assert attack("no_such_user") == attack("jane_doe")


def test_a_success_from_a_known_address_leaves_the_count(
    proxied_client: TestClient, stopped_clock: FakeClock
) -> None:
    """Or strangers would see their waits vanish whenever the owner logs in."""
    home = "203.0.113.9"
    assert login_from(proxied_client, home, password=PASSWORDS["jane_doe"]).status_code == 200
    for attacker in ATTACKERS[:5]:
        login_from(proxied_client, attacker)
    assert login_from(proxied_client, home, password=PASSWORDS["jane_doe"]).status_code == 200
    assert answer(login_from(proxied_client, ATTACKERS[5])) == (429, BACKOFF, "1")


def test_a_login_the_bcrypt_queue_refuses_is_not_counted(
    proxied_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(main, "waiting_logins", main.MAX_WAITING_LOGINS)
    assert {login_from(proxied_client, attacker).status_code for attacker in ATTACKERS[:5]} == {503}
    monkeypatch.setattr(main, "waiting_logins", 0)
    right = login_from(proxied_client, ATTACKERS[5], password=PASSWORDS["jane_doe"])
    assert right.status_code == 200


def test_an_unparsable_address_never_becomes_a_known_one(proxied_client: TestClient) -> None:
    """Every unparsable X-Forwarded-For is one client, "unknown": the owner's login from one must
    not exempt all the others."""
    assert login_from(proxied_client, "not-an-ip", password=PASSWORDS["jane_doe"]).status_code == 200
    for attacker in ATTACKERS[:5]:
        login_from(proxied_client, attacker)
    assert answer(login_from(proxied_client, "junk")) == (429, BACKOFF, "1")


@pytest.mark.parametrize(
    ("username", "named"), [("jane_doe", "username 'jane_doe'"), ("nobody", "an unknown username")]
)
def test_a_refusal_during_a_backoff_is_logged_with_only_a_known_username(
    proxied_client: TestClient, caplog: pytest.LogCaptureFixture, username: str, named: str
) -> None:
    for attacker in ATTACKERS[:5]:
        login_from(proxied_client, attacker, username)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="uvicorn.app"):
        login_from(proxied_client, ATTACKERS[5], username)
    assert caplog.messages == [f"login refused during a backoff of 1 s for {named}"]


def test_a_success_from_a_new_address_resets_the_count(proxied_client: TestClient) -> None:
    statuses = [login_from(proxied_client, attacker).status_code for attacker in ATTACKERS[:4]]
    statuses.append(login_from(proxied_client, "203.0.113.9", password=PASSWORDS["jane_doe"]).status_code)
    statuses += [login_from(proxied_client, attacker).status_code for attacker in ATTACKERS[4:10]]
    assert statuses == [400] * 4 + [200] + [400] * 5 + [429]


def test_a_quiet_username_forgets_its_failures(proxied_client: TestClient, stopped_clock: FakeClock) -> None:
    """Every key the backoff writes expires on its own: the count a quiet period after its wait
    ends, the address of a login with the refresh token."""
    home = "203.0.113.9"
    login_from(proxied_client, home, password=PASSWORDS["jane_doe"])
    for attacker in ATTACKERS[:5]:
        login_from(proxied_client, attacker)
    account, known = main.login_keys("jane_doe", home)
    expiry = {
        key: proxied_client.portal.call(main.store.expiretime, key)
        for key in store_keys(proxied_client, "login:*")
    }
    assert expiry == {
        account.encode(): math.ceil(stopped_clock.now + 1 + main.LOGIN_BACKOFF_MAX_SECONDS),
        known.encode(): int(stopped_clock.now) + main.REFRESH_TOKEN_LIFETIME,
    }


def test_uvicorn_slows_guesses_from_forwarded_addresses_but_not_the_owner(tmp_path: Path) -> None:
    """`uvicorn main:app` as the README runs it, behind a proxy on 127.0.0.1 that sets
    X-Forwarded-For: guesses from many addresses end in a wait, and the owner's address does not."""
    with default_app(tmp_path) as base:

        def log_in(address: str, password: str) -> Any:
            body = {"username": "jane_doe", "password": password}
            return httpx2.post(f"{base}/token", json=body, headers={"X-Forwarded-For": address})

        assert log_in("203.0.113.9", PASSWORDS["jane_doe"]).status_code == 200
        # Each wrong guess takes a real bcrypt check; the waits double until one outlasts it.
        guesses = [log_in(attacker, "wrong") for attacker in ATTACKERS[:15]]
        owner = log_in("203.0.113.9", PASSWORDS["jane_doe"])
    statuses = [r.status_code for r in guesses]
    assert statuses[:5] == [400] * 5 and 429 in statuses
    refused = guesses[statuses.index(429)]
    assert (refused.json(), int(refused.headers["retry-after"]) >= 1) == (BACKOFF, True)
    assert owner.status_code == 200


# --- 2. Access and refresh tokens: what counts as a token of ours ---


def signed(**changes: Any) -> str:
    """A token signed with the app's own key, with some claims changed."""
    claims = {**main.decode_token(mint()).model_dump(), **changes}
    return jwt.encode(claims, main.SECRET_KEY, algorithm="HS256")


def token_of_length(n: int) -> str:
    """An access token of exactly `n` characters: its username and session id stretched to fit."""
    for sub in range(1, 3000):
        for sid in range(1, 4):
            token, _ = main.create_token("u" * sub, "access", "s" * sid, time.time())
            if len(token) == n:
                return token
    raise AssertionError(n)


def test_users_me_returns_the_caller(client: TestClient) -> None:
    tokens = login(client, "john_doe")
    r = client.get("/users/me", headers=bearer(tokens["access_token"]))
    assert r.status_code == 200, r.text
    assert r.json() == {"username": "john_doe", "full_name": "John Doe", "plan": "premium"}


def test_missing_token_is_401_without_error_code(client: TestClient) -> None:
    r = client.get("/users/me")
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": "Not authenticated"}
    assert r.headers["www-authenticate"] == "Bearer"


# Each token is made in its test, not at collection: a 15-minute token could expire in a slow run.
@pytest.mark.parametrize(
    ("token_of", "detail"),
    [
        (lambda: "not-a-jwt", "Invalid token"),
        (lambda: jwt.encode({"sub": "jane_doe"}, "x" * 32, algorithm="HS256"), "Invalid token"),
        (lambda: jwt.encode({"sub": "jane_doe", "exp": 2**40}, None, algorithm="none"), "Invalid token"),
        (lambda: mint(now=time.time() - 3600), "Token has expired"),
        (lambda: mint("refresh"), "Wrong token type: expected access, got refresh"),
        (lambda: mint(username="ghost"), "Unknown user"),
    ],
    ids=["garbage", "other-key", "alg-none", "expired", "refresh-token", "unknown-user"],
)
def test_bad_access_token_is_401_invalid_token(
    client: TestClient, token_of: Callable[[], str], detail: str
) -> None:
    r = client.get("/users/me", headers=bearer(token_of()))
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": detail}
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_token_missing_a_claim_is_invalid(client: TestClient) -> None:
    claims = main.decode_token(mint()).model_dump()
    del claims["sid"]
    r = client.get("/users/me", headers=bearer(jwt.encode(claims, main.SECRET_KEY, algorithm="HS256")))
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": "Invalid token"}


@pytest.mark.parametrize(
    "changes",
    [
        {"exp": str(int(time.time()) + 600)},
        {"iat": str(int(time.time()))},
        {"jti": ""},
        {"sid": ""},
        {"sub": ""},
        {"exp": 2**70},
    ],
    ids=["exp-as-string", "iat-as-string", "empty-jti", "empty-sid", "empty-sub", "exp-2**70"],
)
def test_token_with_loosely_typed_claims_is_invalid(client: TestClient, changes: dict[str, Any]) -> None:
    r = client.get("/users/me", headers=bearer(signed(**changes)))
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": "Invalid token"}
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_token_living_longer_than_the_apps_tokens_is_invalid(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Minted before ACCESS_TOKEN_EXPIRE_MINUTES was lowered: its session's revocation entry, sized
    by today's lifetime, could expire before it does."""
    monkeypatch.setattr(main, "ACCESS_TOKEN_LIFETIME", 3600)
    token = mint()
    monkeypatch.setattr(main, "ACCESS_TOKEN_LIFETIME", 900)
    r = client.get("/users/me", headers=bearer(token))
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": "Invalid token"}


def test_token_expires_at_exactly_its_exp(monkeypatch: pytest.MonkeyPatch) -> None:
    token, claims = main.create_token("jane_doe", "access", "s", time.time())
    monkeypatch.setattr(main, "time", FakeClock(claims.exp))
    with pytest.raises(jwt.ExpiredSignatureError):
        main.decode_token(token)


def test_a_token_from_a_worker_whose_clock_runs_ahead_is_accepted(client: TestClient) -> None:
    token = mint(now=time.time() + 5)  # "issued" 5 s from now, by this app's key
    assert client.get("/users/me", headers=bearer(token)).status_code == 200


def test_jti_is_16_random_bytes() -> None:
    """As secrets.token_urlsafe(16) writes them: 16 bytes in 22 characters of URL-safe base64."""
    now = time.time()
    (first, first_claims), (second, second_claims) = (
        main.create_token("jane_doe", "access", "s", now) for _ in range(2)
    )
    for jti in (first_claims.jti, second_claims.jti):
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", jti), jti
        assert len(base64.urlsafe_b64decode(jti + "==")) == 16
    assert first_claims.jti != second_claims.jti and first != second  # alike in every other claim


def test_decode_token_takes_tokens_up_to_max_token_chars() -> None:
    assert main.decode_token(token_of_length(main.MAX_TOKEN_CHARS)).sub.startswith("u")
    with pytest.raises(jwt.InvalidTokenError, match=r"^not a token of ours$"):
        main.decode_token(token_of_length(main.MAX_TOKEN_CHARS + 1))


@pytest.mark.parametrize("token", ["e" * (main.MAX_TOKEN_CHARS + 1), "e" * 1_300_000, "eyJñ.abc.def"])
def test_oversized_or_non_ascii_bearer_token_is_refused_before_decoding(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    def must_not_decode(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(main.jwt, "decode", must_not_decode)
    r = client.get("/users/me", headers={"Authorization": f"Bearer {token}".encode()})
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": "Invalid token"}
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'


# --- The store: the client for a Redis, Sentinel or Cluster URI ---


def test_from_uri_reads_hosts_password_and_service() -> None:
    nodes = main.RedisNodes.from_uri("redis+sentinel://user:pa:ss@[::1]:1,X1:65535/Xmaster")
    assert nodes == main.RedisNodes([("::1", 1), ("X1", 65535)], "pa:ss", "Xmaster")


@pytest.mark.parametrize("port", ["0", "65536"])
def test_from_uri_refuses_ports_out_of_range(port: str) -> None:
    with pytest.raises(ValueError, match=r"^every host needs a port$"):
        main.RedisNodes.from_uri(f"redis+cluster://h:{port}")


def test_cluster_uri_makes_a_cluster_client_that_connects_nothing_yet() -> None:
    client = main.redis_client("redis+cluster://:pw@203.0.113.1:7000,203.0.113.2:7001")
    assert isinstance(client, redis.asyncio.RedisCluster)
    nodes = client.nodes_manager.startup_nodes
    assert sorted(nodes) == ["203.0.113.1:7000", "203.0.113.2:7001"]
    assert client.connection_kwargs["password"] == "pw"


def test_sentinel_uri_asks_the_sentinels_for_the_named_primary() -> None:
    client = main.redis_client("redis+sentinel://:pw@203.0.113.1:26379,203.0.113.2:26379/mymaster")
    pool = client.connection_pool
    assert (pool.service_name, pool.is_master) == ("mymaster", True)
    assert pool.connection_kwargs["password"] == "pw"
    addresses = [sentinel.connection_pool.connection_kwargs for sentinel in pool.sentinel_manager.sentinels]
    assert [(kwargs["host"], kwargs["port"]) for kwargs in addresses] == [
        ("203.0.113.1", 26379),
        ("203.0.113.2", 26379),
    ]


@pytest.mark.parametrize(
    "uri", ["redis://h:6379/0", "redis+cluster://h1:7000", "redis+sentinel://h1:26379/mymaster"]
)
def test_every_store_client_times_out_in_two_seconds_and_retries_once(uri: str) -> None:
    """The options that make a request fail fast while Redis is down, whatever the topology (and
    for the sentinels too). That it does fail fast, a real outage shows (test_outage_answers_503_...)."""
    client = main.redis_client(uri)
    if isinstance(client, redis.asyncio.RedisCluster):
        options = client.connection_kwargs
    else:
        options = client.connection_pool.connection_kwargs
    assert (options["socket_timeout"], options["socket_connect_timeout"]) == (2, 2)
    retry = client.retry if isinstance(client, redis.asyncio.RedisCluster) else client.get_retry()
    assert retry.get_retries() == 1
    if uri.startswith(main.SENTINEL_SCHEME):
        sentinel = client.connection_pool.sentinel_manager.sentinels[0]
        assert sentinel.connection_pool.connection_kwargs["socket_timeout"] == 2


@pytest.mark.parametrize(
    ("uri", "pool_class"),
    [
        ("redis://h:6379/0", redis.asyncio.BlockingConnectionPool),
        ("redis+sentinel://h1:26379/mymaster", main.BlockingSentinelPool),
    ],
)
def test_a_store_client_waits_for_a_free_connection(uri: str, pool_class: type) -> None:
    """redis-py's default pool refuses a command at once when its connections are all busy."""
    pool = main.redis_client(uri).connection_pool
    assert type(pool) is pool_class
    assert (pool.max_connections, pool.timeout) == (100, 2)


def test_a_cluster_client_has_more_connections_a_node_than_a_worker_admits_requests() -> None:
    client = main.redis_client("redis+cluster://h1:7000")
    assert client.connection_kwargs["max_connections"] == 1024


def test_300_requests_at_once_wait_for_a_store_connection_rather_than_fail(client: TestClient) -> None:
    """More requests in flight than the pool has connections (100): each waits its turn."""
    token = login(client, "admin_doe")["access_token"]

    async def at_once() -> list[int]:
        calls = [call_app("/health") for _ in range(150)] + [
            call_app("/users/me", token=token) for _ in range(150)
        ]
        return await asyncio.gather(*calls)

    assert Counter(client.portal.call(at_once)) == {200: 300}


def test_every_key_set_used_together_is_in_one_cluster_slot(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fakeredis has no cluster: this records every command of a whole session's life and checks
    that each script's keys, and each multi-key command's, would land in one slot of a cluster."""
    commands: list[tuple[Any, ...]] = []
    pack = STORE_CONNECTION_CLASS.pack_command

    def spy(self: Any, *args: Any) -> Any:
        commands.append(args)
        return pack(self, *args)

    monkeypatch.setattr(STORE_CONNECTION_CLASS, "pack_command", spy)
    tokens = login(client)
    client.get("/users/me", headers=bearer(tokens["access_token"]))
    tokens = client.post("/refresh", json={"refresh_token": tokens["refresh_token"]}).json()
    client.post("/introspect", data={"token": tokens["access_token"]})
    client.post("/introspect", data={"token": tokens["refresh_token"]})
    client.post("/revoke", data={"token": tokens["access_token"]})
    client.post("/logout", headers=bearer(login(client)["access_token"]))
    client.portal.call(main.remove_expired_revocations, time.time())
    names = [str(command[0]).upper() for command in commands]
    assert {"EVALSHA", "ZMSCORE", "ZADD", "HSET", "EXPIREAT", "DEL", "ZREMRANGEBYSCORE"} <= set(names)
    assert not set(names) & {"MSET", "MGET", "SUNION", "RENAME"}  # nothing else spans keys
    for command in commands:
        if str(command[0]).upper() in ("EVALSHA", "EVAL"):
            keys = command[3 : 3 + int(command[2])]
        elif str(command[0]).upper() == "DEL":
            keys = command[1:]
        else:
            continue
        assert len({redis.cluster.key_slot(str(key).encode()) for key in keys}) == 1, command
    # A transaction's commands must all go to one slot too: their first argument is their key.
    for start in [n for n, name in enumerate(names) if name == "MULTI"]:
        end = names.index("EXEC", start)
        keys = [command[1] for command in commands[start + 1 : end]]
        assert len({redis.cluster.key_slot(str(key).encode()) for key in keys}) == 1, commands[start:end]


# --- 3. Refresh-token rotation, with a grace for retries ---

REFRESH_REVOKED = oauth2_error("Refresh token has been revoked", "invalid_grant")


@pytest.fixture(params=["/refresh", "/token"])
def refresh_with(request: pytest.FixtureRequest) -> Callable[[TestClient, str], Any]:
    """The two ways to refresh, which must behave alike: /refresh with JSON, and /token with RFC
    6749's refresh_token grant as a form."""
    if request.param == "/refresh":
        return lambda client, token: client.post("/refresh", json={"refresh_token": token})
    return lambda client, token: client.post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": token}
    )


def test_refresh_returns_new_pair_in_same_session(client: TestClient) -> None:
    tokens = login(client)
    r = client.post("/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["access_token"] != tokens["access_token"] and new["refresh_token"] != tokens["refresh_token"]
    assert main.decode_token(new["access_token"]).sid == main.decode_token(tokens["access_token"]).sid
    assert client.get("/users/me", headers=bearer(new["access_token"])).status_code == 200


def test_token_endpoint_refresh_grant_as_a_form_rotates_the_pair(client: TestClient) -> None:
    tokens = login(client)
    form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": "cli"}
    r = client.post("/token", data=form)
    assert r.status_code == 200, r.text
    assert no_store_headers(r) == NO_STORE
    new = r.json()
    assert main.decode_token(new["refresh_token"]).sid == main.decode_token(tokens["refresh_token"]).sid
    assert client.get("/users/me", headers=bearer(new["access_token"])).status_code == 200


def test_login_records_the_sessions_refresh_token(client: TestClient) -> None:
    claims = main.decode_token(login(client)["refresh_token"])
    key = (main.REFRESH_KEY_PREFIX + claims.sid).encode()
    assert session_records(client) == {key: {b"jti": claims.jti.encode()}}
    assert client.portal.call(main.store.expiretime, key) == claims.exp  # expires with the token


def test_rotation_keeps_one_record_per_session(client: TestClient, stopped_clock: FakeClock) -> None:
    tokens = [login(client)["refresh_token"]]
    for _ in range(3):
        swapped_at = stopped_clock.now
        tokens.append(client.post("/refresh", json={"refresh_token": tokens[-1]}).json()["refresh_token"])
        stopped_clock.now += 1
    previous, current = (main.decode_token(token) for token in tokens[-2:])
    assert revoked_entries(client) == {}
    assert session_records(client) == {
        (main.REFRESH_KEY_PREFIX + current.sid).encode(): {
            b"jti": current.jti.encode(),
            b"previous": previous.jti.encode(),
            b"rotated_at": repr(swapped_at).encode(),
        }
    }


def test_a_retry_within_the_grace_gets_the_same_pair(
    client: TestClient, stopped_clock: FakeClock, refresh_with: Callable[[TestClient, str], Any]
) -> None:
    refresh_token = login(client)["refresh_token"]
    first = refresh_with(client, refresh_token)
    swapped_at = stopped_clock.now
    stopped_clock.now += main.REFRESH_GRACE_SECONDS - 0.001
    retry = refresh_with(client, refresh_token)
    assert (first.status_code, retry.status_code) == (200, 200)
    pair = ("access_token", "refresh_token")
    assert [retry.json()[token] for token in pair] == [first.json()[token] for token in pair]
    # The same access token, minted at the swap: it has that much less to live.
    age = int(stopped_clock.now) - int(swapped_at)
    assert retry.json()["expires_in"] == main.ACCESS_TOKEN_LIFETIME - age
    assert client.get("/users/me", headers=bearer(retry.json()["access_token"])).status_code == 200


def test_a_retry_after_the_grace_revokes_the_session(
    client: TestClient, stopped_clock: FakeClock, refresh_with: Callable[[TestClient, str], Any]
) -> None:
    stolen = login(client)["refresh_token"]
    rotated = refresh_with(client, stolen).json()
    stopped_clock.now += main.REFRESH_GRACE_SECONDS
    r = refresh_with(client, stolen)
    assert r.status_code == 400, r.text
    assert r.json() == REFRESH_REVOKED
    assert client.get("/users/me", headers=bearer(rotated["access_token"])).status_code == 401
    assert refresh_with(client, rotated["refresh_token"]).status_code == 400


def test_only_the_previous_refresh_token_gets_the_grace(
    client: TestClient, refresh_with: Callable[[TestClient, str], Any]
) -> None:
    grandparent = login(client)["refresh_token"]
    parent = refresh_with(client, grandparent).json()["refresh_token"]
    newest = refresh_with(client, parent).json()
    r = refresh_with(client, grandparent)
    assert (r.status_code, r.json()) == (400, REFRESH_REVOKED)
    assert client.get("/users/me", headers=bearer(newest["access_token"])).status_code == 401


def test_twenty_concurrent_refreshes_get_one_pair_and_keep_the_session(client: TestClient) -> None:
    refresh_token = login(client)["refresh_token"]

    async def race() -> list[main.Token]:
        return await asyncio.gather(*(main.refresh_session(refresh_token) for _ in range(20)))

    pairs = {pair.model_dump_json() for pair in client.portal.call(race)}
    assert len(pairs) == 1
    [pair] = [json.loads(pair) for pair in pairs]
    assert client.get("/users/me", headers=bearer(pair["access_token"])).status_code == 200
    assert client.post("/refresh", json={"refresh_token": pair["refresh_token"]}).status_code == 200


@pytest.mark.parametrize(
    "end_session",
    [
        lambda client, pair: client.post("/logout", headers=bearer(pair["access_token"])),
        lambda client, pair: client.post("/revoke", json={"token": pair["refresh_token"]}),
    ],
    ids=["logout", "revoke"],
)
def test_a_session_ended_since_the_rotation_gives_no_grace(
    client: TestClient, end_session: Callable[[TestClient, dict[str, Any]], Any]
) -> None:
    refresh_token = login(client)["refresh_token"]
    assert (
        end_session(client, client.post("/refresh", json={"refresh_token": refresh_token}).json()).status_code
        == 200
    )
    r = client.post("/refresh", json={"refresh_token": refresh_token})
    assert (r.status_code, r.json()) == (400, REFRESH_REVOKED)


def test_without_grace_a_second_use_revokes_the_session(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(main, "REFRESH_GRACE_SECONDS", 0)
    stolen = login(client)["refresh_token"]
    rotated = client.post("/refresh", json={"refresh_token": stolen}).json()
    r = client.post("/refresh", json={"refresh_token": stolen})
    assert (r.status_code, r.json()) == (400, REFRESH_REVOKED)
    assert client.get("/users/me", headers=bearer(rotated["access_token"])).status_code == 401


def test_without_grace_a_retry_from_a_worker_whose_clock_is_behind_still_revokes(
    client: TestClient, stopped_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(main, "REFRESH_GRACE_SECONDS", 0)
    stolen = login(client)["refresh_token"]
    client.post("/refresh", json={"refresh_token": stolen})
    stopped_clock.now -= 5  # or a request that read the clock first and reached Redis second
    r = client.post("/refresh", json={"refresh_token": stolen})
    assert (r.status_code, r.json()) == (400, REFRESH_REVOKED)


def test_without_grace_two_refreshes_racing_with_one_token_cannot_both_win(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers can never both rotate the same refresh token: the compare-and-set runs in Redis,
    so however the two interleave, one wins and one is refused."""
    monkeypatch.setattr(main, "REFRESH_GRACE_SECONDS", 0)
    refresh_token = login(client)["refresh_token"]

    async def race() -> list[Any]:
        return await asyncio.gather(
            *(main.refresh_session(refresh_token) for _ in range(2)), return_exceptions=True
        )

    results = client.portal.call(race)
    assert sum(isinstance(result, main.Token) for result in results) == 1
    [refused] = [result for result in results if not isinstance(result, main.Token)]
    assert (refused.status_code, refused.detail) == (400, "Refresh token has been revoked")


def test_a_session_recorded_before_retries_had_grace_still_refreshes(client: TestClient) -> None:
    """Sessions live across an upgrade: their record was the jti alone, as a string."""
    tokens = login(client)
    claims = main.decode_token(tokens["refresh_token"])
    key = main.refresh_key(claims.sid)
    client.portal.call(lambda: main.store.delete(key))
    client.portal.call(lambda: main.store.set(key, claims.jti, exat=claims.exp))
    status = client.get("/is_token_revoked", params={"token": tokens["refresh_token"]}).json()
    r = client.post("/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert (status, r.status_code) == ({"revoked": False, "expired": False}, 200)
    assert session_records(client)[key.encode()][b"previous"] == claims.jti.encode()


def test_asking_about_a_session_recorded_before_retries_had_grace_changes_nothing(client: TestClient) -> None:
    refresh_token = login(client)["refresh_token"]
    claims = main.decode_token(refresh_token)
    key = main.refresh_key(claims.sid)
    client.portal.call(lambda: main.store.delete(key))
    client.portal.call(lambda: main.store.set(key, claims.jti, exat=claims.exp))
    status = client.get("/is_token_revoked", params={"token": refresh_token}).json()
    assert status == {"revoked": False, "expired": False}
    assert client.portal.call(main.store.get, key) == claims.jti.encode()  # asking changed nothing
    assert client.portal.call(main.store.expiretime, key) == claims.exp


def test_a_failed_swap_gets_no_pair_for_the_current_token(client: TestClient) -> None:
    """After a failed swap only a retry gets a pair: were the token current again (a failover
    that lost the swap), minting without a swap would fork the session."""
    claims = main.decode_token(login(client)["refresh_token"])
    assert client.portal.call(main.retry_minted_at, claims, time.time()) is None
    assert client.portal.call(main.is_live_refresh_token, claims) is True


@pytest.mark.parametrize("answer", [0, False])
def test_a_grace_answer_that_is_not_a_moment_is_a_no(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, answer: object
) -> None:
    """What a Redis that speaks RESP3 from Lua returns for the script's `false`."""
    claims = main.decode_token(login(client)["refresh_token"])

    async def script_answering(**_: object) -> object:
        return answer

    monkeypatch.setattr(main, "REFRESH_MINTED_AT", script_answering)
    assert client.portal.call(main.is_live_refresh_token, claims) is False


def test_asking_about_a_refresh_token_does_not_use_it_up(
    client: TestClient, stopped_clock: FakeClock
) -> None:
    refresh_token = login(client)["refresh_token"]
    assert client.post("/introspect", data={"token": refresh_token}).json()["active"] is True
    assert client.get("/is_token_revoked", params={"token": refresh_token}).json()["revoked"] is False
    stopped_clock.now += main.REFRESH_GRACE_SECONDS  # past any grace a use would have started
    assert client.post("/refresh", json={"refresh_token": refresh_token}).status_code == 200


def test_token_status_and_introspection_agree_with_a_refresh(
    client: TestClient, stopped_clock: FakeClock
) -> None:
    rotated = login(client)["refresh_token"]
    client.post("/refresh", json={"refresh_token": rotated})

    def status_and_introspection() -> tuple[dict[str, bool], bool]:
        revoked = client.get("/is_token_revoked", params={"token": rotated}).json()
        return revoked, client.post("/introspect", data={"token": rotated}).json()["active"]

    assert status_and_introspection() == ({"revoked": False, "expired": False}, True)  # a retry would work
    stopped_clock.now += main.REFRESH_GRACE_SECONDS
    assert status_and_introspection() == ({"revoked": True, "expired": False}, False)


def test_a_retry_counts_against_the_rate_limit_like_any_call(client: TestClient) -> None:
    refresh_token = login(client)["refresh_token"]
    statuses = [client.post("/refresh", json={"refresh_token": refresh_token}).status_code for _ in range(21)]
    assert statuses == [200] * 20 + [429]


def test_the_store_holds_no_token(client: TestClient) -> None:
    first = login(client)
    second = client.post("/refresh", json={"refresh_token": first["refresh_token"]}).json()
    client.post("/refresh", json={"refresh_token": first["refresh_token"]})  # a retry
    client.post("/revoke", json={"token": second["access_token"]})
    stored = everything_stored(client)
    assert b"refresh:" in stored and b"revoked:" in stored
    for token in [*first.values(), *second.values()]:
        if isinstance(token, str) and token != "bearer":
            signature = token.rsplit(".", 1)[1]
            assert token.encode() not in stored and signature.encode() not in stored


def test_successor_ids_are_keyed_and_differ_from_their_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    _, parent = main.create_token("jane_doe", "refresh", "s", time.time())
    access_jti, refresh_jti = main.successor_jtis(parent)
    assert len({access_jti, refresh_jti, parent.jti}) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", jti) for jti in (access_jti, refresh_jti))
    monkeypatch.setattr(main, "SECRET_KEY", main.SECRET_KEY + "x")
    assert set(main.successor_jtis(parent)).isdisjoint({access_jti, refresh_jti})


def test_refresh_token_reuse_is_logged_without_token(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    stolen = used_up_refresh_token(client)
    with caplog.at_level(logging.WARNING, logger="uvicorn.app"):
        client.post("/refresh", json={"refresh_token": stolen})
    sid = main.decode_token(stolen).sid
    assert f"stale refresh token, session revoked: sub=jane_doe sid={sid}" in [
        r.getMessage() for r in caplog.records
    ]
    assert stolen not in caplog.text


# Each token is made in its test, not at collection: a 15-minute token could expire in a slow run.
@pytest.mark.parametrize(
    ("token_of", "detail"),
    [
        (lambda: mint("access"), "Wrong token type: expected refresh, got access"),
        (lambda: mint("refresh", now=time.time() - 8 * 24 * 3600), "Token has expired"),
        (lambda: "garbage", "Invalid token"),
    ],
    ids=["access-token", "expired", "garbage"],
)
def test_refresh_refuses_other_tokens(client: TestClient, token_of: Callable[[], str], detail: str) -> None:
    r = client.post("/refresh", json={"refresh_token": token_of()})
    assert r.status_code == 400, r.text
    assert r.json() == oauth2_error(detail, "invalid_grant")
    assert revoked_entries(client) == {}


def test_refresh_refuses_a_user_deleted_since_login(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    refresh_token = login(client)["refresh_token"]
    monkeypatch.delitem(main.USERS, "jane_doe")
    r = client.post("/refresh", json={"refresh_token": refresh_token})
    assert r.status_code == 400, r.text
    assert r.json() == oauth2_error("Unknown user", "invalid_grant")


def test_refresh_fails_closed_without_a_session_record(client: TestClient) -> None:
    tokens = login(client)
    client.portal.call(main.store.delete, *session_records(client))  # as if the store lost it
    r = client.post("/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 400, r.text
    assert r.json() == REFRESH_REVOKED


def test_refresh_refuses_missing_field(client: TestClient) -> None:
    r = client.post("/refresh", json={"token": "x"})
    assert r.status_code == 422, r.text
    assert r.json() == {
        "detail": [{"type": "missing", "loc": ["refresh_token"], "msg": "Field required"}],
        "error": "invalid_request",
        "error_description": "A field is missing or invalid",
    }


def test_refresh_refuses_oversized_token(client: TestClient) -> None:
    r = client.post("/refresh", json={"refresh_token": "x" * 2049})
    assert r.status_code == 400, r.text
    assert r.json() == oauth2_error("Invalid token", "invalid_grant")


# --- 4. Logout and revocation ---


def test_logout_revokes_access_and_refresh_token(client: TestClient) -> None:
    tokens = login(client)
    r = client.post("/logout", headers=bearer(tokens["access_token"]))
    assert r.status_code == 200, r.text
    assert r.json() == {"message": "Logged out"}
    r = client.get("/users/me", headers=bearer(tokens["access_token"]))
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": "Token has been revoked"}
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert client.post("/refresh", json={"refresh_token": tokens["refresh_token"]}).status_code == 400


def test_logout_leaves_other_sessions_alone(client: TestClient) -> None:
    first, second = login(client), login(client)
    client.post("/logout", headers=bearer(first["access_token"]))
    assert client.get("/users/me", headers=bearer(second["access_token"])).status_code == 200


def test_logout_deletes_the_sessions_refresh_record(client: TestClient) -> None:
    client.post("/logout", headers=bearer(login(client)["access_token"]))
    assert session_records(client) == {}


@pytest.mark.parametrize(("access_minutes", "refresh_minutes"), [(15, 7 * 24 * 60), (3, 1)])
def test_session_revocation_lives_until_its_access_tokens_expire(
    client: TestClient,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    access_minutes: int,
    refresh_minutes: int,
) -> None:
    monkeypatch.setattr(main, "ACCESS_TOKEN_LIFETIME", access_minutes * 60)
    monkeypatch.setattr(main, "REFRESH_TOKEN_LIFETIME", refresh_minutes * 60)
    tokens = login(client)
    clock.now += 30
    assert client.post("/logout", headers=bearer(tokens["access_token"])).status_code == 200
    access = main.decode_token(tokens["access_token"])
    until = int(clock.now) + access_minutes * 60 + main.REVOCATION_MARGIN
    assert revoked_entries(client) == {access.sid.encode(): until}
    clock.now = access.exp - 1  # the last second in which the access token would still work
    client.portal.call(main.remove_expired_revocations, clock.now)
    r = client.get("/users/me", headers=bearer(tokens["access_token"]))
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": "Token has been revoked"}


def test_a_token_minted_just_after_its_sessions_logout_stays_revoked_until_it_expires(
    client: TestClient, clock: FakeClock
) -> None:
    """A refresh racing the logout, or a worker whose clock runs ahead, can mint a token a little
    after the logout's `now`: the session's entry must outlive it too."""
    late_access, claims = main.create_token("jane_doe", "access", "session-1", clock.now)
    logout_at = clock.now - 59  # the racing refresh (or a clock ahead) minted it 59 s after
    client.portal.call(main.revoke_session, "session-1", logout_at)
    clock.now = claims.exp - 1  # the token's last second
    client.portal.call(main.remove_expired_revocations, clock.now)
    r = client.get("/users/me", headers=bearer(late_access))
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": "Token has been revoked"}


def test_revoking_again_never_shortens_a_revocation(client: TestClient) -> None:
    """A second revocation with an earlier deadline (another worker's clock a little behind, say)
    must not shorten the first: the entry would expire while tokens it blocks still live."""
    now = time.time()
    client.portal.call(main.revoke_session, "session-1", now)
    client.portal.call(main.revoke_session, "session-1", now - 100)
    assert revoked_entries(client) == {
        b"session-1": int(now) + main.ACCESS_TOKEN_LIFETIME + main.REVOCATION_MARGIN
    }


def test_revocation_sets_spread_sessions_and_keep_each_session_in_one() -> None:
    sessions = [f"session-{n}" for n in range(2000)]
    counts = Counter(main.revoked_key(sid) for sid in sessions)
    assert len(counts) == main.REVOKED_SETS
    assert max(counts.values()) < 2 * len(sessions) / main.REVOKED_SETS
    assert main.revoked_key("session-7") == main.revoked_key("session-7")
    # On a 3-master cluster (slots split in three, as redis-cli --cluster create does): ~1/3 each.
    per_master = Counter(
        redis.cluster.key_slot(main.revoked_key(sid).encode()) * 3 // 16384 for sid in sessions
    )
    assert max(per_master.values()) < 0.4 * len(sessions)


def test_garbage_never_grows_the_store(client: TestClient) -> None:
    for token in ["x", "a.b.c", mint(now=time.time() - 3600)]:
        client.post("/revoke", json={"token": token})
        client.get("/is_token_revoked", params={"token": token})
        client.post("/refresh", json={"refresh_token": token})
        client.get("/users/me", headers=bearer(token))
    assert (revoked_entries(client), session_records(client)) == ({}, {})


def test_revoked_token_use_is_logged_without_token(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    token = login(client)["access_token"]
    client.post("/logout", headers=bearer(token))
    with caplog.at_level(logging.WARNING, logger="uvicorn.app"):
        client.get("/users/me", headers=bearer(token))
    jti = main.decode_token(token).jti
    assert f"revoked token used: sub=jane_doe jti={jti}" in [r.getMessage() for r in caplog.records]
    assert token not in caplog.text


# --- 5. The cleanup task ---


def test_cleanup_removes_only_expired_entries(client: TestClient) -> None:
    now = time.time()
    for n in range(main.REVOKED_SETS):  # every set gets one of each
        entries = {f"dead-{n}": int(now) - 1, f"at-edge-{n}": int(now), f"alive-{n}": int(now) + 60}
        client.portal.call(
            lambda n=n, entries=entries: main.store.zadd(f"{main.REVOKED_KEY_PREFIX}{n}", entries)
        )
    removed = client.portal.call(main.remove_expired_revocations, now)
    assert removed == main.REVOKED_SETS
    assert set(revoked_entries(client)) == {
        f"{kind}-{n}".encode() for kind in ("at-edge", "alive") for n in range(main.REVOKED_SETS)
    }


def test_cleanup_never_unrevokes_a_live_token(client: TestClient) -> None:
    token = login(client)["access_token"]
    client.post("/logout", headers=bearer(token))
    client.portal.call(main.remove_expired_revocations, time.time() + main.ACCESS_TOKEN_LIFETIME)
    assert client.get("/users/me", headers=bearer(token)).status_code == 401


def test_store_empties_once_everything_has_expired(client: TestClient) -> None:
    revoked_one = login(client)
    client.post("/revoke", json={"token": revoked_one["access_token"]})
    client.post("/logout", headers=bearer(login(client)["access_token"]))
    assert len(revoked_entries(client)) == 2
    after_every_token_expired = time.time() + main.REFRESH_TOKEN_LIFETIME + 1
    client.portal.call(main.remove_expired_revocations, after_every_token_expired)
    assert revoked_entries(client) == {}
    # What is left is the first session's refresh record, which Redis expires with its token.
    claims = main.decode_token(revoked_one["refresh_token"])
    assert list(session_records(client)) == [(main.REFRESH_KEY_PREFIX + claims.sid).encode()]


def test_lifespan_runs_the_cleanup_task_and_cancels_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main, "settings", main.settings.model_copy(update={"cleanup_interval_seconds": 0.01}))
    with TestClient(main.app) as client:
        task = main.app.state.cleanup_task
        key = main.revoked_key("session-1")
        client.portal.call(lambda: main.store.zadd(key, {"expired": int(time.time()) - 1}))
        wait_until(lambda: client.portal.call(main.store.zcard, key) == 0, "the cleanup task")
        assert not task.done()
    # Stopped with the app: cancelled, or, when the cancellation landed inside a store command
    # (redis-py turns it into a ConnectionError), ended by the stop event that the lifespan sets.
    assert task.done() and (task.cancelled() or task.exception() is None)


def test_cleanup_task_logs_store_errors_and_tries_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    down, cluster_down = RedisConnectionError("down"), ClusterDownError("CLUSTERDOWN")
    outcomes: list[Any] = [down, cluster_down, 3, asyncio.CancelledError()]
    calls: list[float] = []

    async def flaky(now: float) -> int:
        calls.append(now)
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(main, "remove_expired_revocations", flaky)
    with caplog.at_level(logging.INFO, logger="uvicorn.app"), pytest.raises(asyncio.CancelledError):
        asyncio.run(main.cleanup_revocations_forever(0, asyncio.Event()))
    assert len(calls) == 4
    assert [r.getMessage() for r in caplog.records] == [
        f"revocation cleanup failed, retrying in 0s: {down!r}",
        f"revocation cleanup failed, retrying in 0s: {cluster_down!r}",
        "revocation cleanup removed 3 expired entries",
    ]


def test_cleanup_task_stops_even_if_redis_py_swallows_the_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stopping, calls = asyncio.Event(), 0

    async def cancelled_mid_command(now: float) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:  # the loop came round again, past the stop: end it, and let the assert say so
            raise asyncio.CancelledError
        stopping.set()  # what the lifespan does on shutdown...
        raise RedisConnectionError("connection closed")  # ...and how a cancelled command can end

    async def how_it_ended() -> str:
        try:
            await main.cleanup_revocations_forever(0, stopping)
        except asyncio.CancelledError:
            return f"still running after {calls} rounds"
        return "stopped"

    monkeypatch.setattr(main, "remove_expired_revocations", cancelled_mid_command)
    assert asyncio.run(how_it_ended()) == "stopped"
    assert calls == 1


# --- 6. Rate limits: SlowAPI's storage, awaited on the event loop ---


def live_greenlets() -> list[greenlet.greenlet]:
    """Greenlets started and not finished, but for each thread's own (which have no parent)."""
    gc.collect()
    return [g for g in gc.get_objects() if isinstance(g, greenlet.greenlet) and g and g.parent is not None]


def connections_in_use() -> int:
    if CLUSTER:  # redis-py's ClusterNode has no public count of its busy connections: read its lists
        return sum(len(set(node._connections) - set(node._free)) for node in main.store.get_nodes())
    counts = main.store.connection_pool.get_connection_count()  # (count, attributes): idle, then used
    return sum(count for count, attributes in counts if attributes["db.client.connection.state"] == "used")


def test_counting_touches_redis_only_from_the_event_loops_thread(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = login(client)["access_token"]
    threads: list[threading.Thread] = []
    connection_class = STORE_CONNECTION_CLASS
    send = connection_class.send_packed_command

    async def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        threads.append(threading.current_thread())
        await send(self, *args, **kwargs)

    monkeypatch.setattr(connection_class, "send_packed_command", spy)
    assert call_statuses(client, token, 3) == [200, 200, 429]
    loop_thread = client.portal.call(threading.current_thread)
    # At least one send a call; how many (a pipeline may be one send or several) is redis-py's affair.
    assert len(threads) >= 3
    assert set(threads) == {loop_thread}


def test_redis_error_inside_a_count_is_a_503(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    token = login(client)["access_token"]

    async def unreachable(*args: Any, **kwargs: Any) -> tuple[bool, main.Window]:
        raise RedisConnectionError("Connection refused")

    monkeypatch.setattr(main, "count_and_read", unreachable)
    r = client.get("/users/me", headers=bearer(token))
    assert r.status_code == 503, r.text
    assert r.json() == STORE_DOWN
    assert live_greenlets() == []


def test_cancelled_count_leaves_no_greenlet_or_connection_behind(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection_class = STORE_CONNECTION_CLASS
    # Stalls below read_response(), which closes the connection whatever stops a read (cancellation
    # too); neither redis-py nor fakeredis has a public hook there, so this patches their private one.
    fake = issubclass(connection_class, fakeredis.FakeAsyncRedisConnection)
    reader = "_read_response" if fake else "_read_response_from_parser"
    stalled = asyncio.Event()
    read = getattr(connection_class, reader)

    async def stalling_read(self: Any, *args: Any, **kwargs: Any) -> Any:
        if stalling:
            stalled.set()
            await asyncio.Event().wait()  # no answer, until the task is cancelled
        return await read(self, *args, **kwargs)

    async def cancel_mid_count() -> None:
        task = asyncio.create_task(call_app("/is_token_revoked", b"token=x"))
        await stalled.wait()
        assert (len(live_greenlets()), connections_in_use()) == (1, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    client.portal.call(call_app, "/is_token_revoked", b"token=x")  # the scripts are loaded
    stalling = True
    monkeypatch.setattr(connection_class, reader, stalling_read)
    client.portal.call(cancel_mid_count)
    assert live_greenlets() == []
    assert connections_in_use() == 0
    stalling = False
    r = client.get("/health")
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("scripts_left", [[], ["COUNT_SCRIPT"], ["WINDOW_SCRIPT"]])
def test_counts_stay_exact_when_redis_has_lost_its_scripts(
    client: TestClient, clock: FakeClock, scripts_left: list[str]
) -> None:
    """After a Redis restart the count's Lua scripts are gone: each is loaded again, and a count
    that did run is not run twice."""
    token = login(client)["access_token"]
    client.portal.call(main.store.script_flush)
    for name in scripts_left:
        client.portal.call(main.store.script_load, getattr(main, name).script)
    r = client.get("/users/me", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert (r.headers["x-ratelimit-remaining"], r.headers["ratelimit"]) == ("1", '"free";r=1;t=61')
    assert call_statuses(client, token, 2) == [200, 429]


@pytest.mark.parametrize(
    "method", ["get_moving_window", "check", "incr", "get", "get_expiry", "reset", "clear"]
)
def test_bridge_storage_refuses_what_slowapis_moving_window_never_calls(method: str) -> None:
    with pytest.raises(NotImplementedError) as error:
        getattr(main.AsyncBridgeStorage("async-bridge://"), method)("key", 1, 60)
    assert str(error.value) == "SlowAPI's moving window calls only acquire_entry()"


# --- 6. Rate limits: whom the per-IP limits count (client_ip) ---


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8::ffff:1", "2001:db8::/64"),  # the same /64: one client
        ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
        ("::ffff:127.0.0.2", "127.0.0.2"),  # IPv4 on a dual-stack listener: each address its own
        ("64:ff9b::c000:201", "192.0.2.1"),  # IPv4 through NAT64's well-known prefix
        ("1.2.3.4\x85INFO: forged", "unknown"),  # an X-Forwarded-For a proxy passed on unchecked
        ("9" * 30_000, "unknown"),
        ("testclient", "unknown"),
    ],
)
def test_per_ip_limits_count_addresses_and_ipv6_networks(host: str, key: str) -> None:
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": [], "client": (host, 1)})
    assert main.client_ip(request) == key


def test_a_request_without_a_client_address_counts_as_unknown() -> None:
    assert main.client_ip(Request({"type": "http", "client": None, "headers": []})) == "unknown"


# --- 6. Rate limits: each user's plan, on the plan-limited endpoints ---


@pytest.mark.parametrize(
    ("username", "limit"), [("jane_doe", "2"), ("john_doe", "10"), ("admin_doe", "9999")]
)
def test_limit_follows_the_users_plan(client: TestClient, username: str, limit: str) -> None:
    r = client.get("/plan-limited-endpoint", headers=bearer(login(client, username)["access_token"]))
    assert r.status_code == 200, r.text
    assert r.headers["x-ratelimit-limit"] == limit


def test_premium_plan_allows_ten_calls(client: TestClient) -> None:
    token = login(client, "john_doe")["access_token"]
    assert call_statuses(client, token, 11, "/plan-limited-endpoint") == [200] * 10 + [429]


def test_limit_holds_in_any_rolling_window(client: TestClient, clock: FakeClock) -> None:
    """Two calls at 0 s and 59 s: a fixed window would allow two more at 61 s; a moving one allows one."""
    token = login(client)["access_token"]
    assert client.get("/users/me", headers=bearer(token)).status_code == 200
    clock.now += 59
    assert client.get("/users/me", headers=bearer(token)).status_code == 200
    clock.now += 2
    assert client.get("/users/me", headers=bearer(token)).status_code == 200
    r = client.get("/users/me", headers=bearer(token))
    assert r.status_code == 429, r.text


def test_limits_are_per_user_not_per_ip(client: TestClient) -> None:
    jane = login(client, "jane_doe")["access_token"]
    jane_again = login(client, "jane_doe")["access_token"]
    other = mint(username="admin_doe")
    assert call_statuses(client, jane, 2) == [200, 200]
    assert client.get("/users/me", headers=bearer(jane_again)).status_code == 429  # same user, new login
    assert client.get("/users/me", headers=bearer(other)).status_code == 200  # same IP, other user


def test_limits_are_per_endpoint(client: TestClient) -> None:
    token = login(client)["access_token"]
    assert call_statuses(client, token, 3) == [200, 200, 429]
    r = client.get("/plan-limited-endpoint", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert r.headers["x-ratelimit-remaining"] == "1"


def test_plan_change_applies_to_existing_tokens(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    token = login(client, "jane_doe")["access_token"]
    monkeypatch.setitem(main.USERS, "jane_doe", replace(main.USERS["jane_doe"], plan=main.Plan.PREMIUM))
    r = client.get("/premium-only-endpoint", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert r.headers["x-ratelimit-limit"] == "10"


def test_every_route_tagged_plan_limited_counts_the_plan_limit(client: TestClient) -> None:
    """/rate-limit-status lists the routes by their tag: each must count the plan's limit."""
    paths = main.plan_limited_paths(main.Plan.PREMIUM)
    assert paths == ("/plan-limited-endpoint", "/premium-only-endpoint", "/users/me")
    token = login(client, "admin_doe")["access_token"]
    for path in paths:
        r = client.get(path, headers=bearer(token))
        assert r.status_code == 200, r.text
        assert r.headers["ratelimit-policy"] == '"admin";q=9999;w=60'


def test_premium_only_refuses_free_plan_by_name(client: TestClient) -> None:
    r = client.get("/premium-only-endpoint", headers=bearer(login(client)["access_token"]))
    assert r.status_code == 403, r.text
    assert r.json() == {"detail": "This endpoint needs the premium or admin plan; yours is free"}


def test_premium_only_403_costs_no_quota(client: TestClient) -> None:
    token = login(client)["access_token"]
    assert call_statuses(client, token, 3, "/premium-only-endpoint") == [403, 403, 403]


@pytest.mark.parametrize("username", ["john_doe", "admin_doe"])
def test_premium_only_admits_premium_and_admin(client: TestClient, username: str) -> None:
    r = client.get("/premium-only-endpoint", headers=bearer(login(client, username)["access_token"]))
    assert r.status_code == 200, r.text
    assert r.json() == {"message": f"Welcome to the premium area, {username}"}


def test_429_is_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    token = login(client)["access_token"]
    with caplog.at_level(logging.WARNING, logger="uvicorn.app"):
        assert call_statuses(client, token, 3) == [200, 200, 429]
    assert "rate limit 2 per 1 minute exceeded on /users/me by 'jane_doe'" in caplog.text


# --- The app: what /docs shows (OpenAPI) ---


def test_openapi_documents_the_token_endpoints_bodies_and_error_models(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    token = spec["paths"]["/token"]["post"]
    for code, model in [("422", "ValidationErrorOut"), ("401", "ErrorOut")]:
        schema = token["responses"][code]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{model}"}
    body = token["requestBody"]
    assert body["required"] is True
    both = {"anyOf": [main.PasswordGrant.model_json_schema(), main.RefreshGrant.model_json_schema()]}
    assert body["content"] == {t: {"schema": both} for t in ("application/json", main.FORM_TYPE)}
    refresh = spec["paths"]["/refresh"]["post"]["requestBody"]["content"]
    assert refresh == {
        t: {"schema": main.RefreshGrant.model_json_schema()} for t in ("application/json", main.FORM_TYPE)
    }


@pytest.mark.parametrize(
    ("path", "method", "codes"),
    [
        ("/token", "post", {"200", "400", "401", "413", "415", "422", "429", "503"}),
        ("/refresh", "post", {"200", "400", "401", "413", "415", "422", "429", "503"}),
        ("/logout", "post", {"200", "401", "503"}),
        ("/revoke", "post", {"200", "400", "413", "415", "422", "429", "503"}),
        ("/introspect", "post", {"200", "400", "413", "415", "422", "429", "503"}),
        ("/.well-known/oauth-authorization-server", "get", {"200"}),
        ("/is_token_revoked", "get", {"200", "401", "422", "429", "503"}),
        ("/plan-limited-endpoint", "get", {"200", "401", "429", "503"}),
        ("/premium-only-endpoint", "get", {"200", "401", "403", "429", "503"}),
        ("/users/me", "get", {"200", "401", "429", "503"}),
        ("/rate-limit-status", "get", {"200", "401", "503"}),
        ("/health", "get", {"200", "503"}),
    ],
)
def test_openapi_documents_every_response(
    client: TestClient, path: str, method: str, codes: set[str]
) -> None:
    operation = client.get("/openapi.json").json()["paths"][path][method]
    assert operation["summary"]
    assert set(operation["responses"]) == codes


def test_openapi_documents_every_422_with_the_body_the_app_sends(client: TestClient) -> None:
    # FastAPI's default 422 schema (HTTPValidationError) has `input` and `ctx`, which this app drops.
    spec = client.get("/openapi.json").json()
    documented = {
        path: operation["responses"]["422"]["content"]["application/json"]["schema"]
        for path, operations in spec["paths"].items()
        for operation in operations.values()
        if "422" in operation["responses"]
    }
    ours = {"$ref": "#/components/schemas/ValidationErrorOut"}
    assert documented == dict.fromkeys(
        ["/token", "/refresh", "/revoke", "/introspect", "/is_token_revoked"], ours
    )
    assert "HTTPValidationError" not in spec["components"]["schemas"]


# --- Endpoints: logging in and the anonymous endpoints, limited per IP ---


def test_login_is_limited_per_ip_and_username(client: TestClient) -> None:
    for _ in range(5):
        r = client.post("/token", json={"username": "jane_doe", "password": "wrong"})
        assert r.status_code == 400, r.text
    r = client.post("/token", json={"username": "jane_doe", "password": "password456"})
    assert r.status_code == 429, r.text
    assert r.json() == oauth2_error("Rate limit exceeded: 5 per 1 minute", "temporarily_unavailable")
    assert rate_headers(r)["x-ratelimit-limit"] == "5"
    login(client, "john_doe")  # another username from the same IP still gets through


def test_login_limit_keys_never_collide(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """2001:db8::1 logging in as 5:jane_doe must not use up 2001:db8::1:5's tries as jane_doe."""
    monkeypatch.setattr(main, "client_ip", lambda request: request.headers["x-test-ip"])
    for _ in range(5):
        r = client.post(
            "/token", json={"username": "5:jane_doe", "password": "x"}, headers={"x-test-ip": "2001:db8::1"}
        )
        assert r.status_code == 400, r.text
    r = client.post(
        "/token",
        json={"username": "jane_doe", "password": "password456"},
        headers={"x-test-ip": "2001:db8::1:5"},
    )
    assert r.status_code == 200, r.text


def test_a_login_the_per_ip_limit_refuses_stores_nothing(client: TestClient) -> None:
    """The per-IP limit is checked first: a guess it refuses leaves no key, neither a login limit's
    for its username nor a backoff's failure count."""
    for n in range(20):  # the per-IP limit, each under a name of its own
        r = client.post("/token", json={"username": f"guess{n}", "password": "x"})
        assert r.status_code == 400, r.text
    assert len(store_keys(client, "login:*")) == 20  # a failure count for each username tried
    keys_before = set(store_keys(client))
    r = client.post("/token", json={"username": "one-more-name", "password": "x"})
    assert r.status_code == 429, r.text
    assert r.json() == oauth2_error("Rate limit exceeded: 20 per 1 minute", "temporarily_unavailable")
    assert set(store_keys(client)) == keys_before


def test_anonymous_endpoints_are_limited_per_ip(client: TestClient) -> None:
    token = mint()
    for _ in range(20):
        assert client.get("/is_token_revoked", params={"token": token}).status_code == 200
    r = client.get("/is_token_revoked", params={"token": token})
    assert r.status_code == 429, r.text
    assert r.json() == {"detail": "Rate limit exceeded: 20 per 1 minute"}
    assert r.headers["x-ratelimit-limit"] == "20"


@pytest.mark.parametrize(
    ("path", "send", "status"),
    [
        ("/refresh", {"json": {"refresh_token": "garbage"}}, 400),
        ("/revoke", {"data": {"token": "garbage"}}, 200),
        ("/introspect", {"data": {"token": "garbage"}}, 200),
    ],
)
def test_anonymous_posts_are_limited_per_ip(
    client: TestClient, path: str, send: dict[str, Any], status: int
) -> None:
    statuses = [client.post(path, **send).status_code for _ in range(21)]
    assert statuses == [status] * 20 + [429]
    r = client.post(path, **send)
    assert r.json() == oauth2_error("Rate limit exceeded: 20 per 1 minute", "temporarily_unavailable")
    assert r.headers["x-ratelimit-limit"] == "20"
    assert r.headers["ratelimit"].startswith('"ip";r=0;t=')


def test_health_and_logout_are_never_rate_limited(client: TestClient) -> None:
    for _ in range(25):
        r = client.get("/health")
        assert r.status_code == 200, r.text
    assert rate_headers(r) == {}
    r = client.post("/logout", headers=bearer(login(client)["access_token"]))
    assert r.status_code == 200, r.text
    assert rate_headers(r) == {}


def test_logout_works_after_plan_limit_is_used_up(client: TestClient) -> None:
    token = login(client)["access_token"]
    assert call_statuses(client, token, 3) == [200, 200, 429]
    r = client.post("/logout", headers=bearer(token))
    assert r.status_code == 200, r.text


# --- Endpoints: health ---


def test_health(client: TestClient) -> None:
    r = client.get("/health")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "store": "redis" if main.settings.redis_uri else "embedded"}


@EMBEDDED_ONLY
def test_health_is_503_when_store_is_down(client: TestClient, store_down: None) -> None:
    r = client.get("/health")
    assert r.status_code == 503, r.text
    assert r.json() == STORE_DOWN


# --- Request bodies: JSON, a form or multipart ---


def test_login_rejects_malformed_json(client: TestClient) -> None:
    r = client.post("/token", content=b'{"username": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json() == oauth2_error("Request body is malformed", "invalid_request")


@pytest.mark.parametrize("path", ["/token", "/refresh", "/revoke", "/introspect"])
def test_deeply_nested_json_is_a_400(client: TestClient, path: str) -> None:
    r = client.post(path, content=b"[" * 1000, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json() == oauth2_error("Request body is malformed", "invalid_request")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/revoke", '{"token": "\\ud800"}'),
        ("/refresh", '{"refresh_token": "\\ud800"}'),
        ("/token", '{"username": "\\ud800", "password": "x"}'),
        ("/token", '{"username": "jane_doe", "password": "\\udfff"}'),
    ],
)
def test_lone_surrogate_in_json_is_a_422(client: TestClient, path: str, body: str) -> None:
    r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert [error["type"] for error in r.json()["detail"]] == ["string_unicode"]


def test_login_rejects_other_content_types(client: TestClient) -> None:
    r = client.post("/token", content=b"jane_doe:password456", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415, r.text
    detail = "Send application/json, application/x-www-form-urlencoded or multipart/form-data"
    assert r.json() == oauth2_error(detail, "invalid_request")


def test_a_body_without_a_content_type_is_a_415(client: TestClient) -> None:
    r = client.post("/token", content=b"x")
    assert r.status_code == 415, r.text
    detail = "Send application/json, application/x-www-form-urlencoded or multipart/form-data"
    assert r.json() == oauth2_error(detail, "invalid_request")


def test_refresh_accepts_the_rfc6749_form(client: TestClient) -> None:
    form = {"grant_type": "refresh_token", "refresh_token": login(client)["refresh_token"]}
    r = client.post("/refresh", data=form)
    assert r.status_code == 200, r.text
    assert no_store_headers(r) == NO_STORE
    assert set(r.json()) == {"access_token", "refresh_token", "token_type", "expires_in"}


def test_login_takes_multipart_form_data_as_a_browsers_formdata_sends_it(client: TestClient) -> None:
    fields = {"username": (None, "jane_doe"), "password": (None, PASSWORDS["jane_doe"])}
    r = client.post("/token", files=fields)
    assert r.status_code == 200, r.text
    assert r.request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert set(r.json()) == {"access_token", "refresh_token", "token_type", "expires_in"}


def test_a_multipart_login_with_a_file_is_a_400(client: TestClient) -> None:
    r = client.post("/token", files={"username": ("name.txt", b"jane_doe"), "password": (None, "x")})
    assert r.status_code == 400, r.text
    assert r.json() == oauth2_error("Too many files. Maximum number of files is 0.", "invalid_request")


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (
            {
                "content": b'{"username": "john_doe", "username": "jane_doe", "password": "password456"}',
                "headers": {"Content-Type": "application/json"},
            },
            "A JSON field appears more than once",
        ),
        (
            {
                "content": "username=john_doe&username=jane_doe&password=password456",
                "headers": {"Content-Type": "application/x-www-form-urlencoded"},
            },
            "A form field appears more than once",
        ),
        (
            {
                "files": [
                    ("username", (None, "jane_doe")),
                    ("username", (None, "john_doe")),
                    ("password", (None, "x")),
                ]
            },
            "A form field appears more than once",
        ),
    ],
    ids=["json", "form", "multipart"],
)
def test_a_field_sent_twice_is_refused(client: TestClient, body: dict[str, Any], detail: str) -> None:
    r = client.post("/token", **body)
    assert r.status_code == 400, r.text
    assert r.json() == oauth2_error(detail, "invalid_request")


def test_a_form_field_this_app_does_not_read_may_appear_twice(client: TestClient) -> None:
    body = "username=jane_doe&password=password456&scope=a&scope=b"
    r = client.post("/token", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("grant_type", ["authorization_code", "client_credentials", "PASSWORD", ""])
def test_token_endpoint_refuses_other_grant_types(client: TestClient, grant_type: str) -> None:
    r = client.post(
        "/token", data={"grant_type": grant_type, "username": "jane_doe", "password": "password456"}
    )
    assert r.status_code == 400, r.text
    assert r.json() == oauth2_error("grant_type must be password or refresh_token", "unsupported_grant_type")
    assert no_store_headers(r) == NO_STORE


def test_refresh_refuses_another_grant_type(client: TestClient) -> None:
    r = client.post(
        "/refresh", data={"grant_type": "password", "refresh_token": login(client)["refresh_token"]}
    )
    assert r.status_code == 422, r.text
    assert [error["loc"] for error in r.json()["detail"]] == [["grant_type"]]


# --- Error responses: RFC 6749's fields, a 503 while the store is down, no caching ---


def test_login_response_is_not_cached(client: TestClient) -> None:
    r = client.post(
        "/token", data={"grant_type": "password", "username": "jane_doe", "password": "password456"}
    )
    assert r.status_code == 200, r.text
    assert no_store_headers(r) == NO_STORE


@pytest.mark.parametrize(
    ("path", "send", "status"),
    [
        ("/refresh", lambda token: {"content": token, "headers": {"Content-Type": "text/plain"}}, 415),
        ("/refresh", lambda token: {"json": {"refresh_token": {"t": token}}}, 422),
        ("/revoke", lambda token: {"json": {"token": {"t": token}}}, 422),
        ("/revoke", lambda token: {"json": {"token": ""}}, 422),
        ("/token", lambda token: {"json": {"username": ["jane_doe"], "password": token}}, 422),
        ("/token", lambda token: {"data": {"username": "", "password": token}}, 422),
    ],
)
def test_errors_never_echo_what_was_sent(
    client: TestClient, path: str, send: Callable[[str], dict[str, Any]], status: int
) -> None:
    token = login(client)["refresh_token"]
    r = client.post(path, **send(token))
    assert r.status_code == status, r.text
    assert token not in r.text
    assert r.json()["error"] == "invalid_request"


@EMBEDDED_ONLY
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/users/me"),
        ("GET", "/plan-limited-endpoint"),
        ("GET", "/rate-limit-status"),
        ("POST", "/logout"),
    ],
)
def test_authenticated_endpoints_fail_closed_when_store_is_down(
    client: TestClient, method: str, path: str
) -> None:
    token = login(client)["access_token"]
    with embedded_store_down():
        r = client.request(method, path, headers=bearer(token))
    assert r.status_code == 503, r.text
    assert r.json() == STORE_DOWN


@EMBEDDED_ONLY
def test_login_is_503_when_store_is_down(client: TestClient, store_down: None) -> None:
    r = client.post("/token", json={"username": "jane_doe", "password": "password456"})
    assert r.status_code == 503, r.text
    assert r.json() == oauth2_error(STORE_DOWN["detail"], "temporarily_unavailable")


@EMBEDDED_ONLY
def test_app_recovers_when_store_is_back(client: TestClient) -> None:
    token = login(client)["access_token"]
    with embedded_store_down():
        assert client.get("/users/me", headers=bearer(token)).status_code == 503
    r = client.get("/users/me", headers=bearer(token))
    assert r.status_code == 200, r.text


def test_cluster_error_is_a_503(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    token = login(client)["access_token"]

    async def cluster_down(claims: main.TokenClaims) -> bool:
        raise ClusterDownError("CLUSTERDOWN The cluster is down")

    monkeypatch.setattr(main, "is_revoked", cluster_down)
    r = client.get("/users/me", headers=bearer(token))
    assert r.status_code == 503, r.text
    assert r.json() == STORE_DOWN


# --- Rate-limit headers, exact ---


def ietf_headers(r: Any) -> dict[str, str]:
    return {name: r.headers[name] for name in ("ratelimit-policy", "ratelimit")}


def test_plan_limited_endpoint_sends_rate_limit_headers(client: TestClient, clock: FakeClock) -> None:
    token = login(client)["access_token"]
    r = client.get("/plan-limited-endpoint", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert r.json() == {"message": "Hello jane_doe, you are on the free plan"}
    assert rate_headers(r) == {
        "x-ratelimit-limit": "2",
        "x-ratelimit-remaining": "1",
        "x-ratelimit-reset": str(int(clock.now) + 61),
    }


def test_counted_call_sends_the_ietf_ratelimit_fields(client: TestClient, clock: FakeClock) -> None:
    token = login(client)["access_token"]
    r = client.get("/plan-limited-endpoint", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert ietf_headers(r) == {"ratelimit-policy": '"free";q=2;w=60', "ratelimit": '"free";r=1;t=61'}


def test_free_plan_gets_429_on_third_call_with_retry_after(client: TestClient, clock: FakeClock) -> None:
    token = login(client)["access_token"]
    first_hit = clock.now
    for _ in range(2):
        assert client.get("/users/me", headers=bearer(token)).status_code == 200
    clock.now += 10.25
    r = client.get("/users/me", headers=bearer(token))
    assert r.status_code == 429, r.text
    assert r.json() == {"detail": "Rate limit exceeded: 2 per 1 minute"}
    reset = first_hit + 60
    assert rate_headers(r) == {
        "x-ratelimit-limit": "2",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": str(int(reset) + 1),
        "retry-after": "50",  # 49.75 s to wait, rounded up
    }


def test_429_sends_ratelimit_with_no_calls_left_and_retry_after_to_match(
    client: TestClient, clock: FakeClock
) -> None:
    token = login(client)["access_token"]
    assert call_statuses(client, token, 2) == [200, 200]
    clock.now += 10
    r = client.get("/users/me", headers=bearer(token))
    assert r.status_code == 429, r.text
    assert ietf_headers(r) == {"ratelimit-policy": '"free";q=2;w=60', "ratelimit": '"free";r=0;t=51'}
    assert r.headers["retry-after"] == "51"


def test_call_succeeds_once_retry_after_has_passed(client: TestClient, clock: FakeClock) -> None:
    token = login(client)["access_token"]
    assert call_statuses(client, token, 2) == [200, 200]
    r = client.get("/users/me", headers=bearer(token))
    assert r.status_code == 429, r.text
    clock.now += int(r.headers["retry-after"])
    r = client.get("/users/me", headers=bearer(token))
    assert r.status_code == 200, r.text


def test_retry_after_is_one_second_in_the_windows_last_second(client: TestClient, clock: FakeClock) -> None:
    token = login(client)["access_token"]
    first_hit = clock.now
    assert call_statuses(client, token, 2) == [200, 200]
    clock.now = first_hit + 59.5
    r = client.get("/users/me", headers=bearer(token))
    assert r.status_code == 429, r.text
    assert (r.headers["retry-after"], r.headers["ratelimit"]) == ("1", '"free";r=0;t=1')


def test_reset_allows_for_a_timestamp_that_redis_gives_back_a_hair_early() -> None:
    """A window's oldest hit comes back from Redis up to 0.05 ms off: one that reads 99.9995 may
    have been 100.0, so room comes in second 101 (late by a second at worst, never early)."""
    assert main.first_second_with_room(99.9995) == 101


def test_login_lists_both_policies_and_reports_the_nearest_exhaustion(
    client: TestClient, clock: FakeClock
) -> None:
    r = client.post("/token", json={"username": "jane_doe", "password": "password456"})
    assert r.status_code == 200, r.text
    assert ietf_headers(r) == {
        "ratelimit-policy": '"ip";q=20;w=60, "ip+username";q=5;w=60',
        "ratelimit": '"ip+username";r=4;t=61',
    }
    assert (r.headers["x-ratelimit-limit"], r.headers["x-ratelimit-remaining"]) == ("5", "4")


def test_login_headers_speak_for_the_ip_limit_when_it_is_nearer(
    client: TestClient, stopped_clock: FakeClock
) -> None:
    for n in range(17):
        client.post("/token", json={"username": f"user{n}", "password": "wrong"})
    r = client.post("/token", json={"username": "jane_doe", "password": "password456"})
    assert r.status_code == 200, r.text
    assert (r.headers["x-ratelimit-limit"], r.headers["x-ratelimit-remaining"]) == ("20", "2")
    assert r.headers["ratelimit"] == '"ip";r=2;t=61'


def test_headers_speak_for_the_window_that_frees_up_last_when_both_are_as_full(
    stopped_clock: FakeClock,
) -> None:
    oldest_hit = stopped_clock.now - 30
    sooner = main.Window("LIMITER/1.2.3.4//token/5/1/minute", 5, 60, 5, oldest_hit)
    later = main.Window("LIMITER/1.2.3.4|jane//token/5/1/hour", 5, 3600, 5, oldest_hit)
    assert main.rate_limit_headers([sooner, later]) == {
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(math.floor(oldest_hit + 3600) + 1),
        "RateLimit-Policy": '"ip";q=5;w=60, "ip+username";q=5;w=3600',
        "RateLimit": '"ip+username";r=0;t=3571',
    }


@pytest.mark.parametrize(
    ("failed_call", "status", "policy", "left"),
    [
        (
            lambda client: client.post("/token", json={"username": "jane_doe", "password": "x"}),
            400,
            "ip+username",
            4,
        ),
        (
            lambda client: client.post("/refresh", json={"refresh_token": used_up_refresh_token(client)}),
            400,
            "ip",
            17,
        ),
        (lambda client: client.get("/is_token_revoked", params={"token": "garbage"}), 401, "ip", 19),
    ],
    ids=["wrong-password", "stale-refresh-token", "garbage-token"],
)
def test_a_counted_failure_still_says_what_is_left(
    client: TestClient,
    clock: FakeClock,
    failed_call: Callable[[TestClient], Any],
    status: int,
    policy: str,
    left: int,
) -> None:
    r = failed_call(client)
    assert r.status_code == status, r.text
    assert r.headers["x-ratelimit-remaining"] == str(left)
    assert r.headers["ratelimit"] == f'"{policy}";r={left};t=61'


# --- Body size ---


async def post_in_chunks(path: str, chunks: list[bytes]) -> tuple[int, Any]:
    """A JSON POST through the whole app, its body in `chunks` with no Content-Length, as uvicorn
    passes on a chunked upload (TestClient would join them into one): the status and JSON body."""
    headers = [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
        "client": ("198.51.100.7", 1), "server": ("testserver", 80),
    }  # fmt: skip
    messages = [{"type": "http.request", "body": chunk, "more_body": True} for chunk in chunks]
    messages.append({"type": "http.request", "body": b""})
    status, body = [], []

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))

    await main.app(scope, receive, send)
    return status[0], json.loads(b"".join(body))


def test_login_rejects_huge_body(client: TestClient) -> None:
    r = client.post("/token", json={"username": "jane_doe", "password": "x" * 10_000})
    assert r.status_code == 413, r.text
    assert r.json() == oauth2_error("Content Too Large", "invalid_request")


def test_a_content_length_of_thousands_of_digits_is_a_413(client: TestClient) -> None:
    """int() refuses more than 4,300 digits, even zero-padded ones: it must not get them."""
    headers = {"Content-Type": "application/json", "Content-Length": "0" * 5000 + "2"}
    r = client.post("/token", content=b"{}", headers=headers)
    assert r.status_code == 413, r.text
    assert r.json() == oauth2_error("Content Too Large", "invalid_request")


def test_body_of_exactly_max_bytes_is_read(client: TestClient) -> None:
    body = json.dumps({"username": "jane_doe", "password": "password456"}).ljust(main.MAX_BODY_BYTES).encode()
    r = client.post("/token", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text


def test_body_limit_adds_up_the_chunks_of_one_body(client: TestClient) -> None:
    """Chunks each under MAX_BODY_BYTES, and no Content-Length: what counts is their sum."""
    chunk = b"x" * (main.MAX_BODY_BYTES // 2 + 1)
    chunks = [b'{"username": "jane_doe", "password": "', chunk, chunk, b'"}']
    status, body = client.portal.call(post_in_chunks, "/token", chunks)
    assert (status, body) == (413, oauth2_error("Content Too Large", "invalid_request"))


def test_declared_oversize_is_refused_even_where_no_body_is_read(client: TestClient) -> None:
    token = login(client)["access_token"]
    r = client.post("/logout", content=b"x" * 5000, headers=bearer(token))
    assert r.status_code == 413, r.text
    assert client.get("/users/me", headers=bearer(token)).status_code == 200


def test_get_and_head_bodies_are_not_limited(client: TestClient) -> None:
    """Nobody reads them, so any Content-Length passes: a 200, where a refusal would be a 413."""
    assert client.request("GET", "/health", content=b"x" * 5000).status_code == 200
    # /health answers HEAD with a 405; Starlette's /openapi.json route takes it.
    assert client.request("HEAD", "/openapi.json", content=b"x" * 5000).status_code == 200


# --- Browser apps on other origins (CORS) ---


def test_browsers_get_no_cors_answers_by_default(client: TestClient) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    r = client.options("/token", headers=preflight)
    assert r.status_code == 405, r.text
    assert not [name for name in r.headers if name.startswith("access-control-")]


def test_a_browser_app_on_an_allowed_origin_can_log_in_and_read_the_limits(tmp_path: Path) -> None:
    """A preflight and a login as a browser sends them, from an origin CORS_ALLOW_ORIGINS lists;
    another origin's preflight is refused."""
    env = {
        **environment_without_settings(),
        "CORS_ALLOW_ORIGINS": "https://app.example, http://localhost:5173",
    }
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    with uvicorn_app(env, folder=tmp_path) as base:
        allowed = httpx2.options(f"{base}/token", headers={"Origin": "https://app.example", **preflight})
        other = httpx2.options(f"{base}/token", headers={"Origin": "https://evil.example", **preflight})
        body = {"username": "jane_doe", "password": PASSWORDS["jane_doe"]}
        logged_in = httpx2.post(f"{base}/token", json=body, headers={"Origin": "http://localhost:5173"})
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert allowed.headers["access-control-allow-methods"] == "GET, POST"
    assert "access-control-allow-credentials" not in allowed.headers
    assert (other.status_code, other.text) == (400, "Disallowed CORS origin")
    assert logged_in.status_code == 200, logged_in.text
    assert logged_in.headers["access-control-allow-origin"] == "http://localhost:5173"
    exposed = {name.strip().lower() for name in logged_in.headers["access-control-expose-headers"].split(",")}
    assert {"retry-after", "x-ratelimit-remaining", "ratelimit", "www-authenticate"} <= exposed


# --- OAuth2 endpoints for standard clients: /revoke, /introspect, metadata ---


def logged_out_access_token(client: TestClient) -> str:
    token = login(client)["access_token"]
    assert client.post("/logout", headers=bearer(token)).status_code == 200
    return token


def oauth_error_as_strict_clients_read_it(r: Any) -> str:
    """oauth4webapi's and openid-client's rule: a 401 with a WWW-Authenticate challenge is a
    challenge, not an OAuth error; only an error body without one gives its `error`."""
    if r.status_code == 401 and "www-authenticate" in r.headers:
        return "challenge"
    return r.json()["error"]


def test_revoke_access_token(client: TestClient) -> None:
    tokens = login(client)
    r = client.post("/revoke", json={"token": tokens["access_token"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"revoked": True}
    assert client.get("/users/me", headers=bearer(tokens["access_token"])).status_code == 401
    assert client.post("/refresh", json={"refresh_token": tokens["refresh_token"]}).status_code == 200


def test_revoke_refresh_token_revokes_its_session(client: TestClient) -> None:
    tokens = login(client)
    assert client.post("/revoke", json={"token": tokens["refresh_token"]}).status_code == 200
    assert client.get("/users/me", headers=bearer(tokens["access_token"])).status_code == 401
    assert client.post("/refresh", json={"refresh_token": tokens["refresh_token"]}).status_code == 400


def test_revoke_is_idempotent(client: TestClient) -> None:
    token = login(client)["access_token"]
    first = client.post("/revoke", json={"token": token})
    entries = revoked_entries(client)
    claims = main.decode_token(token)
    assert entries == {claims.jti.encode(): claims.exp}  # until the token's own exp, no longer
    second = client.post("/revoke", json={"token": token})
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.json() == {"revoked": True}
    assert revoked_entries(client) == entries


def test_revoke_expired_token_succeeds_and_stores_nothing(client: TestClient) -> None:
    r = client.post("/revoke", json={"token": mint(now=time.time() - 3600)})
    assert r.status_code == 200, r.text
    assert r.json() == {"revoked": True}
    assert revoked_entries(client) == {}


@pytest.mark.parametrize(
    "token", ["garbage", jwt.encode({"sub": "x", "exp": 2**40}, "k" * 32, algorithm="HS256")]
)
def test_revoke_ignores_foreign_tokens_and_stores_nothing(client: TestClient, token: str) -> None:
    r = client.post("/revoke", json={"token": token})
    assert r.status_code == 200, r.text
    assert r.json() == {"revoked": False}
    assert (revoked_entries(client), session_records(client)) == ({}, {})


@pytest.mark.parametrize("hint", ["access_token", "refresh_token", "no_such_hint", None])
def test_revoke_takes_the_rfc7009_form_whatever_the_hint(client: TestClient, hint: str | None) -> None:
    token = login(client)["access_token"]
    form = {"token": token} if hint is None else {"token": token, "token_type_hint": hint}
    r = client.post("/revoke", data=form)
    assert r.status_code == 200, r.text
    assert r.json() == {"revoked": True}
    assert client.get("/users/me", headers=bearer(token)).status_code == 401


def test_revoke_with_a_wrong_hint_still_revokes_a_refresh_tokens_session(client: TestClient) -> None:
    tokens = login(client)
    r = client.post("/revoke", data={"token": tokens["refresh_token"], "token_type_hint": "access_token"})
    assert r.status_code == 200, r.text
    assert r.json() == {"revoked": True}
    assert client.get("/users/me", headers=bearer(tokens["access_token"])).status_code == 401


def test_introspect_a_live_access_token(client: TestClient) -> None:
    token = login(client)["access_token"]
    claims = main.decode_token(token)
    r = client.post("/introspect", data={"token": token, "token_type_hint": "access_token"})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "active": True,
        "token_type": "Bearer",
        "token_use": "access",
        "sub": "jane_doe",
        "username": "jane_doe",
        "exp": claims.exp,
        "iat": claims.iat,
        "jti": claims.jti,
    }
    assert no_store_headers(r) == NO_STORE
    assert r.headers["x-ratelimit-limit"] == "20"


def test_introspect_a_live_refresh_token_as_json(client: TestClient) -> None:
    token = login(client, "john_doe")["refresh_token"]
    r = client.post("/introspect", json={"token": token})
    assert r.status_code == 200, r.text
    claims = main.decode_token(token)
    assert r.json() == {  # no token_type: RFC 6749's types say how an access token is used
        "active": True,
        "token_use": "refresh",
        "sub": "john_doe",
        "username": "john_doe",
        "exp": claims.exp,
        "iat": claims.iat,
        "jti": claims.jti,
    }


@pytest.mark.parametrize(
    "token_of",
    [
        lambda client: mint(now=time.time() - 3600),
        logged_out_access_token,
        used_up_refresh_token,
        lambda client: jwt.encode({"sub": "jane_doe"}, "x" * 32, algorithm="HS256"),
        lambda client: mint(username="ghost"),
        lambda client: "garbage",
    ],
    ids=["expired", "revoked", "used-up-refresh", "foreign", "unknown-user", "garbage"],
)
def test_introspect_anything_else_is_exactly_inactive(
    client: TestClient, token_of: Callable[[TestClient], str]
) -> None:
    r = client.post("/introspect", data={"token": token_of(client)})
    assert r.status_code == 200, r.text
    assert r.json() == {"active": False}


def test_server_metadata_names_the_endpoints(client: TestClient) -> None:
    r = client.get("/.well-known/oauth-authorization-server")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "issuer": "http://testserver",
        "token_endpoint": "http://testserver/token",
        "revocation_endpoint": "http://testserver/revoke",
        "introspection_endpoint": "http://testserver/introspect",
        "grant_types_supported": ["password", "refresh_token"],
        "response_types_supported": ["none"],
        "token_endpoint_auth_methods_supported": ["none"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        "introspection_endpoint_auth_methods_supported": ["none"],
    }


def test_authlibs_rfc8414_validator_accepts_the_metadata() -> None:
    # Authlib's validator wants https endpoints, as a deployment behind TLS serves them.
    with TestClient(main.app, base_url="https://auth.example") as client:
        metadata = AuthorizationServerMetadata(client.get("/.well-known/oauth-authorization-server").json())
    metadata.validate()
    assert metadata["token_endpoint"] == "https://auth.example/token"


@pytest.mark.parametrize(
    "refused",
    [
        lambda client: client.post("/token", data={"username": "jane_doe", "password": "wrong"}),
        lambda client: client.post(
            "/token", data={"grant_type": "refresh_token", "refresh_token": used_up_refresh_token(client)}
        ),
        lambda client: client.post("/refresh", data={"refresh_token": used_up_refresh_token(client)}),
        lambda client: client.post("/token", data={"grant_type": "refresh_token", "refresh_token": mint()}),
        lambda client: client.post("/token", data={"grant_type": "refresh_token", "refresh_token": "x.y.z"}),
    ],
    ids=["wrong-password", "reused-at-token", "reused-at-refresh", "access-token-as-grant", "garbage"],
)
def test_strict_oauth2_clients_read_a_refused_grant_as_invalid_grant(
    client: TestClient, refused: Callable[[TestClient], Any]
) -> None:
    assert oauth_error_as_strict_clients_read_it(refused(client)) == "invalid_grant"


def test_authlib_drives_the_whole_oauth2_flow(client: TestClient) -> None:
    """A real OAuth2 client library, not written here: discovery, password login, a call, refresh
    at the token endpoint, introspection, revocation, and a failed login raised as invalid_grant.
    Authlib's async client reaches the app through httpx's ASGI transport, on the app's own loop."""
    metadata = client.get("/.well-known/oauth-authorization-server").json()

    async def flow() -> None:
        transport = httpx2.ASGITransport(app=main.app)
        async with AsyncOAuth2Client("demo-cli", transport=transport, base_url="http://testserver") as oauth:
            first = await oauth.fetch_token(
                metadata["token_endpoint"], username="john_doe", password="password123"
            )
            assert (await oauth.get("/users/me")).json()["username"] == "john_doe"
            second = await oauth.refresh_token(metadata["token_endpoint"])
            assert second["access_token"] != first["access_token"]
            assert (await oauth.get("/users/me")).status_code == 200
            introspect = functools.partial(oauth.introspect_token, metadata["introspection_endpoint"])
            active = (await introspect(token=second["access_token"])).json()
            assert (active["active"], active["token_type"]) == (True, "Bearer")
            revoked = await oauth.revoke_token(metadata["revocation_endpoint"], token=second["refresh_token"])
            assert revoked.json() == {"revoked": True}
            assert (await introspect(token=second["access_token"])).json() == {"active": False}
            with pytest.raises(OAuthError) as failed:
                await oauth.fetch_token(metadata["token_endpoint"], username="john_doe", password="wrong")
            assert (failed.value.error, failed.value.description) == (
                "invalid_grant",
                "Incorrect username or password",
            )

    client.portal.call(flow)


# --- Token status (/is_token_revoked) and limit status (/rate-limit-status) ---


def test_is_token_revoked_for_a_live_token(client: TestClient) -> None:
    r = client.get("/is_token_revoked", params={"token": login(client)["access_token"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"revoked": False, "expired": False}


def test_is_token_revoked_after_logout(client: TestClient) -> None:
    token = login(client)["access_token"]
    client.post("/logout", headers=bearer(token))
    r = client.get("/is_token_revoked", params={"token": token})
    assert r.status_code == 200, r.text
    assert r.json() == {"revoked": True, "expired": False}


def test_is_token_revoked_reports_expiry(client: TestClient) -> None:
    r = client.get("/is_token_revoked", params={"token": mint(now=time.time() - 3600)})
    assert r.status_code == 200, r.text
    assert r.json() == {"revoked": False, "expired": True}


def test_is_token_revoked_refuses_foreign_tokens(client: TestClient) -> None:
    r = client.get("/is_token_revoked", params={"token": "garbage"})
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": "Not a token issued by this service"}
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_is_token_revoked_refuses_a_non_ascii_token(client: TestClient) -> None:
    r = client.get("/is_token_revoked", params={"token": "eyJñ.abc.def"})
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": "Not a token issued by this service"}


@pytest.mark.parametrize(
    "params", [{}, {"token": ""}, {"token": "x" * 2049}], ids=["missing", "empty", "too-long"]
)
def test_is_token_revoked_validates_the_query(client: TestClient, params: dict[str, str]) -> None:
    r = client.get("/is_token_revoked", params=params)
    assert r.status_code == 422, r.text
    assert [error["loc"] for error in r.json()["detail"]] == [["query", "token"]]


def test_rate_limit_status_reports_each_endpoint_a_free_user_can_call(
    client: TestClient, clock: FakeClock
) -> None:
    token = login(client)["access_token"]
    client.get("/users/me", headers=bearer(token))
    clock.now += 10
    r = client.get("/rate-limit-status", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert r.json() == {
        "plan": "free",
        "endpoints": {
            # unused: room now, so the next whole second
            "/plan-limited-endpoint": {"limit": 2, "remaining": 2, "reset": int(clock.now) + 1},
            # used 10 s ago: room once that call is a full minute old
            "/users/me": {"limit": 2, "remaining": 1, "reset": int(clock.now) - 10 + 61},
        },
    }


def test_rate_limit_status_lists_every_plan_limited_endpoint_for_premium(client: TestClient) -> None:
    r = client.get("/rate-limit-status", headers=bearer(login(client, "john_doe")["access_token"]))
    assert r.status_code == 200, r.text
    assert list(r.json()["endpoints"]) == ["/plan-limited-endpoint", "/premium-only-endpoint", "/users/me"]


def test_rate_limit_status_consumes_no_quota(client: TestClient) -> None:
    token = login(client)["access_token"]
    for _ in range(5):
        assert client.get("/rate-limit-status", headers=bearer(token)).status_code == 200
    r = client.get("/users/me", headers=bearer(token))
    assert r.headers["x-ratelimit-remaining"] == "1"


# --- Revocations that survive a failover: WAIT for a replica ---


class RecordingPipeline:
    """Stands in for a redis-py pipeline: records commands; execute() answers WAIT with `replicas`."""

    def __init__(self, replicas: int) -> None:
        self.replicas, self.commands = replicas, []

    def execute_command(self, *args: Any) -> None:
        self.commands.append(args)

    async def execute(self) -> list[Any]:
        return [self.replicas if command[0] == "WAIT" else 1 for command in self.commands]


@pytest.mark.parametrize(("replicas", "confirmed"), [(0, False), (1, True), (2, True)])
def test_with_replicas_a_revocation_waits_for_one_and_fails_closed_without(
    monkeypatch: pytest.MonkeyPatch, replicas: int, confirmed: bool
) -> None:
    """WAIT goes after the revocation's writes, on their connection; its reply, the last, decides."""
    monkeypatch.setattr(main, "REPLICAS_TO_CONFIRM", 1)
    pipe = RecordingPipeline(replicas)
    pipe.execute_command("ZADD", "revoked:3", "GT", 1, "sid")
    pipe.execute_command("DEL", "refresh:sid")
    if confirmed:
        asyncio.run(main.durably(pipe))
    else:
        refusal = f"^no replica confirmed a revocation within {main.REPLICA_WAIT_MS} ms$"
        with pytest.raises(main.NotReplicated, match=refusal):
            asyncio.run(main.durably(pipe))
    assert pipe.commands == [
        ("ZADD", "revoked:3", "GT", 1, "sid"),
        ("DEL", "refresh:sid"),
        ("WAIT", 1, main.REPLICA_WAIT_MS),
    ]


def test_without_replicas_a_revocation_does_not_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main, "REPLICAS_TO_CONFIRM", 0)
    pipe = RecordingPipeline(0)
    pipe.execute_command("ZADD", "revoked:3", "GT", 1, "sid")
    asyncio.run(main.durably(pipe))
    assert [command[0] for command in pipe.commands] == ["ZADD"]


# --- A Redis that may evict revocations: a warning at start ---


@pytest.mark.parametrize(
    ("policy", "warned"), [("allkeys-lru", True), ("volatile-ttl", True), ("noeviction", False)]
)
def test_startup_warns_when_redis_may_evict_revocations(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, policy: str, warned: bool
) -> None:
    async def config_get(name: str) -> dict[str, str]:
        return {name: policy}

    monkeypatch.setattr(main.store, "config_get", config_get)
    with caplog.at_level(logging.WARNING, logger="uvicorn.app"), TestClient(main.app):
        pass
    warning = f"Redis maxmemory-policy is {policy}: it may evict revocations; set it to noeviction"
    assert (warning in caplog.text) is warned


# --- Apps on one Redis agree on the access-token lifetime ---


def test_an_app_with_another_access_token_lifetime_on_the_same_redis_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A logout's entry lasts as long as its writer's tokens: a longer-lived app would outlive it."""
    with TestClient(main.app) as first:
        first.portal.call(main.store.delete, main.LIFETIME_KEY)
    with TestClient(main.app):  # records this app's lifetime, 15 minutes
        pass
    monkeypatch.setattr(main, "ACCESS_TOKEN_LIFETIME", 60 * 60)
    with pytest.raises(RuntimeError) as refusal, TestClient(main.app):
        pass
    problem = "is 60, but apps on this Redis use 15 (key settings:access_token_lifetime)"
    assert str(refusal.value) == f"{main.REFUSAL}\n  ACCESS_TOKEN_EXPIRE_MINUTES: {problem}"


# --- Logs that clients cannot abuse ---


def test_a_line_a_client_can_cause_at_will_is_logged_once_a_second_with_a_count(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    token = login(client)["access_token"]
    client.post("/logout", headers=bearer(token))
    with caplog.at_level(logging.WARNING, logger="uvicorn.app"):
        for _ in range(50):
            client.get("/users/me", headers=bearer(token))
    lines = [r.getMessage() for r in caplog.records if "revoked token used" in r.getMessage()]
    assert len(lines) == 1
    record = log_record("uvicorn.app.client", "revoked token used: sub=%s jti=%s", "jane_doe", "x")
    record.created += 1  # a second later
    assert main.client_log_limit.filter(record)
    assert (
        record.getMessage() == "revoked token used: sub=jane_doe jti=x (and 49 more since the last such line)"
    )


def test_rate_limit_log_line_escapes_the_username(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    forged = 'jane_doe\nINFO: 10.0.0.1:1 - "GET /admin HTTP/1.1" 200'
    with caplog.at_level(logging.WARNING):
        statuses = [
            client.post("/token", json={"username": forged, "password": "x"}).status_code for _ in range(6)
        ]
    assert statuses == [400] * 5 + [429]
    assert all("\n" not in record.getMessage() for record in caplog.records)
    assert "by 'unknown|jane_doe\\nINFO: 10.0.0.1:1" in caplog.text


@pytest.mark.parametrize(
    "query", ["token=eyJ.abc&x=1", "tok%65n=eyJ.abc", "x=1&TOKEN=eyJ.abc", "eyJ.abc", "token=eyJ.abc?more"]
)
def test_access_log_never_shows_a_query_string(query: str) -> None:
    request_line = ("1.2.3.4", "GET", f"/is_token_revoked?{query}", "1.1", 200)
    record = log_record("uvicorn.access", '%s - "%s %s HTTP/%s" %d', *request_line)
    assert logging.getLogger("uvicorn.access").filter(record)
    assert record.getMessage() == '1.2.3.4 - "GET /is_token_revoked?[redacted] HTTP/1.1" 200'


def test_websocket_handshake_lines_show_no_query_string() -> None:
    record = log_record("uvicorn.error", '%s - "WebSocket %s" %d', "1.2.3.4", "/x?token=eyJ.a.b", 403)
    assert logging.getLogger("uvicorn.error").filter(record)
    assert record.getMessage() == '1.2.3.4 - "WebSocket /x?[redacted]" 403'


def test_request_lines_escape_a_forged_client_address() -> None:
    request_line = ("1.2.3.4\x85INFO: forged", "GET", "/health", "1.1", 200)
    record = log_record("uvicorn.access", '%s - "%s %s HTTP/%s" %d', *request_line)
    assert logging.getLogger("uvicorn.access").filter(record)
    assert record.getMessage() == '1.2.3.4\\x85INFO: forged - "GET /health HTTP/1.1" 200'


def test_request_lines_keep_printable_non_ascii() -> None:
    assert main.SafeRequestLines.clean("/caf\u00e9") == "/caf\u00e9"


# --- Packaging: the image and the settings files ---


def requirement_names(lines: list[str]) -> set[str]:
    return {re.split(r"[\[=<>]", line)[0].lower() for line in lines if line and not line.startswith("#")}


def test_the_image_installs_the_apps_requirements_and_no_test_tool() -> None:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    blank = lines.index("")  # where the Dockerfile's `sed '/^$/q'` stops
    app, tests = requirement_names(lines[:blank]), requirement_names(lines[blank + 1 :])
    assert "sed '/^$/q' requirements.txt > app-requirements.txt" in (HERE / "Dockerfile").read_text()
    assert tests == {"authlib", "httpx2", "pytest", "pytest-cov"}
    # Every package main.py imports is in the app's block.
    tree = ast.parse((HERE / "main.py").read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    distributions = importlib.metadata.packages_distributions()
    imported = {
        distributions[module.split(".")[0]][0].lower()
        for module in modules
        if module.split(".")[0] in distributions
    }
    imported.discard("mutmut")  # mutation testing (.ci/mutants) rewrites main.py with its own import
    assert imported and imported <= app


def test_compose_and_env_example_name_every_setting_and_compose_restates_no_default() -> None:
    variables = {name.upper() for name in main.Settings.model_fields}
    passed = dict(re.findall(r"^      ([A-Z_]+): (.*)$", (HERE / "compose.yaml").read_text(), flags=re.M))
    assert variables <= set(passed)
    assert {name: passed[name] for name in variables - {"REDIS_URI", "SECRET_KEY"}} == {
        name: f"${{{name}:-}}" for name in variables - {"REDIS_URI", "SECRET_KEY"}
    }
    example = re.findall(r"^([A-Z_]+)=", (HERE / ".env.example").read_text(), flags=re.M)
    assert variables <= set(example)


# --- Only a real Redis can answer these (run with REDIS_URI set, as `just test-redis` does) ---

REAL_REDIS = pytest.mark.skipif(not main.settings.redis_uri, reason="needs a real Redis: set REDIS_URI")


def app_process(redis_uri: str, **env: str) -> AbstractContextManager[str]:
    """The app on this Redis, with this suite's key."""
    return uvicorn_app({**os.environ, "REDIS_URI": redis_uri, "SECRET_KEY": main.SECRET_KEY, **env})


def answers_ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


class RedisServer:
    """A redis-server of the test's own, which it can stop and start again on the same port."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.uri = f"redis://127.0.0.1:{self.port}/0"
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(self.data_dir),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        wait_until(lambda: answers_ping(client), "redis-server to start")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


def sync_store(uri: str) -> redis.Redis | redis.RedisCluster:
    """A blocking client for the topology that `uri` names, for tests that look into it."""
    if uri.startswith(main.SENTINEL_SCHEME):
        nodes = main.RedisNodes.from_uri(uri)
        return redis.Sentinel(nodes.hosts).master_for(nodes.service, password=nodes.password)
    if uri.startswith(main.CLUSTER_SCHEME):
        nodes = main.RedisNodes.from_uri(uri)
        startup_nodes = [redis.cluster.ClusterNode(host, port) for host, port in nodes.hosts]
        return redis.RedisCluster(startup_nodes=startup_nodes, password=nodes.password)
    return redis.Redis.from_url(uri)


@pytest.fixture
def shared_redis() -> Iterator[str]:
    """The suite's Redis (REDIS_URI), emptied before the test."""
    sync_store(main.settings.redis_uri).flushdb()
    yield main.settings.redis_uri


@REAL_REDIS
def test_two_processes_enforce_one_limit_exactly(shared_redis: str) -> None:
    with app_process(shared_redis) as first, app_process(shared_redis) as second:
        headers = bearer(http_login(first)["access_token"])
        urls = [f"{base}/plan-limited-endpoint" for base in (first, second)] * 25

        def call(url: str) -> int:
            return httpx2.get(url, headers=headers, timeout=WAIT_SECONDS).status_code

        with ThreadPoolExecutor(max_workers=50) as pool:
            statuses = sorted(pool.map(call, urls))
    assert statuses == [200] * 2 + [429] * 48


@REAL_REDIS
def test_revocation_in_one_process_is_seen_by_another(shared_redis: str) -> None:
    with app_process(shared_redis) as first, app_process(shared_redis) as second:
        token = http_login(first)["access_token"]
        assert httpx2.get(f"{second}/users/me", headers=bearer(token)).status_code == 200
        assert httpx2.post(f"{first}/logout", headers=bearer(token)).status_code == 200
        r = httpx2.get(f"{second}/users/me", headers=bearer(token))
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": "Token has been revoked"}


@REAL_REDIS
def test_revoked_token_stays_revoked_across_restart(shared_redis: str) -> None:
    with app_process(shared_redis) as base:
        token = http_login(base)["access_token"]
        assert httpx2.post(f"{base}/logout", headers=bearer(token)).status_code == 200
    with app_process(shared_redis) as restarted:
        r = httpx2.get(f"{restarted}/users/me", headers=bearer(token))
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": "Token has been revoked"}


@REAL_REDIS
def test_cleanup_task_removes_only_expired_entries(shared_redis: str) -> None:
    client = sync_store(shared_redis)
    now = int(time.time())
    key = main.revoked_key("session-1")
    client.zadd(key, {"expired": now - 1, "alive": now + 3600})
    with app_process(shared_redis, CLEANUP_INTERVAL_SECONDS="0.1"):
        wait_until(lambda: client.zscore(key, "expired") is None, "the cleanup task")
    assert client.zrange(key, 0, -1) == [b"alive"]


@REAL_REDIS
def test_outage_answers_503_then_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        with app_process(server.uri) as base:
            headers = bearer(http_login(base, "john_doe")["access_token"])
            server.stop()
            during = [
                httpx2.get(f"{base}/users/me", headers=headers),
                httpx2.get(f"{base}/plan-limited-endpoint", headers=headers),
                httpx2.post(f"{base}/token", json={"username": "john_doe", "password": "password123"}),
                httpx2.get(f"{base}/health"),
            ]
            server.start()
            wait_until(lambda: answers(f"{base}/health"), "the app to see Redis again")
            after = httpx2.get(f"{base}/users/me", headers=headers)
    finally:
        server.stop()
    assert [(r.status_code, r.json()["detail"]) for r in during] == [(503, STORE_DOWN["detail"])] * 4
    assert after.status_code == 200, after.text


# --- Only a real cluster or Sentinel setup can answer these (just test-cluster, just test-sentinel) ---

CLUSTER_PORTS = os.environ.get("REDIS_CLUSTER_PORTS", "").split()
SENTINEL_DIR = os.environ.get("REDIS_SENTINEL_DIR", "")
REAL_CLUSTER = pytest.mark.skipif(not CLUSTER_PORTS, reason="needs .ci/with-cluster")
REAL_SENTINEL = pytest.mark.skipif(not SENTINEL_DIR, reason="needs .ci/with-sentinel")
# The Sentinels (.ci/with-sentinel) see a dead primary after 1.5 s and fail over in a few seconds;
# a failover that times out (failover-timeout, 10 s) is tried again after twice that. A primary
# that comes back is made a replica 8 s after it is seen, at a Sentinel's next INFO (every 10 s).
# The bound on these waits allows for either, with WAIT_SECONDS to spare; it costs nothing when
# things go well.
SENTINEL_SECONDS = 1.5 + 2 * 10 + WAIT_SECONDS


def statuses_until(
    check: Callable[[httpx2.Response], bool],
    call: Callable[[], httpx2.Response],
    seconds: float = WAIT_SECONDS,
) -> list[int]:
    """Every status that `call` answers until `check` accepts one (or `seconds` have passed)."""
    statuses: list[int] = []
    deadline = time.monotonic() + seconds
    while True:
        r = call()
        statuses.append(r.status_code)
        if check(r) or time.monotonic() > deadline:
            return statuses
        time.sleep(0.05)  # polls another process; no test waits for time to pass


def sentinel_primary_port() -> int:
    port = int(os.environ["REDIS_SENTINEL_PORTS"].split()[0])
    return int(redis.Redis(port=port).sentinel_get_master_addr_by_name("mymaster")[1])


@REAL_CLUSTER
def test_cluster_master_down_is_503_and_its_return_recovers(shared_redis: str) -> None:
    victim = CLUSTER_PORTS[1]
    with app_process(shared_redis) as base:
        headers = bearer(http_login(base, "admin_doe")["access_token"])

        def call() -> httpx2.Response:
            return httpx2.get(f"{base}/users/me", headers=headers, timeout=WAIT_SECONDS)

        redis.Redis(port=int(victim)).shutdown(nosave=True)
        down = statuses_until(lambda r: r.status_code == 503, call)
        subprocess.run([f"{os.environ['REDIS_CLUSTER_DIR']}/start-{victim}.sh"], check=True)
        back = statuses_until(lambda r: r.status_code == 200, call)
    assert down[-1] == 503 and set(down) <= {200, 503}
    assert back[-1] == 200 and set(back) <= {200, 503}


@REAL_SENTINEL
def test_logout_without_a_replica_to_confirm_it_is_a_503(shared_redis: str) -> None:
    replica_port = int(os.environ["REDIS_SENTINEL_REPLICA_PORT"])
    replica_pid = int(Path(SENTINEL_DIR, f"redis-{replica_port}.pid").read_text())
    replica = redis.Redis(port=replica_port, socket_timeout=WAIT_SECONDS)
    with app_process(shared_redis) as base:
        tokens = http_login(base)
        # However long it stays stopped, no failover: the Sentinels fail over a primary, not a replica.
        os.kill(replica_pid, signal.SIGSTOP)
        try:
            r = httpx2.post(f"{base}/logout", headers=bearer(tokens["access_token"]))
        finally:
            os.kill(replica_pid, signal.SIGCONT)
        assert r.status_code == 503, r.text
        assert r.json() == STORE_DOWN
        # Running again, and still linked to the primary, before it is asked to confirm anything.
        wait_until(
            lambda: replica.info("replication").get("master_link_status") == "up", "the replica to resume"
        )
        # The session is revoked on the primary, unconfirmed: revoking it again (idempotent) confirms.
        again = httpx2.post(f"{base}/revoke", data={"token": tokens["refresh_token"]})
        assert again.status_code == 200, again.text
        assert again.json() == {"revoked": True}


@REAL_SENTINEL
def test_logout_survives_the_primary_dying_right_after(shared_redis: str) -> None:
    primary = sentinel_primary_port()
    with app_process(shared_redis) as base:
        token = http_login(base, "admin_doe")["access_token"]
        assert httpx2.post(f"{base}/logout", headers=bearer(token)).status_code == 200
        os.kill(int(Path(SENTINEL_DIR, f"redis-{primary}.pid").read_text()), signal.SIGKILL)
        during = statuses_until(
            lambda r: r.status_code != 503,
            lambda: httpx2.get(f"{base}/users/me", headers=bearer(token), timeout=WAIT_SECONDS),
            seconds=SENTINEL_SECONDS,
        )
        health = statuses_until(lambda r: r.status_code == 200, lambda: httpx2.get(f"{base}/health"))
        login_after = http_login(base, "admin_doe")  # the promoted replica takes writes
    try:
        assert sentinel_primary_port() != primary
        assert during[-1] == 401 and set(during) <= {401, 503}  # still revoked, and never a 500
        assert health[-1] == 200 and set(health) <= {200, 503}
        assert login_after["access_token"]
    finally:
        # Bring the old primary back as a replica, so that revocations can be confirmed again.
        subprocess.run([f"{SENTINEL_DIR}/start-{primary}.sh"], check=True)
        replica = redis.Redis(port=primary)
        wait_until(
            lambda: replica.info("replication").get("master_link_status") == "up",
            "the old primary to replicate",
            seconds=SENTINEL_SECONDS,
        )


# --- The README's walkthrough, run as written ---

# curl prints these too; the README leaves them out of its outputs, and says so.
UNSHOWN_HEADERS = {"date", "server", "content-length", "content-type"}
CHANGING_HEADERS = {"x-ratelimit-reset", "ratelimit", "retry-after"}  # compared with digits masked
CHANGING_FIELDS = {"access_token", "refresh_token", "exp", "iat", "jti", "reset"}  # compared by type


def walkthrough_steps(file: str, heading: str) -> list[tuple[str, str]]:
    """The commands (```sh blocks) of the section under `## <heading>` in `file`, each with the
    output block after it."""
    document = (HERE / file).read_text()
    section = document.split(f"\n## {heading}\n")[1].split("\n## ")[0]
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    return [
        (text, following if following_kind in ("", "json") else "")
        for (kind, text), (following_kind, following) in zip(blocks, [*blocks[1:], ("sh", "")], strict=True)
        if kind == "sh"
    ]


def printed_responses(output: str) -> list[tuple[str, dict[str, str], Any]]:
    """What curl printed, as (status line, headers, JSON body): one per `curl -i`, and one with
    no status or headers per JSON body printed alone."""
    lines, responses = output.replace("\r\n", "\n").splitlines(), []
    while lines:
        status, headers = "", {}
        if lines[0].startswith("HTTP/"):
            status = lines.pop(0)
            while (line := lines.pop(0)) != "":
                name, _, value = line.partition(": ")
                headers[name.lower()] = value
        responses.append((status, headers, json.loads(lines.pop(0))))
    return responses


def assert_same_json(shown: Any, printed: Any, field: str = "") -> None:
    if field in CHANGING_FIELDS:
        assert type(printed) is type(shown), field
    elif isinstance(shown, dict):
        assert list(printed) == list(shown)
        for key, value in shown.items():
            assert_same_json(value, printed[key], key)
    else:
        assert printed == shown, field


def assert_output_as_shown(shown: str, printed: str) -> None:
    assert printed == "" or printed.endswith("\n"), "the next command's output would be glued to it"
    shown_responses, printed_responses_ = printed_responses(shown), printed_responses(printed)
    assert len(printed_responses_) == len(shown_responses)
    for (status, headers, body), (shown_status, shown_headers, shown_body) in zip(
        printed_responses_, shown_responses, strict=True
    ):
        assert status == shown_status
        assert set(headers) - set(shown_headers) <= UNSHOWN_HEADERS
        for name, value in shown_headers.items():
            masked = (lambda text: re.sub(r"\d+", "0", text)) if name in CHANGING_HEADERS else str
            assert masked(headers.get(name, "(missing)")) == masked(value), name
        assert_same_json(shown_body, body)


def assert_runs_as_written(tmp_path: Path, steps: list[tuple[str, str]]) -> None:
    """Every command of `steps`, pasted in order into one shell, against a fresh app on the
    embedded store with the default settings; each output must match the one shown."""
    separator = "--- next step ---"
    script = "".join(f"{command}echo '{separator}'\n" for command, _ in steps)
    with default_app(tmp_path) as base:
        shell = subprocess.run(
            ["bash", "-c", script.replace("http://127.0.0.1:8000", base)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=environment_without_settings(),
        )
    assert shell.stderr == ""
    printed = shell.stdout.split(f"{separator}\n")
    assert printed[-1] == "" and len(printed) == len(steps) + 1
    for number, ((command, shown), output) in enumerate(zip(steps, printed, strict=False), start=1):
        try:
            assert_output_as_shown(shown, output)
        except AssertionError as error:
            raise AssertionError(f"step {number}:\n{command}\nprinted:\n{output}\n{error}") from None


def test_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    steps = walkthrough_steps("README.md", "Walkthrough with curl")
    assert len(steps) >= 8
    assert_runs_as_written(tmp_path, steps)


def test_docs_clients_curl_section_runs_as_written(tmp_path: Path) -> None:
    # It starts on its own: `field` and a login come first, so it can be pasted against a fresh app.
    steps = walkthrough_steps("docs/clients.md", "The standard OAuth2 endpoints with curl")
    assert len(steps) >= 3 and steps[0][0].startswith("field() {")
    assert_runs_as_written(tmp_path, steps)


# --- uvicorn in front: a proxy's root path, and the README's command under hostile connections ---


def readme_run_flags() -> list[str]:
    """The flags of the README's command that runs the app: `... uvicorn main:app <flags>`."""
    readme = (HERE / "README.md").read_text()
    command = next(
        line
        for line in readme.splitlines()
        if line.endswith("uvicorn main:app") or "/uvicorn main:app " in line
    )
    return command.partition("uvicorn main:app")[2].split()


def send_header_of(base: str, size: int) -> bytes:
    """A GET whose one header holds `size` bytes: what the server answers, or b"" if it hung up."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_SECONDS) as connection:
        try:
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: app\r\nX-Big: ")
            for _ in range(size // 65536):
                connection.sendall(b"a" * 65536)
            connection.sendall(b"\r\n\r\n")
            return connection.recv(64)
        except (ConnectionResetError, BrokenPipeError):
            return b""


def test_behind_a_root_path_status_and_oauth2_errors_still_line_up(tmp_path: Path) -> None:
    # uvicorn --root-path (the app mounted under a proxy's prefix) puts /api in front of every
    # path, the ones SlowAPI counts under included.
    with default_app(tmp_path, "--root-path", "/api") as base:
        token = http_login(base)["access_token"]
        assert httpx2.get(f"{base}/users/me", headers=bearer(token)).status_code == 200
        status = httpx2.get(f"{base}/rate-limit-status", headers=bearer(token)).json()
        wrong = httpx2.post(f"{base}/token", json={"username": "jane_doe", "password": "wrong"})
    assert status["endpoints"]["/users/me"]["remaining"] == 1
    assert wrong.json() == oauth2_error("Incorrect username or password", "invalid_grant")


@pytest.mark.parametrize("size", [1_000_000, 50_000_000], ids=["1MB", "50MB"])
def test_the_readmes_command_refuses_a_huge_header_and_keeps_serving(tmp_path: Path, size: int) -> None:
    """uvicorn's default parser takes a header of any size, on the event loop; h11 stops at 16 KiB."""
    assert readme_run_flags() == ["--http", "h11", "--limit-concurrency", "1000"]
    with default_app(tmp_path, *readme_run_flags()) as base:
        reply = send_header_of(base, size)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 400 "), reply
        assert answers(f"{base}/health")
