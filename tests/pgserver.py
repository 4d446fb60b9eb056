"""A real, throwaway PostgreSQL server for the test session, and fresh databases in it.

``PostgresServer`` runs ``initdb`` and ``pg_ctl`` from the local PostgreSQL install in
a temporary directory, on a free TCP port on 127.0.0.1 (its Unix socket also lives in
that directory), tuned for tests (no fsync), and removes everything when stopped.
``initdb`` refuses to run as root, so as root the server runs as an unprivileged user:
Debian's ``postgres`` when it exists, else a system user created for the purpose.

``DatabaseFactory`` hands out a freshly migrated database per test in O(10 ms):
it migrates one template database per session and copies it with
``CREATE DATABASE … TEMPLATE``. It works the same on an existing server
(``MAILFLOW_TEST_POSTGRES_URL``), as long as its user may create databases.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url

#: A URL of an existing server to use instead of starting one (its user needs CREATEDB).
URL_ENV = "MAILFLOW_TEST_POSTGRES_URL"
#: "1" turns "no PostgreSQL here" from a skip into an error (CI sets it).
REQUIRE_ENV = "MAILFLOW_REQUIRE_POSTGRES"
#: The unprivileged user created when running as root on a machine without ``postgres``.
FALLBACK_USER = "mailflow-pg"

_TOOLS = ("initdb", "pg_ctl")
# Durability is worthless for a throwaway server; these make DDL and commits cheap.
_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    # Not UTC on purpose (+12:45/+13:45): the warehouse holds naive UTC, and an aware
    # datetime or now() slipping into SQL would be shifted by this zone, so tests catch it.
    "timezone": "'Pacific/Chatham'",
    "log_timezone": "'UTC'",
}


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or the server would not start."""


