"""Crash-safe state: a SQLite journal of mappings and activations (stdlib sqlite3, WAL, fsync).

Every mapping is recorded *before* it is requested from the router, and forgotten only after the
router confirmed its deletion; so after a crash, ``kill -9`` or power loss the next start knows
exactly what may still be open. A mapping's PCP nonce is recorded with it: PCP deletes only with
the nonce that created the mapping (RFC 6887 §15), so the next start can delete a crashed run's
PCP mappings too. Activations are recorded with their expiry on two clocks: the boot clock
(``CLOCK_BOOTTIME`` with the kernel's boot id, ``boot_clock()``), which no wall-clock jump
moves, so a restart within the same boot restores exactly what was left whatever the wall clock
did while the service was down; and the wall clock, used only after a reboot (then a restored
activation is capped at its TTL, so a wall clock that was wrong errs short).

Failures to write (disk full, read-only) never stop the service: the journal turns *degraded*,
says so once in the log and in status, and the service keeps working from memory.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from igdtrigger.core.errors import JournalError
from igdtrigger.core.model import MappingKey, MappingSpec, PinholeSpec, Proto

__all__ = ["FILENAME", "FORMAT", "Journal", "JournalActivation", "JournalError",
           "JournalMapping", "boot_clock", "no_boot_clock"]

log = logging.getLogger("igdtrigger.runtime.journal")

# 2: mappings.nonce and .protocol, secrets; 3: activations.boot_id and .expires_boot (the boot
# clock). Older journals are brought up to this format when opened; an igdtrigger that reads
# only an older format refuses this one with a clear error (it would fail on the new columns).
FORMAT = 3
FILENAME = "journal.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mappings (
    proto TEXT NOT NULL,
    external_port INTEGER NOT NULL,
    internal_client TEXT NOT NULL,
    internal_port INTEGER NOT NULL,
    description TEXT NOT NULL,
    state TEXT NOT NULL,          -- 'requested' (maybe on the router) or 'active'
    updated REAL NOT NULL,
    nonce TEXT NOT NULL DEFAULT '', -- hex: the PCP mapping nonce it is requested with, or ''
    protocol TEXT NOT NULL DEFAULT '', -- GatewayInfo.protocol it is requested over; '': unknown
    PRIMARY KEY (proto, external_port)
);
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,        -- e.g. the key PCP mapping nonces are derived with
    value TEXT NOT NULL           -- hex
);
CREATE TABLE IF NOT EXISTS activations (
    id TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    host TEXT NOT NULL,
    source TEXT NOT NULL,
    created_wall REAL NOT NULL,
    expires_wall REAL NOT NULL,
    ttl REAL NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    boot_id TEXT NOT NULL DEFAULT '',   -- the kernel's boot id when written
    expires_boot REAL NOT NULL DEFAULT 0  -- CLOCK_BOOTTIME seconds of that boot
);
CREATE TABLE IF NOT EXISTS routers (
    identity TEXT PRIMARY KEY,    -- traits.router_identity(): protocol@host
    traits TEXT NOT NULL,         -- JSON: what igdtrigger learned by checking its answers
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pinholes (
    address TEXT NOT NULL,        -- this machine's IPv6 address the pinhole lets traffic to
    proto TEXT NOT NULL,
    port INTEGER NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (address, proto, port)
);
"""


_ADDED = ("nonce", "protocol")  # mappings columns format 2 added


