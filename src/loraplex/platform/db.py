"""The platform's tables (SQLAlchemy Core) and the database engine: SQLite in WAL mode by default, any URL
SQLAlchemy knows otherwise (``postgresql+psycopg://…``; a bare ``postgresql://`` uses psycopg 3)."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine

metadata = MetaData()

tenants = Table(
    "tenants", metadata,
    Column("id", String(64), primary_key=True),
    Column("created", Float, nullable=False),
)
api_keys = Table(
    "api_keys", metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant_id", String(64), ForeignKey("tenants.id"), nullable=False, index=True),
    Column("digest", String(64), nullable=False, unique=True),
    Column("scopes", String(64), nullable=False),  # comma-separated
    Column("name", String(128)),
    Column("created", Float, nullable=False),
    Column("revoked", Float),
)
adapters = Table(
    "adapters", metadata,
    Column("tenant_id", String(64), ForeignKey("tenants.id"), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("digest", String(64), nullable=False, index=True),  # the content-addressed directory
    Column("size", Integer, nullable=False),
    Column("rank", Integer, nullable=False),
    Column("created", Float, nullable=False),
)
deployments = Table(
    "deployments", metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant_id", String(64), ForeignKey("tenants.id"), nullable=True, index=True),  # None: the operator's
    Column("name", String(128), nullable=False),
    Column("spec", Text, nullable=False),  # JSON: {"adapter": …} | {"adapters": […]}
    Column("paused", Boolean, nullable=False, default=False),
    Column("created", Float, nullable=False),
)
usage = Table(
    "usage", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False),
    Column("tenant_id", String(64), index=True),  # None: the operator
    Column("key_id", String(32)),
    Column("deployment", String(32), index=True),
    Column("adapter", String(512), nullable=False),  # the served model: adapter, mixture label or the base id
    Column("prompt_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("started", Float, nullable=False, index=True),
    Column("ended", Float, nullable=False),
    Column("day", String(10), nullable=False),  # UTC date of ``started``: group_by=day in portable SQL
    Column("status", String(16), nullable=False),  # finished | aborted | failed
)


def database_url(db: str) -> str:
    """``--db``: a URL, or a path to an SQLite file."""
    if "://" in db:
        return db.replace("postgresql://", "postgresql+psycopg://", 1) if db.startswith("postgresql://") else db
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(db).resolve()}"


def connect(db: str) -> Engine:
    """The engine with the tables created; SQLite in WAL mode (readers never block the ledger's writer, and a
    killed process leaves a consistent file)."""
    url = database_url(db)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    metadata.create_all(engine)
    return engine
