"""``.commit-ci.toml``: what a repository may say about how its commits are tested.

The file is optional; a standard Python project needs none (environments.py finds
its dependencies where projects declare them). Every key is optional too:

    python = "3.12"                      # the interpreter, major.minor
    requirements = ["requirements/ci.txt"]     # installed into the environment
    dependency-files = ["environment.lock"]    # only make a new environment when they change
    install = true                       # the automatic install of the project and its test dependencies
    setup = ["python -m pip install -e vendor/tool"]   # run once, when the environment is built
    test = "python -m pytest -x tests"   # the test command (a shell command, in the clone)
    timeout = 900                        # seconds the tests may take
    shard = false                        # never split the tests over idle runners (sharding.py; default true)

    [env]                                # variables for the setup commands and the tests
    DJANGO_SETTINGS_MODULE = "site.settings"

The file comes from a commit, so it is hostile input: read with a size cap, every key
and value checked (type, length, characters; paths relative and inside the clone),
and an unknown key is an error, so that a typo does not pass silently. A file that is
wrong is the commit's own failure (``setup failed: .commit-ci.toml: ...``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CONFIG_NAME = ".commit-ci.toml"
#: Largest config file read.
MAX_CONFIG_BYTES = 64 * 1024
#: Most entries in a list or table, and longest command, path or value.
MAX_ITEMS = 64
MAX_TEXT_CHARS = 4096
#: Longest test timeout a commit may ask for.
MAX_TIMEOUT_S = 24 * 3600.0

_PYTHON_VERSION = re.compile(r"3\.\d{1,2}\Z")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
#: Variables the runner sets for a job itself; a commit may not replace them.
RESERVED_VARIABLES = frozenset({"PATH", "VIRTUAL_ENV", "PYTHONHOME", "CI_COMMIT", "CI_ATTEMPT", "CI_JUNIT_XML",
                                "CI_SHARD", "CI_SHARD_PLAN"})


class ConfigError(ValueError):
    """The config file is not one this version understands; the text says where."""


@dataclass(frozen=True)
class ProjectConfig:
    """What ``.commit-ci.toml`` says, checked; the defaults when there is none."""

    python: str | None = None  # "3.12": the interpreter the commit asks for
    requirements: tuple[str, ...] = ()  # requirement files to install (paths in the clone)
    dependency_files: tuple[str, ...] = ()  # files that only key the environment
    install: bool = True  # install the project and its test dependencies automatically
    setup: tuple[str, ...] = ()  # shell commands run once in a new environment
    test: str | None = None  # the test command, or None for pytest
    timeout: float | None = None  # seconds the tests may take
    env: dict[str, str] = field(default_factory=dict)
    present: bool = False  # the file exists
    shard: bool = True  # its tests may be split over idle runners (sharding.py)

    @property
    def wants_environment(self) -> bool:
        """Whether the file asks for an environment of its own, whatever the project's packaging."""
        return bool(self.python or self.requirements or self.dependency_files or self.setup)


def read_config(clone: str) -> ProjectConfig:
    """The config of the commit checked out in ``clone``; ConfigError if it is wrong."""
    path = os.path.join(clone, CONFIG_NAME)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return ProjectConfig()
    except OSError as exc:
        raise ConfigError("%s cannot be read: %s" % (CONFIG_NAME, exc.strerror)) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError("%s is larger than %d bytes" % (CONFIG_NAME, MAX_CONFIG_BYTES))
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("%s is not valid TOML: %s" % (CONFIG_NAME, _one_line(str(exc)))) from None
    return parse_config(document, clone)


def parse_config(document: dict, clone: str) -> ProjectConfig:
    """Check a parsed config (see the module docstring) against the clone it came from."""
    known = {"python", "requirements", "dependency-files", "install", "setup", "test", "timeout", "env", "shard"}
    unknown = sorted(set(document) - known)
    if unknown:
        raise ConfigError("%s: unknown key %r (known: %s)" % (CONFIG_NAME, unknown[0][:40], ", ".join(sorted(known))))
    python = document.get("python")
    if python is not None and (not isinstance(python, str) or not _PYTHON_VERSION.match(python)):
        raise ConfigError('%s: python must be a version like "3.12"' % CONFIG_NAME)
    install = document.get("install", True)
    if not isinstance(install, bool):
        raise ConfigError("%s: install must be true or false" % CONFIG_NAME)
    shard = document.get("shard", True)
    if not isinstance(shard, bool):
        raise ConfigError("%s: shard must be true or false" % CONFIG_NAME)
    timeout = document.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= MAX_TIMEOUT_S):
        raise ConfigError("%s: timeout must be a number of seconds from 1 to %d" % (CONFIG_NAME, MAX_TIMEOUT_S))
    test = document.get("test")
    if test is not None:
        test = _text(test, "test")
    return ProjectConfig(
        python=python,
        requirements=tuple(_path(item, "requirements", clone) for item in _list(document, "requirements")),
        dependency_files=tuple(_path(item, "dependency-files", clone) for item in _list(document, "dependency-files")),
        install=install,
        setup=tuple(_text(item, "setup") for item in _list(document, "setup")),
        test=test,
        timeout=float(timeout) if timeout is not None else None,
        env=_variables(document.get("env", {})),
        present=True,
        shard=shard,
    )


def _list(document: dict, key: str) -> list:
    value = document.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise ConfigError("%s: %s must be a list of at most %d strings" % (CONFIG_NAME, key, MAX_ITEMS))
    return value


def _text(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT_CHARS or "\0" in value:
        raise ConfigError("%s: %s must be a non-empty string of at most %d characters" % (CONFIG_NAME, key,
                                                                                          MAX_TEXT_CHARS))
    return value


def _path(value: object, key: str, clone: str) -> str:
    """A file in the clone, as a relative path with forward slashes."""
    text = _text(value, key)
    parts = text.replace("\\", "/").split("/")
    if text.startswith("/") or ".." in parts or any(part in ("", ".") for part in parts[:-1]) or not parts[-1]:
        raise ConfigError("%s: %s: %r is not a relative path inside the repository" % (CONFIG_NAME, key, text[:80]))
    relative = "/".join(parts)
    full = os.path.realpath(os.path.join(clone, relative))
    if os.path.commonpath([full, os.path.realpath(clone)]) != os.path.realpath(clone):
        raise ConfigError("%s: %s: %r leads out of the repository" % (CONFIG_NAME, key, text[:80]))
    if not os.path.isfile(full):
        raise ConfigError("%s: %s: %r is not a file in the repository" % (CONFIG_NAME, key, text[:80]))
    return relative


def _variables(table: object) -> dict[str, str]:
    if not isinstance(table, dict) or len(table) > MAX_ITEMS:
        raise ConfigError("%s: env must be a table of at most %d variables" % (CONFIG_NAME, MAX_ITEMS))
    variables = {}
    for name, value in table.items():
        if not _VARIABLE_NAME.match(name):
            raise ConfigError("%s: env: %r is not a variable name" % (CONFIG_NAME, name[:40]))
        if name in RESERVED_VARIABLES:
            raise ConfigError("%s: env: %s is set by the runner" % (CONFIG_NAME, name))
        if not isinstance(value, str) or len(value) > MAX_TEXT_CHARS or "\0" in value:
            raise ConfigError("%s: env: %s must be a string of at most %d characters" % (CONFIG_NAME, name,
                                                                                         MAX_TEXT_CHARS))
        variables[name] = value
    return variables


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]
