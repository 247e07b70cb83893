"""The Redis client the worker uses, and the checks it makes before it starts."""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.retry import Retry

from config import Settings
from worker.errors import EvictingRedis, GroupDeleted, RedisUnsupported

MIN_VERSION = (7, 0)

# Errors after which the same command can succeed later: Redis is loading, failing over,
# out of memory, unable to persist, or busy with a script. The worker backs off and retries.
_TRANSIENT = (
    "BUSY",
    "LOADING",
    "MASTERDOWN",
    "READONLY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
    "OOM",
    "MISCONF",
)


_TLS_REFUSED = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "WRONG_VERSION_NUMBER")
"""Signs of a TLS setup that cannot work: a server certificate the CA does not vouch for, or
TLS spoken to a server that does not speak it."""

_TRANSIENT_CLASSES = (
    redis.ConnectionError,  # includes BusyLoadingError (LOADING)
    redis.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.MasterDownError,
)


def is_transient(error: Exception | str) -> bool:
    """A connection problem, or a Redis error that goes away by itself.

    ``error`` may be an exception, or the text of an error a script caught with pcall.
    """
    if isinstance(error, _TRANSIENT_CLASSES):
        return True
    if isinstance(error, Exception) and not isinstance(error, ResponseError):
        return False
    return str(error).startswith(_TRANSIENT)


def connect(settings: Settings) -> redis.Redis:
    """A client with bytes replies, RESP2, no silent retries and bounded socket waits.

    redis-py's own retry is off: a command that may have run must be seen as an error by
    the consumer loop, which knows what is safe to repeat.
    """
    url = settings.redis_url.get_secret_value()
    tls: dict[str, Any] = {}
    if settings.tls_ca_file is not None:
        tls["ssl_ca_certs"] = str(settings.tls_ca_file)
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        tls["ssl_certfile"] = str(settings.tls_cert_file)
        tls["ssl_keyfile"] = str(settings.tls_key_file)
    return redis.Redis.from_url(
        url,
        **tls,
        **careful_options(url),
        protocol=2,
        decode_responses=False,
        socket_connect_timeout=5,
        socket_timeout=settings.block_ms / 1000 + 10,
        client_name=f"stream-counter:{settings.consumer}",
    )


def careful_options(url: str, retry: Any = Retry) -> dict[str, Any]:
    """What every client of ours sets (the worker's, a producer's; ``retry``: redis-py's
    Retry class, or redis.asyncio's): no silent retry (a command repeated after a timeout
    may have run: an XADD without an ``event_id`` would be added twice), and on
    ``rediss://`` the server's host name checked (redis-py < 6 does not by default)."""
    options: dict[str, Any] = {"retry": retry(NoBackoff(), 0)}
    if url.startswith("rediss://"):
        options["ssl_check_hostname"] = True
    return options


def check_server(client: redis.Redis) -> str:
    """Fail with RedisUnsupported if the server is too old or may evict keys; return its
    version."""
    try:
        info = client.info("server")
    except AuthenticationError as exc:
        raise RedisUnsupported(f"Redis refused the credentials: {exc}") from None
    except redis.ConnectionError as exc:
        if any(sign in str(exc) for sign in _TLS_REFUSED):  # will not pass by itself
            raise RedisUnsupported(f"TLS handshake refused: {exc}") from None
        raise
    version = str(info.get("redis_version", "0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_VERSION:
        raise RedisUnsupported(f"Redis {version} is too old: stream-counter needs >= 7.0")
    check_no_eviction(client)
    return version


def check_no_eviction(client: redis.Redis) -> None:
    """Raise EvictingRedis unless Redis' maxmemory-policy is noeviction.

    Any other policy lets Redis delete keys to make room: entry and event_id markers first
    (volatile-*: they have expiries), counter values and locks too (allkeys-*). A lost
    marker means an event counted twice, so the worker does not apply anything meanwhile.
    Read from INFO (CONFIG may be disabled on managed services).
    """
    policy = client.info("memory").get("maxmemory_policy", "noeviction")
    policy = policy.decode() if isinstance(policy, bytes) else str(policy)
    if policy != "noeviction":
        raise EvictingRedis(
            f"Redis may evict keys (maxmemory-policy is {policy}): evicted markers would "
            f"count events twice, evicted counters would lose them. Set maxmemory-policy "
            f"to noeviction (CONFIG SET maxmemory-policy noeviction, and in redis.conf); "
            f"when memory runs out, Redis then refuses writes and the worker waits"
        )


def group_marker_key(stream: str, group: str) -> str:
    """Set once the group exists: its absence tells a fresh (or emptied) Redis from a group
    that somebody deleted."""
    return f"stream-counter:group:{stream}:{group}"


def ensure_group(client: redis.Redis, stream: str, group: str) -> bool:
    """Create the consumer group from the start of the stream (MKSTREAM) if missing.

    Returns True if this call created it. BUSYGROUP (another replica was first) is fine.
    Raises GroupDeleted if the group is missing but was created before (see
    ``group_marker_key``): reading the stream again from the start would count every
    event a second time.
    """
    marker = group_marker_key(stream, group)
    if client.exists(marker):
        try:
            groups = client.xinfo_groups(stream)
        except ResponseError:
            groups = []
        if any(g.get("name") in (group, group.encode()) for g in groups):
            return False
        raise GroupDeleted(
            f"consumer group {group!r} of stream {stream!r} was deleted after it had been "
            f"created; not recreating it from the start (that would count every event in "
            f"the stream again). Recreate it where counting should resume, e.g. "
            f"'XGROUP CREATE {stream} {group} $', or delete the key {marker!r} to count the "
            f"whole stream from the start"
        )
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
        created = True
    except ResponseError as exc:
        message = str(exc)
        if message.startswith("WRONGTYPE"):
            raise RedisUnsupported(f"key {stream!r} exists and is not a stream") from None
        if not message.startswith("BUSYGROUP"):
            raise
        created = False
    client.set(marker, "1")
    return created
