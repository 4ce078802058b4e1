"""Talking to Redis: URLs (checked, redacted), the client, the bounded JSON serializer, queue objects.

Nothing here imports redis or rq at module level, so `infra --help` stays fast.
"""

from __future__ import annotations

import ipaddress
import json
from urllib.parse import parse_qs, urlsplit, urlunsplit

from runner.errors import EnvironmentProblem, UsageError

DEFAULT_QUEUE = "infra"
# A plan is a few KB; a job payload (function name, plan, result) over this is refused unread.
MAX_PAYLOAD_BYTES = 1 << 20
SECURITY_DOC = "docs/security.md"
NODE_KEY_PREFIX = "infra:node:"  # + "<host>:<worker>": a worker's heartbeat document


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def exposure_warning(url: str) -> str | None:
    """A one-line warning when a worker's Redis URL is open to anyone who can reach it, else None.

    Open means: no password and no TLS client certificate, and a host that is not loopback and not
    a unix socket. The check looks at the URL only; it never resolves a name or opens a connection.
    """
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return None
    query = parse_qs(parts.query)
    if parts.password or query.get("password") or query.get("ssl_certfile"):
        return None
    host = (parts.hostname or "").lower()
    if host == "localhost" or _is_loopback(host):
        return None
    return (
        f"Redis at {redact(url)} has no credentials and is not on this machine: anyone who can reach it "
        f"can run plans on this worker; use a password or ACL user (redis://USER:PASSWORD@HOST), "
        f"rediss:// for TLS, and bind Redis to a private interface (see {SECURITY_DOC})"
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address: only "localhost" counts, nothing is resolved
        return False


def connect(url: str, retries: int = 3):
    """A redis-py client for `redis://`, `rediss://` (TLS) or `unix://` URLs, password included.

    Commands are retried `retries` times with exponential backoff (0.2 s doubling, capped at 10 s)
    on connection loss; a server that still does not answer raises EnvironmentProblem (exit 3).
    Workers ask for more retries (and RQ's own loop retries on top: a worker outlives a Redis restart).
    """
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise UsageError(f"--redis {redact(url)}: use a redis://, rediss:// (TLS) or unix:// URL")
    try:
        conn = redis.Redis.from_url(
            url,
            retry=Retry(ExponentialBackoff(cap=10, base=0.2), retries),
            retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
            socket_connect_timeout=5,
            socket_keepalive=True,
            health_check_interval=30,
        )
        conn.ping()
    except redis.exceptions.AuthenticationError as exc:
        raise EnvironmentProblem(
            f"Redis at {redact(url)} refused the credentials ({exc}); check the URL's user and password"
        ) from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise EnvironmentProblem(
            f"Redis at {redact(url)} is not reachable ({exc}); start redis-server or fix --redis"
        ) from None
    except ValueError as exc:
        raise UsageError(f"--redis {redact(url)}: {exc}") from None
    return conn


class PayloadTooLarge(ValueError):
    """A value read from Redis is over MAX_PAYLOAD_BYTES; it is refused without being parsed."""


class BoundedJSONSerializer:
    """RQ's serializer for infra's queues: JSON (nothing is unpickled), and no value over the cap is parsed.

    RQ wraps a failing `loads` of a job's payload in its DeserializationError, so an oversized job
    fails with this message before anything reads its function name or arguments.
    """

    @staticmethod
    def dumps(obj) -> bytes:
        return json.dumps(obj).encode("utf-8")

    @staticmethod
    def loads(data: bytes | str):
        size = len(data)
        if size > MAX_PAYLOAD_BYTES:
            raise PayloadTooLarge(f"payload of {size} bytes is over infra's limit of {MAX_PAYLOAD_BYTES} bytes")
        return json.loads(data)


def serializer() -> type[BoundedJSONSerializer]:
    return BoundedJSONSerializer


def queue(conn, name: str, job_class=None):
    """An RQ Queue on `conn` with infra's serializer (and, in a worker, infra's guarded job class)."""
    from rq import Queue

    return Queue(name, connection=conn, serializer=serializer(), job_class=job_class)
