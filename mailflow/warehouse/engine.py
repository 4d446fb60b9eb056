"""Engine creation, with the per-dialect settings the project relies on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from mailflow.errors import ConfigError

_ENGINES: dict[str, Engine] = {}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the webhook service and a flow share the file; busy_timeout makes a
    # writer wait for the other instead of failing at once.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _json_default(value: Any) -> Any:
    # What the json module took and orjson does not: subclasses of the JSON types
    # (a quarantined row from pandas holds numpy.float64, a float subclass) and numpy
    # scalars outside arrays.
    for kind in (float, int, str):
        if isinstance(value, kind):
            return kind(value)
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        return item()
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def _json_dumps(value: Any) -> str:
    # Non-string keys become strings, as with the json module; numpy scalars as numbers.
    try:
        return orjson.dumps(
            value,
            default=_json_default,
            option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY,
        ).decode()
    except orjson.JSONEncodeError:
        # Integers past 64 bits (a raw webhook event may carry any number): the json
        # module writes them exactly. Rare, so the slower path is fine.
        return json.dumps(value, default=_json_default)


#: Named in every warehouse error, so the operator knows what to fix.
SETTING = "MAILFLOW_WAREHOUSE_URL"


def safe_url(url: str) -> str:
    """``url`` with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def unreachable(url: str, exc: SQLAlchemyError) -> ConfigError:
    """The error for a warehouse that failed a statement: it names the setting, the URL
    (password hidden) and the driver's first line, never a traceback."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return ConfigError(
        f"the warehouse at {safe_url(url)} ({SETTING}) cannot be reached or used: {reason}. "
        "Check that "
        "the server runs, the URL, user and password are right, and that it is migrated "
        "(`mailflow db upgrade`)."
    )


def make_engine(url: str) -> Engine:
    """A new engine for ``url``; SQLite files get WAL mode.

    Raises:
        ConfigError: the URL cannot be parsed, or names a SQLite file in a folder that
            does not exist (a typo would otherwise create a new, empty warehouse).
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(
            f"{SETTING} is not a database URL ({exc}). Use a SQLAlchemy URL such as "
            "sqlite:///data/warehouse.db or postgresql+psycopg://user:password@host/dbname."
        ) from None
    # orjson for the JSON columns: every planned message's render context is written
    # once and read back when it is claimed; the json module took several times longer.
    kwargs: dict[str, Any] = {
        "future": True,
        "json_serializer": _json_dumps,
        "json_deserializer": orjson.loads,
    }
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).parent
            if not folder.is_dir():
                raise ConfigError(
                    f"{SETTING} names a SQLite file in a folder that does not exist "
                    f"({folder}/). Fix the path, or create the folder if a new warehouse "
                    "there is what you want."
                )
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except ArgumentError as exc:  # an unknown dialect or driver (NoSuchModuleError)
        raise ConfigError(
            f"{SETTING}={safe_url(url)} names a database mailflow cannot load ({exc}). Use "
            "sqlite:///path/warehouse.db or postgresql+psycopg://user:password@host/dbname."
        ) from None
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def get_engine(url: str | None = None) -> Engine:
    """The shared engine for ``url`` (default: the configured warehouse)."""
    if url is None:
        from mailflow.settings import get_settings

        url = get_settings().warehouse_url
    engine = _ENGINES.get(url)
    if engine is None:
        engine = _ENGINES[url] = make_engine(url)
    return engine


def dispose_engines() -> None:
    """Close every pooled connection (tests and CLI shutdown)."""
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()
