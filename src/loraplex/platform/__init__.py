"""Seed 001's platform: tenants and their API keys, adapters uploaded over HTTP into a content-addressed store,
deployments, and a token ledger in a real database (SQLite by default, PostgreSQL through SQLAlchemy).

Below the server in the layers: nothing here knows HTTP; the routes live in ``server/platform_api.py``.
"""
from loraplex.platform.keys import SCOPES, Principal
from loraplex.platform.ledger import Ledger, UsageRow
from loraplex.platform.store import Platform, PlatformError

__all__ = ["SCOPES", "Ledger", "Platform", "PlatformError", "Principal", "UsageRow"]