def postgres_required() -> bool:
    """Whether the environment asks for PostgreSQL to be an error when absent (CI)."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes")


def _version_key(bindir: str) -> tuple[int, ...]:
    version = Path(bindir).parent.name
    return tuple(int(p) for p in re.findall(r"\d+", version)) or (0,)


def find_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest install."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        bindir = Path(on_path).resolve().parent
        if all((bindir / tool).exists() for tool in _TOOLS):
            return bindir
    # Debian and Ubuntu keep the server binaries off PATH, one folder per major version.
    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if all(os.access(Path(found) / tool, os.X_OK) for tool in _TOOLS):
            return Path(found)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class _RunAs:
    """Who runs initdb and the server: the current user, or (as root) an unprivileged one."""

    user: str | None = None
    uid: int | None = None
    gid: int | None = None

    @classmethod
    def for_current_process(cls) -> _RunAs:
        if os.geteuid() != 0:
            return cls()
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            entry = _ensure_user(FALLBACK_USER)
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    def run(self, args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        extra: dict[str, object] = {}
        if self.uid is not None:
            # Drop to the unprivileged user in the child only (no runuser/su needed).
            extra = {"user": self.uid, "group": self.gid, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        # The caller's folder may be closed to that user (a checkout under /root).
        kwargs.setdefault("cwd", tempfile.gettempdir())
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            args, env=env, text=True, capture_output=True, check=False, **extra, **kwargs
        )

    def own(self, path: Path) -> None:
        if self.uid is not None:
            os.chown(path, self.uid, self.gid if self.gid is not None else -1)


def _ensure_user(name: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    useradd = shutil.which("useradd") or shutil.which("adduser")
    if useradd is None:
        raise PostgresUnavailable(
            "running as root, there is no 'postgres' user and no useradd to create one; "
            f"create an unprivileged user or run the tests as one (or set {URL_ENV})"
        )
    if Path(useradd).name == "useradd":
        args = [useradd, "--system", "--no-create-home", "--shell", "/bin/false", name]
    else:  # BusyBox adduser
        args = [useradd, "-S", "-D", "-H", name]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PostgresUnavailable(f"could not create user {name!r}: {done.stderr.strip()}")
    return pwd.getpwnam(name)


_DIR_PREFIX = "mailflow-pg-"
_OWNER_FILE = "owner.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PostgresServer:
    """A PostgreSQL cluster in a temporary directory; ``start()`` then ``stop()``."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.runas = _RunAs.for_current_process()
        self.root = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.log = self.root / "server.log"
        self.port = 0
        self._started = False
        (self.root / _OWNER_FILE).write_text(str(os.getpid()))

    @classmethod
    def reap_orphans(cls, bindir: Path) -> None:
        """Stop and delete servers left behind by test sessions that were killed."""
        runas = _RunAs.for_current_process()
        for root in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*"):
            try:
                owner = int((root / _OWNER_FILE).read_text())
            except (OSError, ValueError):
                continue
            if _alive(owner):
                continue
            if (root / "data" / "postmaster.pid").exists():
                runas.run(
                    [
                        str(bindir / "pg_ctl"),
                        "stop",
                        "--mode=immediate",
                        f"--pgdata={root / 'data'}",
                    ]
                )
            shutil.rmtree(root, ignore_errors=True)

    @property
    def url(self) -> str:
        """Superuser URL of the ``postgres`` database, over TCP."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _tool(self, name: str) -> str:
        return str(self.bindir / name)

    def start(self) -> None:
        try:
            self._init()
            # Another process may grab the free port between the probe and the bind.
            for attempt in range(3):
                self.port = _free_port()
                self._configure()
                done = self.runas.run(
                    [
                        self._tool("pg_ctl"),
                        "start",
                        "--wait",
                        "--timeout=60",
                        "--silent",
                        f"--pgdata={self.data}",
                        f"--log={self.log}",
                    ]
                )
                if done.returncode == 0:
                    self._started = True
                    return
                if attempt == 2 or "could not bind" not in self._log_tail():
                    raise PostgresUnavailable(
                        f"pg_ctl start failed ({done.returncode}): {done.stderr.strip()}\n"
                        f"server log:\n{self._log_tail()}"
                    )
        except BaseException:
            self.stop()
            raise

    def _init(self) -> None:
        self.runas.own(self.root)
        self.root.chmod(0o700)
        self.sockets.mkdir(mode=0o700)
        self.runas.own(self.sockets)
        done = self.runas.run(
            [
                self._tool("initdb"),
                f"--pgdata={self.data}",
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"initdb failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
            )

    def _configure(self) -> None:
        # postgresql.auto.conf wins over postgresql.conf and is rewritten for each attempt.
        sockets = str(self.sockets).replace("'", "''")
        settings = {**_SETTINGS, "port": str(self.port), "unix_socket_directories": f"'{sockets}'"}
        auto = self.data / "postgresql.auto.conf"
        auto.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        self.runas.own(auto)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def stop(self) -> None:
        if self._started:
            # Immediate: nothing here is worth a clean shutdown checkpoint.
            self.runas.run(
                [
                    self._tool("pg_ctl"),
                    "stop",
                    "--wait",
                    "--mode=immediate",
                    f"--pgdata={self.data}",
                ]
            )
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def postgres_admin_url() -> Iterator[str]:
    """An admin URL: ``MAILFLOW_TEST_POSTGRES_URL``, else a throwaway local server's.

    Raises:
        PostgresUnavailable: no URL is set and no PostgreSQL binaries were found, or the
            local server did not start.
    """
    external = os.environ.get(URL_ENV, "").strip()
    if external:
        yield external
        return
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable(
            "PostgreSQL binaries (initdb, pg_ctl) not found on PATH or in "
            "/usr/lib/postgresql/*/bin; install PostgreSQL (Debian: apt-get install "
            f"postgresql) or set {URL_ENV} to a server whose user may create databases"
        )
    PostgresServer.reap_orphans(bindir)
    server = PostgresServer(bindir)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


class DatabaseFactory:
    """Fresh databases copied from one template migrated by ``prepare``."""

    def __init__(self, admin_url: str, prepare: Callable[[str], None]) -> None:
        parsed = make_url(admin_url)
        if parsed.drivername == "postgresql":
            # SQLAlchemy 2.1's default, named so the URL means the same on 2.0.
            parsed = parsed.set(drivername="postgresql+psycopg")
        self._base: URL = parsed
        self._prefix = f"mf_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self._count = 0
        self._admin: Engine = create_engine(parsed, isolation_level="AUTOCOMMIT")
        self._template = f"{self._prefix}_tmpl"
        self._execute(f'CREATE DATABASE "{self._template}"')
        try:
            prepare(self.url_of(self._template))
        except BaseException:
            self.close()
            raise

    def url_of(self, database: str) -> str:
        return self._base.set(database=database).render_as_string(hide_password=False)

    def _execute(self, sql: str) -> None:
        with self._admin.connect() as conn:
            conn.execute(text(sql))

    def create(self) -> str:
        """A new database, a copy of the migrated template; returns its URL."""
        self._count += 1
        name = f"{self._prefix}_{self._count}"
        self._execute(f'CREATE DATABASE "{name}" TEMPLATE "{self._template}"')
        return self.url_of(name)

    def drop(self, url: str) -> None:
        """Drop a database made by ``create`` (its connections, if any, are ended)."""
        name = make_url(url).database
        self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._execute(f'DROP DATABASE IF EXISTS "{self._template}" WITH (FORCE)')
        self._admin.dispose()
