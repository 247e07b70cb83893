"""``stream-counter run | get | produce | status | check | dlq``.

Configuration comes from ``STREAM_COUNTER_*`` environment variables, each overridable by
the flag of the same name (``STREAM_COUNTER_BATCH_SIZE`` / ``--batch-size``). Invalid
configuration prints one line per bad variable and exits with ExitCode.CONFIG before any
connection to Redis is made.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import redis
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from config import ENV_PREFIX, Settings
from worker import __version__, counters, demo, dlq, load, producer, replicas
from worker.backoff import reconnect_delay
from worker.connection import check_server, connect, is_transient
from worker.consumer import Consumer, sleep_unless
from worker.errors import ExitCode, InvalidEvent, RedisUnsupported
from worker.logs import configure, scrub
from worker.metrics import Metrics, serve
from worker.shutdown import Shutdown
from worker.status import read_status, render

# Flags shared by every command; ``run`` takes every setting (config.Settings.describe).
_COMMON = ("redis_url", "stream")
_SETTINGS = Settings.describe()


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _add(parser: argparse.ArgumentParser, fields: Sequence[str] | None = None) -> None:
    """A flag for each setting of ``fields`` (all if None), its help from the field."""
    for d in _SETTINGS:
        if fields is None or d.field in fields:
            text = f"{d.meaning} (default: {d.shown_default})".replace("`", "")
            parser.add_argument(
                d.flag, dest=d.field, metavar=d.metavar, help=f"{text} [{d.env}]".replace("%", "%%")
            )


def build_parser() -> argparse.ArgumentParser:
    """Every command and its flags, in the order ``--help`` lists them. One flat list on
    purpose: each line declares one flag, and split per command it would be read in pieces."""
    parser = argparse.ArgumentParser(
        prog="stream-counter",
        description="Exactly-once counters from a Redis Stream, under a fenced lock.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one worker replica")
    _add(run)

    get = sub.add_parser("get", help="print counter values (a missing counter is 0)")
    _add(get, _COMMON)
    get.add_argument("--json", action="store_true", help="one JSON object name -> integer")
    get.add_argument("names", nargs="+", metavar="NAME")

    produce = sub.add_parser(
        "produce",
        help="push events: one (NAME), JSON lines (--file), or generated (--events)",
        description="Push one event (NAME), every event of a JSON-lines file (--file), or "
        "N generated ones (--events N --counters K).",
    )
    _add(produce, _COMMON)
    produce.add_argument("name", metavar="NAME", nargs="?", help="the counter of one event")
    produce.add_argument("--decr", action="store_true", help="decrement instead of increment")
    produce.add_argument("--amount", default=None, help="1 .. 2^63-1 (default 1)")
    produce.add_argument("--event-id", dest="event_id", default=None, help="idempotency key")
    produce.add_argument(
        "--file", metavar="PATH", help="JSON lines, one event each ('-': standard input)"
    )
    produce.add_argument("--events", type=int, metavar="N", help="generate N events ...")
    produce.add_argument("--counters", type=int, metavar="K", help="... over K counters")
    produce.add_argument("--rate", type=float, metavar="R", help="... at most R per second")

    demo = sub.add_parser(
        "demo", help="a private server, 3 replicas, one killed half-way: counts still exact"
    )
    demo.add_argument("--events", type=int, default=20_000, help="events to push (default 20000)")
    demo.add_argument("--counters", type=int, default=10, help="counters (default 10)")
    demo.add_argument("--seed", type=int, default=None, help="for the same events again")

    status = sub.add_parser("status", help="the stream, its group, lag, pending, replicas")
    _add(status, (*_COMMON, "group", "dead_letter_stream", "claim_idle_ms"))
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")

    check = sub.add_parser(
        "check",
        help="container health check: exit 0 if this host's replica beat lately, else 1",
    )
    _add(check, (*_COMMON, "group", "consumer", "claim_idle_ms"))

    dead = sub.add_parser("dlq", help="list, show, replay or purge dead-lettered entries")
    actions = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="the oldest dead-lettered entries first")
    listing.add_argument("--limit", type=int, default=100, help="at most N (0: all; default 100)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    one = actions.add_parser("show", help="one entry, all its fields")
    one.add_argument("id", metavar="ID")
    one.add_argument("--json", action="store_true")
    again = actions.add_parser("replay", help="put entries back on their source stream")
    again.add_argument("ids", nargs="*", metavar="ID")
    again.add_argument("--all", action="store_true", help="every dead-lettered entry")
    purge = actions.add_parser("purge", help="delete entries from the dead-letter stream")
    purge.add_argument("ids", nargs="*", metavar="ID")
    purge.add_argument("--older-than", metavar="DURATION", help="e.g. 7d, 12h, 30m, 90s")
    purge.add_argument("--yes", action="store_true", help="delete (else: say what would go)")
    for p in (listing, one, again, purge):
        _add(p, (*_COMMON, "dead_letter_stream"))
    return parser


def load_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags given; exits 2 if invalid."""
    overrides: dict[str, Any] = {
        field: value
        for field in Settings.model_fields
        if (value := getattr(args, field, None)) is not None
    }
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            if not error["loc"]:  # rules between fields: a line each, naming the fields
                for line in error["msg"].splitlines():
                    print(f"stream-counter: invalid configuration: {line}", file=sys.stderr)
                continue
            field = str(error["loc"][0])
            source = _flag(field) if field in overrides else f"{ENV_PREFIX}{field.upper()}"
            shown = "" if field == "redis_url" else f" (got {scrub(repr(error.get('input')))})"
            message = error["msg"].removeprefix("Value error, ")
            print(
                f"stream-counter: invalid configuration: {source}: {message}{shown}",
                file=sys.stderr,
            )
        raise SystemExit(ExitCode.CONFIG) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        if args.events < 2 or not 1 <= args.counters <= args.events:
            return _usage("demo: --events must be at least 2, --counters 1 .. --events")
        return demo.run(args.events, args.counters, args.seed, Console())
    settings = load_settings(args)
    if args.command == "run":
        return run(settings)
    if args.command == "get":
        return get(settings, args.names, as_json=args.json)
    if args.command == "status":
        return status(settings, as_json=args.json)
    if args.command == "check":
        return check(settings)
    if args.command == "dlq":
        return dead_letters(settings, args)
    return produce(settings, args)


