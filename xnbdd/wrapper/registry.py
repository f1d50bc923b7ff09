"""The wrapper's exports and the state database that keeps them across restarts.

Every change goes through ``Registry``: the entry is validated (name, paths, files), the database
is written (atomically) with the change, and only then does the change become visible, so a
failed save loses nothing and disturbs nothing.

The database keeps xNBD's format (docs/compat.md §8.3): ``{"version": 2, "images": {NAME: {...}}}``
with sorted keys and 4-space indentation. Exports given on the command line (``--imgfile``) or in
the configuration folder are configuration, not state: they are not written to the database.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import ConfigError, Mode, load
from ..proto.consts import MAX_STRING

DB_VERSION = 2
DEFAULT_DB = "/var/lib/xnbd/xnbd.state"


class RegistryError(Exception):
    """An export cannot be added, changed or removed; the message says why."""


class DatabaseError(Exception):
    """The state database cannot be used; the wrapper must not start (nothing is overwritten)."""


@dataclass(frozen=True)
class ExportEntry:
    """One export. ``mode`` is the database's: "target" or "proxy"; ``cow``/``readonly`` are the
    wrapper's switches (or a configuration file's), applied when the server is started."""

    name: str
    mode: str
    image: str  # target: the image; proxy: the cache image
    cow: bool = False
    readonly: bool = False
    description: str = ""
    remote_host: str = ""
    remote_port: str = ""
    remote_export_name: str | None = None
    bitmap: str = ""
    control_socket: str = ""
    persistent: bool = True  # written to the state database

    @property
    def server_mode(self) -> str:
        """xnbd-server's mode for this entry."""
        if self.mode == "target" and self.cow:
            return "cow_target"
        return self.mode

    def paths(self) -> list[str]:
        return [p for p in (self.image, self.bitmap, self.control_socket) if p]

    def describe(self) -> str:
        """The original's ``list`` line body."""
        if self.mode == "proxy":
            remote = f"{self.remote_host}:{self.remote_port}"
            if self.remote_export_name:
                remote += f":{self.remote_export_name}"
            return f"{self.name}  ({remote}, {self.image}, {self.bitmap}, {self.control_socket})"
        return f"{self.name}  ({self.image})"


# -- validation ---------------------------------------------------------------------------------