def _is_format_2(db: sqlite3.Connection) -> bool:
    columns = {row[1] for row in db.execute("PRAGMA table_info(mappings)")}
    return all(c in columns for c in _ADDED)


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an older journal to this format (rows kept; their nonce and protocol: '', their
    boot clock: none, so they restore by the wall clock)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(mappings)")}
    for column in _ADDED:
        if column not in columns:
            db.execute(f"ALTER TABLE mappings ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
    have = {r[1] for r in db.execute("PRAGMA table_info(activations)")}
    for column, decl in (("boot_id", "TEXT NOT NULL DEFAULT ''"),
                         ("expires_boot", "REAL NOT NULL DEFAULT 0")):
        if column not in have:
            db.execute(f"ALTER TABLE activations ADD COLUMN {column} {decl}")


def _unhex(value: object) -> bytes:
    try:
        return bytes.fromhex(str(value or ""))
    except ValueError:
        return b""


@dataclass(frozen=True, slots=True)
class JournalMapping:
    """A mapping the journal holds: maybe on the router (requested, not confirmed gone)."""

    proto: Proto
    external_port: int
    internal_client: str
    internal_port: int
    description: str
    state: str
    nonce: bytes = b""  # the PCP mapping nonce it was requested with; b"": none recorded
    protocol: str = ""  # what it was requested over ("upnp-igd", "nat-pmp", "pcp"); "": unknown

    @property
    def spec(self) -> MappingSpec:
        """The mapping as the mapper knows it."""
        return MappingSpec(self.proto, self.external_port, self.internal_client,
                           self.internal_port, self.description)


@dataclass(frozen=True, slots=True)
class JournalActivation:
    """An activation the journal holds, with its expiry on the wall and the boot clock."""

    id: str
    rule: str
    host: str
    source: str
    created_wall: float
    expires_wall: float
    ttl: float
    meta: dict[str, str]
    boot_id: str = ""  # boot_clock() when written ("" for rows of an older igdtrigger)
    expires_boot: float = math.nan


def boot_clock() -> tuple[str, float]:
    """(the kernel's boot id, seconds on ``CLOCK_BOOTTIME``): a clock that no wall-clock change
    moves and that counts suspend, valid for as long as the boot id is the same. ("", nan)
    where there is none (not Linux)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return boot_id, time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, AttributeError):
        return "", math.nan


def no_boot_clock() -> tuple[str, float]:
    """No boot clock: restore goes by the wall clock alone."""
    return "", math.nan


def _port(value: object) -> bool:
    return isinstance(value, int) and 1 <= value <= 65535


def _ipv4(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _real(value: object) -> float:
    """A journal column as a float; nan for anything else (text, NULL, a blob)."""
    if isinstance(value, (int, float)):
        return float(value)
    return math.nan


class Journal:
    """The journal file at ``path`` (use ``open``). ``wall``: the wall clock (epoch seconds) its
    rows are dated with; injected, ``time.time`` by default."""

    def __init__(self, path: Path, *, wall: Callable[[], float] = time.time) -> None:
        self.path = path
        self.wall = wall
        self.degraded = ""  # why writes are failing; "" when healthy
        self._db: sqlite3.Connection | None = None
        self._readonly = False  # read from a copy, never written: the directory is read-only
        self._copy: tempfile.TemporaryDirectory[str] | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        # writes may come from a worker thread (the mapper's write beside a router request):
        # one transaction at a time on the one connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, state_dir: Path, *, wall: Callable[[], float] = time.time) -> Journal:
        """Open (or create) the journal. Raises ``JournalError`` for a newer format; a corrupt
        file is moved aside and a fresh journal started (mappings of ours are still found on
        the router by their description)."""
        j = cls(state_dir / FILENAME, wall=wall)
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            j._connect()
        except JournalError:
            raise
        except sqlite3.OperationalError as exc:  # cannot open or write (read-only, full): the
            j._unavailable(str(exc))            # disk's problem, not the file's
        except sqlite3.DatabaseError as exc:
            j._set_aside(f"corrupt ({exc})")
            try:
                j._connect()
            except (sqlite3.Error, OSError) as again:
                j._unavailable(str(again))
        except OSError as exc:
            j._unavailable(exc.strerror or str(exc))
        return j

    def _unavailable(self, why: str) -> None:
        """Work from memory; an existing journal is still read (restore, clean-up) from a
        private copy (its WAL included) when the directory cannot be written."""
        self.degraded = f"cannot write {self.path}: {why}"
        self._readonly = True
        if self.path.exists():
            with contextlib.suppress(sqlite3.Error, OSError):
                self._copy = tempfile.TemporaryDirectory(prefix="igdtrigger-journal-")
                copy = Path(self._copy.name) / FILENAME
                for suffix in ("", "-wal"):
                    src = Path(str(self.path) + suffix)
                    if src.exists():
                        shutil.copyfile(src, Path(str(copy) + suffix))
                db = sqlite3.connect(copy, isolation_level=None)
                try:
                    db.execute("SELECT count(*) FROM mappings").fetchone()
                except sqlite3.Error:
                    db.close()
                    raise
                self._db = db
        log.error("journal unavailable (%s): state lives in memory only%s", self.degraded,
                  " (what it held is still read)" if self._db is not None else "")

    def _connect(self) -> None:
        db = sqlite3.connect(self.path, timeout=2.0, isolation_level=None,
                             check_same_thread=False)  # used under _lock from any thread
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > FORMAT:
                raise JournalError(
                    f"{self.path} was written by a newer igdtrigger (format {version}, this one "
                    f"reads {FORMAT}); upgrade igdtrigger, or move the file away to start fresh "
                    "(mappings of ours are still recognised on the router and cleaned up)",
                    source=str(self.path))
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            _migrate(db)
            db.execute(f"PRAGMA user_version={FORMAT}")
            db.execute("SELECT count(*) FROM mappings").fetchone()  # touch: corruption shows here
        except BaseException:
            db.close()
            raise
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
        self._db = db

    def deleted(self) -> bool:
        """The journal file this one writes is no longer at its path (the state directory was
        removed or replaced while running): what is written goes to an unlinked file that no
        next start would read. The caller opens a new one and writes again what it holds."""
        if self._db is None or self._readonly or self._identity is None:
            return False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return (st.st_dev, st.st_ino) != self._identity

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.{why.split()[0]}-{int(self.wall())}")
        log.error("journal %s is %s: moved to %s and starting fresh", self.path, why, aside)
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                with contextlib.suppress(OSError):
                    src.replace(Path(str(aside) + suffix))

    def _write(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        """One fsync'd transaction; a failure degrades the journal instead of raising."""
        with self._lock:
            self._write_locked(sql, rows)

    def _write_locked(self, sql: str, rows: list[tuple[object, ...]],
                      *more: tuple[str, list[tuple[object, ...]]]) -> None:
        """``sql`` for ``rows`` (and each of ``more``) in one fsync'd transaction."""
        db = self._db
        statements = [(q, r) for q, r in ((sql, rows), *more) if r]
        if db is None or not statements or self._readonly:
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for q, r in statements:
                    db.executemany(q, r)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            if self.degraded:
                log.info("journal writable again")
                self.degraded = ""
        except (sqlite3.Error, OSError) as exc:
            if not self.degraded:
                log.error("journal write failed (%s): the service goes on from memory; what "
                          "opens after this may not be cleaned up after a crash", exc)
            self.degraded = str(exc)

    # --- mappings -----------------------------------------------------------------------------

    def mappings_requested(self, specs: list[MappingSpec],
                           nonces: Mapping[MappingKey, bytes] | None = None,
                           protocol: str = "", *,
                           activations: list[JournalActivation] | None = None) -> None:
        """Record mappings about to be requested, in one fsync'd transaction. ``nonces``: the
        PCP mapping nonce each is requested with; ``protocol``: the gateway's protocol
        (``GatewayInfo.protocol``), which decides how a leftover can be deleted;
        ``activations``: the activations they are for, recorded in the same transaction (one
        fsync for both, as ``activations_put``)."""
        nonces = nonces or {}
        self._put_mappings([(s, nonces.get(s.key, b""), protocol) for s in specs],
                           activations or [])

    def mappings_copy(self, rows: list[JournalMapping]) -> None:
        """Record another journal's mappings as they are (nonce and protocol kept): what a dead
        ``igdtrigger run`` left, taken over (``leftovers.take_over``)."""
        self._put_mappings([(m.spec, m.nonce, m.protocol) for m in rows])

    def _put_mappings(self, rows: list[tuple[MappingSpec, bytes, str]],
                      acts: list[JournalActivation] | None = None) -> None:
        now = self.wall()
        sql = ("INSERT INTO mappings (proto, external_port, internal_client, internal_port, "
               "description, state, updated, nonce, protocol) VALUES (?,?,?,?,?,'requested',?,?,?) "
               "ON CONFLICT(proto, external_port) DO UPDATE SET "
               "internal_client=excluded.internal_client, internal_port=excluded.internal_port, "
               "description=excluded.description, updated=excluded.updated, nonce=excluded.nonce, "
               "protocol=excluded.protocol")
        with self._lock:
            self._write_locked(sql, [(s.proto.value, s.external_port, s.internal_client,
                                      s.internal_port, s.description, now, nonce.hex(), protocol)
                                     for s, nonce, protocol in rows],
                               _activation_rows(acts or []))

    def mappings_gone(self, keys: list[tuple[Proto, int]]) -> None:
        """Forget mappings confirmed gone from the router, in one fsync'd transaction."""
        self._write("DELETE FROM mappings WHERE proto=? AND external_port=?",
                    [(proto.value, port) for proto, port in keys])

    def mappings(self) -> list[JournalMapping]:
        """Every journaled mapping (readable rows only; a malformed row is skipped)."""
        if self._db is None:
            return []
        try:
            rows = self._db.execute(
                "SELECT proto, external_port, internal_client, internal_port, description, "
                "state, nonce, protocol FROM mappings" if _is_format_2(self._db) else
                "SELECT proto, external_port, internal_client, internal_port, description, "
                "state, '', '' FROM mappings").fetchall()  # a format-1 read-only copy
        except sqlite3.Error as exc:
            log.error("cannot read the journal's mappings: %s", exc)
            return []
        out = []
        for proto, port, client, iport, desc, state, nonce, protocol in rows:
            # a row that is not what this code writes (text, a blob, a port out of range, a
            # client that is no address) is skipped: never a delete sent for it
            if (proto in ("TCP", "UDP") and _port(port) and _port(iport)
                    and isinstance(client, str) and isinstance(desc, str) and _ipv4(client)):
                out.append(JournalMapping(Proto(proto), int(port), client, int(iport), desc,
                                          str(state), _unhex(nonce), str(protocol)))
            else:
                log.warning("journal: skipping a mapping row that is not one igdtrigger wrote "
                            "(%r %r %r %r)", proto, port, client, iport)
        return out

    # --- secrets --------------------------------------------------------------------------------

    def secret(self, name: str, nbytes: int = 16) -> bytes | None:
        """A random value kept in the journal (created on first use), e.g. the key PCP mapping
        nonces are derived with. ``None`` when the journal holds none and cannot store one."""
        db = self._db
        if db is None:
            return None
        try:
            row = db.execute("SELECT value FROM secrets WHERE name=?", (name,)).fetchone()
        except sqlite3.Error as exc:  # a journal from before this table (read-only copy)
            log.debug("no secrets in the journal: %s", exc)
            return None
        if row is not None and _unhex(row[0]):
            return _unhex(row[0])
        if self._readonly:
            return None
        self._write("INSERT OR REPLACE INTO secrets VALUES (?,?)",
                    [(name, secrets.token_hex(nbytes))])
        row = db.execute("SELECT value FROM secrets WHERE name=?", (name,)).fetchone()
        return _unhex(row[0]) if row is not None and _unhex(row[0]) else None

    # --- routers: learned traits ----------------------------------------------------------

    def router_traits(self, identity: str) -> dict[str, object] | None:
        """What an earlier run learned about this router (``RouterTraits.persisted()``)."""
        if self._db is None:
            return None
        try:
            row = self._db.execute("SELECT traits FROM routers WHERE identity=?",
                                   (identity,)).fetchone()
        except sqlite3.Error as exc:  # a journal from before this table (read-only copy)
            log.debug("no router traits in the journal: %s", exc)
            return None
        if row is None:
            return None
        try:
            data = json.loads(row[0])
        except ValueError:
            return None
        return {str(k): v for k, v in data.items()} if isinstance(data, dict) else None

    def router_traits_put(self, identity: str, traits: dict[str, object]) -> None:
        """Keep what was learned about the router ``identity`` (``traits.router_identity``)."""
        self._write("INSERT OR REPLACE INTO routers VALUES (?,?,?)",
                    [(identity, json.dumps(traits, sort_keys=True), self.wall())])

    # --- IPv6 pinholes --------------------------------------------------------------------------

    def pinholes_requested(self, specs: list[PinholeSpec]) -> None:
        """Record pinholes about to be requested (a crash leaves them findable)."""
        now = self.wall()
        self._write("INSERT OR REPLACE INTO pinholes VALUES (?,?,?,?)",
                    [(s.address, s.proto.value, s.port, now) for s in specs])

    def pinholes_gone(self, specs: list[PinholeSpec]) -> None:
        """Forget pinholes confirmed closed (one transaction for all of them)."""
        self._write("DELETE FROM pinholes WHERE address=? AND proto=? AND port=?",
                    [(s.address, s.proto.value, s.port) for s in specs])

    def pinholes(self) -> list[PinholeSpec]:
        """Every journaled pinhole (readable rows only)."""
        if self._db is None:
            return []
        try:
            rows = self._db.execute("SELECT address, proto, port FROM pinholes").fetchall()
        except sqlite3.Error as exc:  # a journal from before pinholes (read-only copy)
            log.debug("no pinholes in the journal: %s", exc)
            return []
        out = []
        for address, proto, port in rows:
            with contextlib.suppress(ValueError, TypeError):
                if proto in ("TCP", "UDP") and _port(port) and isinstance(address, str):
                    ipaddress.IPv6Address(address)
                    out.append(PinholeSpec(address, Proto(proto), int(port)))
        return out

    # --- activations --------------------------------------------------------------------------

    def activations_put(self, acts: list[JournalActivation]) -> None:
        """Record (or replace) activations, so a restart can restore them."""
        self._write(*_activation_rows(acts))

    def activations_clear(self) -> None:
        """A clean stop: what this run held has ended; nothing is restored at the next start."""
        self._write("DELETE FROM activations", [()])

    def activation_gone(self, act_id: str) -> None:
        """Forget one activation (ended, or expired)."""
        self._write("DELETE FROM activations WHERE id=?", [(act_id,)])

    def activations(self) -> list[JournalActivation]:
        """The journaled activations. A row that is not what this code writes (a text where a
        number belongs, meta that is not an object of strings) comes back with nan for a bad
        number and empty meta: ``Engine.restore`` refuses what is not finite."""
        if self._db is None:
            return []
        try:
            try:
                rows = self._db.execute(
                    "SELECT id, rule, host, source, created_wall, expires_wall, ttl, meta, "
                    "boot_id, expires_boot FROM activations").fetchall()
            except sqlite3.OperationalError:  # a read-only copy of an older journal
                rows = [(*r, "", 0.0) for r in self._db.execute(
                    "SELECT id, rule, host, source, created_wall, expires_wall, ttl, meta "
                    "FROM activations").fetchall()]
        except sqlite3.Error as exc:
            log.error("cannot read the journal's activations: %s", exc)
            return []
        out = []
        for act_id, rule, host, source, created, expires, ttl, meta, boot_id, exp_boot in rows:
            try:
                meta_d = json.loads(meta) if isinstance(meta, str) else {}
            except ValueError:
                meta_d = {}
            if not isinstance(meta_d, dict):
                meta_d = {}
            out.append(JournalActivation(
                str(act_id), str(rule), str(host), str(source), _real(created), _real(expires),
                _real(ttl), {str(k): str(v) for k, v in meta_d.items()},
                boot_id if isinstance(boot_id, str) else "",
                _real(exp_boot) if boot_id else math.nan))
        return out

    def close(self) -> None:
        """Close the database (and drop a private read-only copy); idempotent."""
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None
        if self._copy is not None:
            self._copy.cleanup()
            self._copy = None


def _activation_rows(acts: list[JournalActivation]) -> tuple[str, list[tuple[object, ...]]]:
    """The statement and rows recording (or replacing) ``acts``."""
    return ("INSERT OR REPLACE INTO activations (id, rule, host, source, created_wall, "
            "expires_wall, ttl, meta, boot_id, expires_boot) VALUES (?,?,?,?,?,?,?,?,?,?)",
            [(a.id, a.rule, a.host, a.source, a.created_wall, a.expires_wall, a.ttl,
              json.dumps(a.meta), a.boot_id,
              a.expires_boot if math.isfinite(a.expires_boot) else 0.0) for a in acts])