def run(settings: Settings) -> int:
    log = configure(settings)
    shutdown = Shutdown(settings.shutdown_grace_ms)
    shutdown.install()
    log.info(
        "starting",
        redis_url=settings.redacted_url,
        stream=settings.stream,
        group=settings.group,
        dead_letter_stream=settings.dead_letter,
        **settings.model_dump(
            exclude={"redis_url", "stream", "group", "consumer", "dead_letter_stream"}
        ),
    )
    client = connect(settings)
    metrics = Metrics() if settings.metrics_port is not None else None
    consumer = Consumer(client, settings, log, shutdown.requested, metrics)
    server = None
    try:
        if metrics is not None and settings.metrics_port is not None:
            try:
                server = serve(settings.metrics_port, metrics, consumer.alive, consumer.ready)
            except OSError as exc:
                log.error("cannot serve metrics", port=settings.metrics_port, error=str(exc))
                return ExitCode.CONFIG
            log.info("serving metrics, /healthz and /readyz", port=settings.metrics_port)
        attempt = 0
        while not shutdown.requested():
            consumer.last_progress = time.monotonic()  # waiting for Redis is progress too
            try:
                version = check_server(client)
                log.info("connected", redis_version=version)
                break
            except redis.RedisError as exc:
                if not is_transient(exc):
                    raise
                attempt += 1
                delay = reconnect_delay(attempt)
                log.warning(
                    "redis unavailable; retrying",
                    error=str(exc),
                    error_type=type(exc).__name__,
                    attempt=attempt,
                    retry_in_s=round(delay, 3),
                )
                sleep_unless(shutdown.requested, delay)
        if not shutdown.requested():
            consumer.run()
    except RedisUnsupported as exc:
        log.error("redis cannot run this worker", error=str(exc))
        return ExitCode.REDIS
    except Exception:
        log.exception("worker failed")
        return ExitCode.FAILURE
    finally:
        if server is not None:
            server.shutdown()
        client.close()
    log.info("exiting", signal=shutdown.signal_name or None)
    return ExitCode.OK