def check_name(name: str) -> None:
    """Export names are NBD strings (UTF-8, no NUL, at most 4096 bytes); control characters are
    refused too, since names appear in the text control protocol and in logs. Names never become
    file names (per-export files are named by a hash), so no name can reach outside a directory."""
    if not name:
        raise RegistryError("an export name must not be empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_STRING:
        raise RegistryError(f"export name longer than {MAX_STRING} bytes")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise RegistryError(f"export name {name!r} contains control characters")


def _inside(path: str, roots: Iterable[str]) -> bool:
    real = os.path.realpath(path)
    return any(
        os.path.commonpath([real, os.path.realpath(r)]) == os.path.realpath(r) for r in roots
    )


def check_path(path: str, what: str, allowed_dirs: tuple[str, ...]) -> None:
    if not path:
        raise RegistryError(f"{what}: no path given")
    if not os.path.isabs(path):
        raise RegistryError(f"{what} {path}: path must be absolute")
    if "\0" in path or "\n" in path:
        raise RegistryError(f"{what}: path contains NUL or a line break")
    if allowed_dirs and not _inside(path, allowed_dirs):
        raise RegistryError(
            f"{what} {path}: outside the allowed directories ({', '.join(allowed_dirs)})"
        )


def check_image(path: str, what: str, *, writable: bool) -> None:
    """The image exists, is a regular file or a block device, and can be opened as needed."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise RegistryError(f"{what} {path}: {err.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise RegistryError(f"{what} {path}: not a regular file or block device")
    if not os.access(path, os.R_OK | (os.W_OK if writable else 0)):
        raise RegistryError(f"{what} {path}: permission denied")


def check_entry(entry: ExportEntry, allowed_dirs: tuple[str, ...] = ()) -> None:
    check_name(entry.name)
    if entry.mode == "target":
        check_path(entry.image, "image", allowed_dirs)
        check_image(entry.image, "image", writable=not (entry.readonly or entry.cow))
        return
    if entry.mode != "proxy":
        raise RegistryError(f"unknown mode {entry.mode!r} (target or proxy)")
    check_path(entry.image, "cache image", allowed_dirs)
    check_path(entry.bitmap, "bitmap", allowed_dirs)
    check_path(entry.control_socket, "control socket", allowed_dirs)
    if not entry.remote_host:
        raise RegistryError("proxy: no remote host")
    if not entry.remote_port.isdigit() or not 0 < int(entry.remote_port) < 65536:
        raise RegistryError(f"proxy: remote port {entry.remote_port!r} is not a port number")
    # As the original: the cache image must exist (the server sizes it to the remote export).
    check_image(entry.image, "cache image", writable=True)
    for path, what in ((entry.bitmap, "bitmap"), (entry.control_socket, "control socket")):
        if not os.path.isdir(os.path.dirname(path)):
            raise RegistryError(f"{what} {path}: directory does not exist")


# -- the state database -------------------------------------------------------------------------


def entry_to_db(entry: ExportEntry) -> dict[str, Any]:
    if entry.mode == "proxy":
        return {
            "bitmap_path": entry.bitmap,
            "control_socket_path": entry.control_socket,
            "image_path": entry.image,
            "mode": "proxy",
            "remote_export_name": entry.remote_export_name,
            "remote_host": entry.remote_host,
            "remote_port": entry.remote_port,
        }
    return {"image_path": entry.image, "mode": "target"}


def entry_from_db(name: str, data: object) -> ExportEntry:
    def text(key: str) -> str:
        value = data.get(key) if isinstance(data, dict) else None
        if not isinstance(value, str):
            raise DatabaseError(f"export {name!r}: {key!r} missing or not a string")
        return value

    if not isinstance(data, dict):
        raise DatabaseError(f"export {name!r}: not an object")
    mode = text("mode")
    if mode == "target":
        return ExportEntry(name=name, mode="target", image=text("image_path"))
    if mode == "proxy":
        remote_name = data.get("remote_export_name")
        if remote_name is not None and not isinstance(remote_name, str):
            raise DatabaseError(f"export {name!r}: 'remote_export_name' is not a string")
        return ExportEntry(
            name=name,
            mode="proxy",
            image=text("image_path"),
            bitmap=text("bitmap_path"),
            control_socket=text("control_socket_path"),
            remote_host=text("remote_host"),
            remote_port=text("remote_port"),
            remote_export_name=remote_name,
        )
    raise DatabaseError(f"export {name!r}: unknown mode {mode!r}")


class Database:
    """The JSON state file: read once at start, rewritten atomically after every change."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def _check_file(self) -> bool:
        """True if the file exists; refuses anything but a regular file with one link."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise DatabaseError(f"{self.path}: {err.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise DatabaseError(f"{self.path}: not a regular file (symlinks are refused)")
        if st.st_nlink != 1:
            raise DatabaseError(f"{self.path}: has {st.st_nlink} hard links, refusing it")
        return True

    def load(self) -> list[ExportEntry]:
        if not self._check_file():
            return []
        try:
            raw = Path(self.path).read_bytes()
            data = json.loads(raw)
        except OSError as err:
            raise DatabaseError(f"{self.path}: {err.strerror}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DatabaseError(f"{self.path}: not valid JSON: {err}") from None
        if not isinstance(data, dict) or data.get("version") != DB_VERSION:
            raise DatabaseError(f"{self.path}: not a version {DB_VERSION} xnbd state database")
        images = data.get("images", {})
        if not isinstance(images, dict):
            raise DatabaseError(f"{self.path}: 'images' is not an object")
        try:
            return [entry_from_db(name, value) for name, value in images.items()]
        except DatabaseError as err:
            raise DatabaseError(f"{self.path}: {err}") from None

    def save(self, entries: Iterable[ExportEntry]) -> None:
        """Temporary file in the same directory, fsync, rename over, fsync the directory: the
        database on disk is always either the old or the new one, never a torn mix."""
        images = {e.name: entry_to_db(e) for e in entries if e.persistent}
        text = json.dumps({"images": images, "version": DB_VERSION}, sort_keys=True, indent=4)
        directory = os.path.dirname(self.path)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, 0o700)
            self._check_file()
            fd, temp = tempfile.mkstemp(prefix=".xnbd.state.", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(temp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as err:
            raise DatabaseError(f"cannot write {self.path}: {err.strerror or err}") from None

    def keep_previous(self) -> None:
        """The loaded file had entries that could not be added: keep it as ``<db>.prev``."""
        try:
            os.replace(self.path, self.path + ".prev")
        except OSError as err:
            raise DatabaseError(f"cannot rename {self.path}: {err.strerror}") from None


# -- the configuration folder -------------------------------------------------------------------

_IGNORED_KEYS = {"lport", "laddr", "unix", "oldstyle", "logpath", "syslog", "handoff_socket"}


def load_config_dir(directory: str) -> tuple[list[ExportEntry], list[str]]:
    """One export per ``*.conf`` file, in xnbd-server's instance format (xnbdd/config.py); the
    export name is the file's ``exportname`` or else its name without ``.conf``. Returns the
    entries and warnings; a file that cannot be used raises RegistryError naming it."""
    entries: list[ExportEntry] = []
    warnings: list[str] = []
    try:
        files = sorted(Path(directory).glob("*.conf"))
    except OSError as err:
        raise RegistryError(f"{directory}: {err.strerror}") from None
    for file in files:
        try:
            config = load(str(file))
        except ConfigError as err:
            raise RegistryError(str(err)) from None
        ignored = sorted(config.given & _IGNORED_KEYS)
        if ignored:
            warnings.append(f"{file}: ignored under xnbd-wrapper: {', '.join(ignored)}")
        mode = config.mode or Mode.TARGET
        entry = ExportEntry(
            name=config.exportname or file.name.removesuffix(".conf"),
            mode="proxy" if mode is Mode.PROXY else "target",
            cow=mode is Mode.COW_TARGET,
            image=config.image or config.cache_image or "",
            readonly=config.readonly,
            description=config.description,
            remote_host=config.remote_host or "",
            remote_port=str(config.remote_port or ""),
            remote_export_name=config.target_exportname,
            bitmap=config.cache_bitmap or "",
            control_socket=config.control_socket or "",
            persistent=False,
        )
        entries.append(entry)
    return entries, warnings


# -- the registry -------------------------------------------------------------------------------


class Registry:
    """Exports by name, each with the original's stable 1-based index."""

    def __init__(self, db: Database | None, allowed_dirs: Iterable[str] = ()) -> None:
        self.db = db
        self.allowed_dirs = tuple(os.path.abspath(d) for d in allowed_dirs)
        self._entries: dict[str, tuple[int, ExportEntry]] = {}
        self._next_index = 1

    def __iter__(self) -> Iterator[tuple[int, ExportEntry]]:
        return iter(sorted(self._entries.values(), key=lambda item: item[0]))

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> ExportEntry | None:
        item = self._entries.get(name)
        return item[1] if item else None

    def names(self) -> list[str]:
        return [entry.name for _, entry in self]

    def _check_conflicts(self, entry: ExportEntry, replacing: str | None = None) -> None:
        if entry.name in self._entries and entry.name != replacing:
            raise RegistryError(f"export {entry.name!r} already exists")
        if entry.mode != "proxy":
            return
        for _, other in self:
            if other.name == replacing or other.mode != "proxy":
                continue
            shared = set(entry.paths()) & set(other.paths())
            if shared:
                raise RegistryError(
                    f"export {entry.name!r}: {', '.join(sorted(shared))} already used by "
                    f"proxy export {other.name!r}"
                )

    def _commit(self, entries: dict[str, tuple[int, ExportEntry]]) -> None:
        """Save first; the in-memory view changes only when the database has it."""
        if self.db is not None:
            ordered = [e for _, e in sorted(entries.values(), key=lambda item: item[0])]
            try:
                self.db.save(ordered)
            except DatabaseError as err:
                raise RegistryError(str(err)) from None
        self._entries = entries

    def add(self, entry: ExportEntry, *, save: bool = True) -> int:
        check_entry(entry, self.allowed_dirs if entry.persistent else ())
        self._check_conflicts(entry)
        index = self._next_index
        entries = {**self._entries, entry.name: (index, entry)}
        if save:
            self._commit(entries)
        else:
            self._entries = entries
        self._next_index += 1
        return index

    def replace(self, entry: ExportEntry) -> None:
        """Change an export in place (after a proxy switch or reconnect), keeping its index."""
        if entry.name not in self._entries:
            raise RegistryError(f"no export named {entry.name!r}")
        self._check_conflicts(entry, replacing=entry.name)
        index, _ = self._entries[entry.name]
        self._commit({**self._entries, entry.name: (index, entry)})

    def remove(self, name: str) -> ExportEntry:
        if name not in self._entries:
            raise RegistryError(f"no export named {name!r}")
        entry = self._entries[name][1]
        self._commit({k: v for k, v in self._entries.items() if k != name})
        return entry

    def find_by_file(self, path: str) -> list[str]:
        return [e.name for _, e in self if e.image == path]

    def find_by_index(self, index: int) -> str | None:
        return next((e.name for i, e in self if i == index), None)

    def save(self) -> None:
        self._commit(dict(self._entries))


def apply_switches(entry: ExportEntry, *, cow: bool, readonly: bool) -> ExportEntry:
    """The wrapper's global ``--cow`` / ``--readonly`` (docs/compat.md §8.4) over an entry's."""
    return replace(
        entry,
        cow=entry.cow or (cow and entry.mode == "target"),
        readonly=entry.readonly or readonly,
    )


def restore(
    registry: Registry, entries: Iterable[ExportEntry], *, cow: bool, readonly: bool
) -> list[str]:
    """Add the database's entries at start. Entries that cannot be added are skipped (with a
    warning each); then the loaded file is kept as ``<db>.prev`` and a fresh one written, as
    the original does, so the skipped entries are not lost."""
    skipped: list[str] = []
    for entry in entries:
        try:
            registry.add(apply_switches(entry, cow=cow, readonly=readonly), save=False)
        except RegistryError as err:
            skipped.append(f"state database: export {entry.name!r} skipped: {err}")
    if skipped and registry.db is not None:
        registry.db.keep_previous()
        skipped.append(f"state database: previous version kept as {registry.db.path}.prev")
        registry.save()
    return skipped
