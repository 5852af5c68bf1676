"""The dispatcher's keys: its keys file, read again when it changes, and changed by
``ci-ctl key add`` and ``ci-ctl key revoke``.

The keys file holds one named key a line, ``NAME ROLE SECRET`` (the role one of
runner, observer, operator; the secret 64 lowercase hex digits); blank lines and
lines starting with ``#`` are kept as they are. The dispatcher makes the file (mode
0600) when it is missing, and writes it only whole: a temporary file, then a rename,
mode 0600 kept. Whoever edits it by hand is heard within ``CHECK_INTERVAL_S``: a
``Keyring`` looks at the file's identity (inode, size, times) at most that often, when
a message is authenticated and at every heartbeat, and reads it again when it changed.

security.py's ``Key`` is one key; the ``Keyring`` is what the dispatcher's
``Authenticator`` looks keys up in, with the shared secret beside them when there is
one. docs/security.md says what each role may do.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
import time

from commit_ci.files import atomic_write
from commit_ci.security import KEY_SECRET_BYTES, ROLES, Key

log = logging.getLogger("dispatcher")

#: Longest a hand edit of the keys file goes unnoticed: a key removed from it is
#: refused from then on. A look is one stat() call.
CHECK_INTERVAL_S = 0.25
#: Who may read the keys file: its owner alone.
KEYS_FILE_MODE = 0o600
#: Largest keys file read: some 100 bytes a key, so room for tens of thousands.
MAX_KEYS_FILE_BYTES = 4 * 1024 * 1024

HEADER = """\
# commit-ci keys, read by the dispatcher (--keys-file). One key a line: NAME ROLE SECRET,
# ROLE one of runner, observer, operator; SECRET 64 hex digits. `ci-ctl key add NAME
# --role ROLE` adds one, `ci-ctl key revoke NAME` removes it; a hand edit is read within
# a second. Keep this file to its owner (mode 0600).
"""


class KeysFileError(ValueError):
    """A keys file that cannot be used; the text says which line and why."""


def parse_keys(text: str, source: str) -> tuple[dict[str, Key], list[str]]:
    """The keys in the text of a keys file, by name, and what is wrong with it, one
    sentence per bad line (such a line gives no key; a name given twice gives none)."""
    keys: dict[str, Key] = {}
    problems: list[str] = []
    twice: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = "%s line %d" % (source, number)
        if len(fields) != 3:
            problems.append("%s: want NAME ROLE SECRET, got %d field(s)" % (where, len(fields)))
            continue
        name, role, digits = fields
        try:
            if len(digits) != 2 * KEY_SECRET_BYTES or digits != digits.lower():
                raise ValueError("the secret must be %d lowercase hex digits" % (2 * KEY_SECRET_BYTES))
            key = Key(bytes.fromhex(digits), name, role)
        except ValueError as exc:
            problems.append("%s: %s" % (where, exc))
            continue
        if name in keys or name in twice:
            problems.append("%s: key %s is there twice: neither is accepted" % (where, name))
            keys.pop(name, None)
            twice.add(name)
            continue
        keys[name] = key
    return keys, problems


def key_line(key: Key) -> str:
    return "%s %s %s\n" % (key.name, key.role, key.secret.hex())


def new_key(name: str, role: str) -> Key:
    """A new key with a random secret; ValueError for a bad name or role."""
    return Key(secrets.token_bytes(KEY_SECRET_BYTES), name, role)


def _identity(status: os.stat_result) -> tuple[int, int, int, int]:
    # A rename (what editors and atomic_write do) changes the inode; an edit in place
    # changes the times, and removing a key the size.
    return status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


class Keyring:
    """The keys a dispatcher accepts: those of its keys file, read again when it
    changes, and the shared secret, if it has one (``shared``).

    ``lookup`` is what the ``Authenticator`` asks, on every message: it costs a dict
    lookup, and at most every CHECK_INTERVAL_S a stat() of the file (skipped when
    another thread is reading or writing the file just then). ``generation`` counts
    the changes seen, so that the dispatcher can tell when to look for runners whose
    key is gone. ``add`` and ``revoke`` rewrite the file (atomically, mode 0600),
    starting from what it holds now, so a hand edit made meanwhile is kept.
    """

    def __init__(self, path: str, shared: Key | None = None):
        self.path = os.path.abspath(path)
        self.shared = shared
        #: Held while the file is read or written: one at a time.
        self._file_lock = threading.Lock()
        #: Replaced whole, never changed in place: readers need no lock.
        self._keys: dict[str, Key] = {}
        self._identity: tuple[int, int, int, int] | None = None
        self._next_check = 0.0
        self.generation = 0

    # --- reading -------------------------------------------------------------------

    def load(self) -> None:
        """Read the file at start-up, making it (empty, mode 0600) if it is missing.
        KeysFileError if it cannot be read or has a bad line: better not to start
        than to start without keys the operator thinks are there."""
        with self._file_lock:
            if not os.path.exists(self.path):
                atomic_write(self.path, HEADER.encode("utf-8"), mode=KEYS_FILE_MODE)
                log.info("keys file %s made (no keys yet: ci-ctl key add)", self.path)
            try:
                text, identity = self._read()
            except OSError as exc:
                raise KeysFileError("cannot read the keys file: %s" % exc) from None
            keys, problems = parse_keys(text, self.path)
            if problems:
                raise KeysFileError("; ".join(problems))
            self._use(keys, identity)
        log.info("keys file %s: %d key(s)%s", self.path, len(keys),
                 ", and the shared secret" if self.shared is not None else "")

    def _read(self) -> tuple[str, tuple[int, int, int, int]]:
        with open(self.path, "rb") as handle:
            status = os.fstat(handle.fileno())
            if status.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("keys file %s may be read by others (mode %o): chmod 600 it", self.path,
                            stat.S_IMODE(status.st_mode))
            data = handle.read(MAX_KEYS_FILE_BYTES + 1)
        if len(data) > MAX_KEYS_FILE_BYTES:
            raise OSError("larger than %d bytes" % MAX_KEYS_FILE_BYTES)
        return data.decode("utf-8", "replace"), _identity(status)

    def _use(self, keys: dict[str, Key], identity: tuple[int, int, int, int] | None) -> None:
        changed = keys != self._keys
        self._keys, self._identity = keys, identity
        self._next_check = time.monotonic() + CHECK_INTERVAL_S
        if changed:  # after the keys: whoever sees the new generation sees them
            self.generation += 1

    def refresh(self, wait: bool = False) -> None:
        """Read the file again if it changed since it was last read. At most every
        CHECK_INTERVAL_S, and, unless ``wait``, not while another thread has the file."""
        if not wait and time.monotonic() < self._next_check:
            return
        if not self._file_lock.acquire(blocking=wait):
            return
        try:
            self._reload()
        finally:
            self._file_lock.release()

    def _reload(self) -> None:
        """(With the file lock held.) A file that is gone, or cannot be read, holds no
        keys: a key is refused rather than accepted after it may have been removed. A
        bad line gives no key, and a log line."""
        try:
            identity = _identity(os.stat(self.path))
        except OSError as exc:
            if self._identity is not None or self._keys:
                log.error("keys file %s: %s; no key is accepted until it is back", self.path, exc)
            self._use({}, None)
            return
        if identity == self._identity:
            self._next_check = time.monotonic() + CHECK_INTERVAL_S
            return
        try:
            text, identity = self._read()
        except OSError as exc:
            log.error("keys file %s cannot be read: %s; no key is accepted until it can", self.path, exc)
            self._use({}, None)
            return
        keys, problems = parse_keys(text, self.path)
        for problem in problems:
            log.error("keys file: %s; that line is ignored", problem)
        gone = sorted(set(self._keys) - set(keys))
        added = sorted(set(keys) - set(self._keys))
        log.info("keys file %s changed: %d key(s)%s%s", self.path, len(keys),
                 "; removed: %s" % " ".join(gone) if gone else "", "; added: %s" % " ".join(added) if added else "")
        self._use(keys, identity)

    def lookup(self, name: str | None) -> Key | None:
        """The key named ``name`` (None: the shared secret), or None if there is none."""
        if name is None:
            return self.shared
        self.refresh()
        return self._keys.get(name)

    def current(self) -> dict[str, Key]:
        """The named keys by name, as last read (not to be changed: it is replaced whole)."""
        return self._keys

    def keys(self) -> list[Key]:
        """The named keys, by name."""
        self.refresh()
        return [self._keys[name] for name in sorted(self._keys)]

    # --- changing ------------------------------------------------------------------

    def add(self, name: str, role: str) -> Key:
        """Make a key, write it to the file and accept it from now on. ValueError for a
        bad name or role, or a name that has a key already; OSError if the file
        cannot be written."""
        if role not in ROLES:
            raise ValueError("invalid role %r (want one of %s)" % (role, ", ".join(ROLES)))
        key = new_key(name, role)
        with self._file_lock:
            text = self._current_text()
            keys, _ = parse_keys(text, self.path)
            if name in keys or any(line.split()[:1] == [name] for line in text.splitlines()):
                raise ValueError("a key named %s exists already (revoke it first)" % name)
            if text and not text.endswith("\n"):
                text += "\n"
            self._write(text + key_line(key))
        return key

    def revoke(self, name: str) -> Key | None:
        """Remove the key ``name`` from the file and refuse it from now on. Returns the key
        it was (None if its only line was a bad one); KeyError if the file has no line
        for it; OSError if the file cannot be written."""
        with self._file_lock:
            text = self._current_text()
            keys, _ = parse_keys(text, self.path)
            lines = text.splitlines(keepends=True)
            kept = [line for line in lines if line.split()[:1] != [name]]
            if len(kept) == len(lines):
                raise KeyError(name)
            self._write("".join(kept))
        return keys.get(name)

    def _current_text(self) -> str:
        """(With the file lock held.) What the file holds now, hand edits included."""
        try:
            text, _ = self._read()
        except FileNotFoundError:
            return HEADER
        return text

    def _write(self, text: str) -> None:
        """(With the file lock held.) Write the file whole and use what it now holds."""
        atomic_write(self.path, text.encode("utf-8"), mode=KEYS_FILE_MODE)
        keys, problems = parse_keys(text, self.path)
        for problem in problems:
            log.error("keys file: %s; that line is ignored", problem)
        self._use(keys, _identity(os.stat(self.path)))