def get(settings: Settings, names: Sequence[str], *, as_json: bool) -> int:
    client = connect(settings)
    try:
        values = counters.read_values(client, list(dict.fromkeys(names)))
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return _unreachable(settings, exc)
    except (redis.ResponseError, ValueError) as exc:
        print(f"stream-counter: cannot read counters: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    finally:
        client.close()
    if as_json:
        print(json.dumps(values))
    else:
        for name in names:
            print(f"{name}\t{values[name]}")
    return ExitCode.OK


def produce(settings: Settings, args: argparse.Namespace) -> int:
    """One event, a file of them, or generated ones: exit 0 all sent, 1 an invalid line (the
    valid ones are sent), 2 usage or an invalid event, 5 Redis unreachable."""
    wrong = _produce_usage(args)
    if wrong:
        return _usage(f"produce: {wrong}")
    fields: dict[str, str] = {}
    if args.name is not None:
        given = {"op": "decr" if args.decr else None, "amount": args.amount}
        given["event_id"] = args.event_id  # an empty one is given too, and refused
        fields = {"counter": args.name} | {k: v for k, v in given.items() if v is not None}
        try:
            producer.checked(fields)
        except InvalidEvent as exc:
            print(f"stream-counter: invalid event: {exc.reason}", file=sys.stderr)
            return ExitCode.CONFIG
    client = connect(settings)
    try:
        events = producer.Producer(client, settings.stream)
        if fields:
            print(events.send(fields))
            return ExitCode.OK
        if args.file is not None:
            return load.from_file(events, args.file, Console(stderr=True))
        return load.generated(events, args.events, args.counters, args.rate, Console(stderr=True))
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return _unreachable(settings, exc)
    except redis.RedisError as exc:  # e.g. the stream key holds another type, OOM
        print(f"stream-counter: cannot add the event: {scrub(str(exc))}", file=sys.stderr)
        return ExitCode.FAILURE
    finally:
        client.close()


def _produce_usage(args: argparse.Namespace) -> str:
    """What is wrong with ``produce``'s arguments, or ''."""
    modes = [args.name is not None, args.file is not None, args.events is not None]
    if sum(modes) != 1:
        return "give one of NAME, --file PATH or --events N"
    if not modes[0] and (args.decr or args.amount is not None or args.event_id is not None):
        return "--decr, --amount and --event-id go with NAME"
    if not modes[2] and (args.counters is not None or args.rate is not None):
        return "--counters and --rate go with --events"
    rate_ok = args.rate is None or (math.isfinite(args.rate) and args.rate > 0)
    if modes[2] and (args.events < 1 or (args.counters or 0) < 1 or not rate_ok):
        return "--events and --counters must be at least 1, --rate above 0"
    return ""


def status(settings: Settings, *, as_json: bool) -> int:
    client = connect(settings)
    try:
        found = read_status(client, settings)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return _unreachable(settings, exc)
    except redis.RedisError as exc:  # e.g. the stream key holds another type, an ACL
        print(f"stream-counter: cannot read the status: {scrub(str(exc))}", file=sys.stderr)
        return ExitCode.FAILURE
    finally:
        client.close()
    if found is None:
        print(f"stream-counter: stream {settings.stream!r} does not exist", file=sys.stderr)
        return ExitCode.FAILURE
    if as_json:
        print(json.dumps(found.as_json()))
    else:
        render(found, Console())
    return ExitCode.OK


def check(settings: Settings) -> int:
    """Healthy when Redis answers, the group exists and a replica of this host (the one
    named by CONSUMER, if set; else any named ``<host>-<pid>``) said lately that it is
    alive: its loop goes round. One line on stdout either way; exit 0 or 1."""
    explicit = "consumer" in settings.model_fields_set
    mine = settings.consumer if explicit else f"{socket.gethostname()}-"
    client = connect(settings)
    try:
        groups = client.xinfo_groups(settings.stream) if client.exists(settings.stream) else []
        live = replicas.live(
            client,
            settings.stream,
            replicas.live_window_ms(settings.claim_idle_ms),
        )
    except redis.RedisError as exc:
        print(f"unhealthy: cannot read Redis at {settings.redacted_url}: {scrub(str(exc))}")
        return ExitCode.FAILURE
    finally:
        client.close()
    if not any(g["name"] in (settings.group, settings.group.encode()) for g in groups):
        print(f"unhealthy: no consumer group {settings.group!r} on {settings.stream!r}")
        return ExitCode.FAILURE
    found = [n for n in live if (n == mine if explicit else n.startswith(mine))]
    if not found:
        print(f"unhealthy: no live replica named {mine + ('' if explicit else '*')!r}")
        return ExitCode.FAILURE
    print(f"healthy: {', '.join(f'{n} beat {live[n]} ms ago' for n in sorted(found))}")
    return ExitCode.OK


def dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    """``dlq list | show | replay | purge``: exit 0 done, 1 nothing to do or refused, 2 usage,
    5 Redis unreachable."""
    action, dead = args.action, settings.dead_letter
    chosen = list(getattr(args, "ids", None) or [])
    if action == "replay" and bool(chosen) == bool(args.all):
        return _usage("dlq replay: give entry ids, or --all")
    if action == "purge" and bool(chosen) == bool(args.older_than):
        return _usage("dlq purge: give entry ids, or --older-than DURATION")
    try:
        age_ms = dlq.parse_duration(args.older_than) if getattr(args, "older_than", None) else 0
    except ValueError as exc:
        return _usage(f"dlq purge: {exc}")
    client = connect(settings)
    try:
        if action == "list":
            _print_dead(dlq.entries(client, dead, args.limit or None), args.json)
            return ExitCode.OK
        if action == "show":
            found = dlq.show(client, dead, args.id)
            if found is None:
                print(f"stream-counter: no entry {args.id} in {dead}", file=sys.stderr)
                return ExitCode.FAILURE
            _print_dead([found], args.json, whole=True)
            return ExitCode.OK
        if action == "replay":
            ids = chosen or dlq.ids(client, dead)
            done = dlq.replay(client, dead, settings.stream, ids)
            for old, new in done.moved:
                print(f"replayed {old} -> {settings.stream} {new}")
            for gone in done.missing:
                print(f"stream-counter: no entry {gone} in {dead}", file=sys.stderr)
            for cut in done.truncated:
                print(
                    f"stream-counter: not replayed {cut}: it lost fields when dead-lettered",
                    file=sys.stderr,
                )
            return ExitCode.FAILURE if done.missing or done.truncated else ExitCode.OK
        ids = chosen or dlq.older_than(client, dead, age_ms)
        if not args.yes:
            print(f"would delete {len(ids)} entries from {dead}; add --yes to delete them")
            return ExitCode.FAILURE
        print(f"deleted {dlq.purge(client, dead, ids)} entries from {dead}")
        return ExitCode.OK
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return _unreachable(settings, exc)
    except redis.RedisError as exc:
        why = scrub(str(exc))
        if "xdel" in why.lower():
            why = (
                f"this Redis user may not run what dlq {action} needs (XDEL: replicas' ACL "
                f"lacks it); use an operator's user (README, Least privilege)"
            )
        print(f"stream-counter: dlq {action}: {why}", file=sys.stderr)
        return ExitCode.FAILURE
    finally:
        client.close()


def _print_dead(found: Sequence[dlq.DeadLetter], as_json: bool, whole: bool = False) -> None:
    if as_json:
        for item in found:
            print(json.dumps(item.as_json()))
        return
    console = Console()
    if whole:
        for item in found:
            console.print(f"[bold]{item.id}[/] from {escape(item.source_id)}: {escape(item.error)}")
            for name, value in item.fields:
                console.print(f"  {name} = {value!r}", markup=False)
        return
    table = Table("id", "source id", "counter", "error")
    for item in found:
        counter = next((v for k, v in item.fields if k == "counter"), "")
        table.add_row(item.id, escape(item.source_id), escape(counter), escape(item.error))
    console.print(table)
    if not found:
        console.print("no dead-lettered entries")


def _usage(message: str) -> int:
    print(f"stream-counter: {message}", file=sys.stderr)
    return ExitCode.CONFIG


def _unreachable(settings: Settings, exc: Exception) -> int:
    print(
        f"stream-counter: cannot reach Redis at {settings.redacted_url}: {scrub(str(exc))}",
        file=sys.stderr,
    )
    return ExitCode.UNAVAILABLE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
