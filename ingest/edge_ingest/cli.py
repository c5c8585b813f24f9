"""`edge-ingest`: migrate the database, serve the ingestion endpoint.

    edge-ingest migrate --dsn DSN
    edge-ingest serve --dsn DSN --listen HOST:PORT [--pool N] [--token-file F] [--config F]

Every key of `serve` can also come from a TOML file (--config) or EDGE_INGEST__KEY variables.
Exit codes: 0 done, 2 the configuration is unusable, 3 the database refused or is unreachable
(migrate), 4 the database's schema is newer than this edge-ingest.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import sys
from pathlib import Path

import asyncpg

from edge_ingest.config import ConfigError, IngestSettings, load
from edge_ingest.schema import SchemaError, migrate

EXIT_CONFIG = 2
EXIT_DATABASE = 3
EXIT_SCHEMA = 4


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-ingest", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("migrate", help="create or upgrade the schema (idempotent)")
    m.add_argument("--dsn", help="postgresql://user@host:port/db (or EDGE_INGEST__DSN)")
    m.add_argument("--config", type=Path, help="TOML file with `dsn`")
    s = sub.add_parser("serve", help="serve POST /ingest, /healthz, /readyz, /metrics")
    s.add_argument("--config", type=Path, help="TOML file with the keys below and more")
    s.add_argument("--dsn")
    s.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:8080)")
    s.add_argument("--pool", type=int, help="database connections of this replica (default 4)")
    s.add_argument("--token-file", type=Path, help="accepted bearer tokens, one per line")
    s.add_argument("--no-auth", action="store_true", default=None, help="accept any caller")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    if args.command == "migrate":
        overrides["no_auth"] = True  # migrate needs no token
    try:
        settings = load(args.config, overrides)
    except ConfigError as e:
        for line in e.problems:
            print(f"edge-ingest: config: {line}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "migrate":
        return asyncio.run(_migrate(settings))
    return serve(settings)


async def _migrate(settings: IngestSettings) -> int:
    try:
        conn = await asyncpg.connect(settings.dsn.get_secret_value(), timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as e:
        print(f"edge-ingest: migrate: cannot connect: {e}", file=sys.stderr)
        return EXIT_DATABASE
    try:
        done = await migrate(
            conn, today=dt.datetime.now(dt.UTC).date(), days_ahead=settings.partitions_ahead_days
        )
    except SchemaError as e:
        print(f"edge-ingest: migrate: {e}", file=sys.stderr)
        return EXIT_SCHEMA
    except asyncpg.PostgresError as e:
        print(f"edge-ingest: migrate: the database refused: {e}", file=sys.stderr)
        return EXIT_DATABASE
    finally:
        await conn.close()
    print(f"edge-ingest: migrate: {done}")
    return 0


def build_app(settings: IngestSettings) -> object:
    from edge_ingest.app import IngestApp
    from edge_ingest.store import Store

    store = Store(
        settings.dsn.get_secret_value(),
        size=settings.pool,
        statement_timeout_ms=settings.statement_timeout_ms,
        lock_timeout_ms=settings.lock_timeout_ms,
        acquire_timeout_s=settings.acquire_timeout_ms / 1000,
        max_waiting=settings.max_waiting,
        rollup=settings.rollup,
    )
    if settings.no_auth:
        logging.getLogger("edge_ingest").warning("no_auth: batches are accepted without a token")
    return IngestApp(
        store,
        tokens=settings.tokens(),
        no_auth=settings.no_auth,
        max_body_bytes=settings.max_body_bytes,
        max_decompressed_bytes=settings.max_decompressed_bytes,
        retry_after_s=settings.retry_after_s,
        retention_days=settings.retention_days,
        max_batch_rows=settings.max_batch_rows,
        body_timeout_s=settings.body_timeout_s,
        partitions_ahead_days=settings.partitions_ahead_days,
    )


def serve(settings: IngestSettings) -> int:
    import uvicorn

    config = uvicorn.Config(
        build_app(settings),  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="h11",
        lifespan="on",
        access_log=False,
        log_level=settings.log_level.lower(),
        timeout_keep_alive=75,
        # Slow or idle clients cannot hold every file descriptor: beyond this, 503 at once.
        limit_concurrency=settings.max_connections,
        # SIGTERM: in-flight batches get this long to commit, then the rest are cut (the
        # agents retry them; nothing is applied twice).
        timeout_graceful_shutdown=max(10, settings.statement_timeout_ms // 1000 + 5),
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else EXIT_DATABASE


if __name__ == "__main__":
    sys.exit(main())
