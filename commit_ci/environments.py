"""Per-commit environments: the virtualenv a commit's tests run in, as its own files declare it.

A commit that is a Python project (pyproject.toml with a ``[project]`` or
``[build-system]`` table, setup.py, or setup.cfg with a name) is tested the way its
authors test it: in a virtualenv of its own with the project and its test
dependencies installed, then pytest. Nothing needs configuring; the test
dependencies are found where projects declare them:

* dependency groups (PEP 735) named test, tests, testing or dev;
* extras (``[project.optional-dependencies]``, setup.cfg's ``extras_require``) with
  those names -- for a setup.py whose extras cannot be read without running it, all
  four are asked for (the installers only warn about an extra a project lacks);
* test requirement files: requirements-test*.txt, requirements_test*.txt,
  requirements/test*.txt, test-requirements.txt, test_requirements.txt;
* pytest itself.

``.commit-ci.toml`` (project_config.py) can add to that or replace it. A repository
that is no Python project and has no config asking for an environment runs as before,
with the runner's own interpreter.

Environments are cached. Each is keyed by the interpreter (its path and full version),
this module's way of building them (``ENV_FORMAT``), the installer, what pyproject.toml
declares of dependencies (its dependencies, extras, groups, Python versions; the build
system too when the backend computes the dependencies), and the contents of every
other file that declares them: setup.py, setup.cfg, requirement and constraint files
(and the files they include), lock files, and the config file. A commit that changes none of them reuses the environment; the
project itself is installed again for every commit, without its dependencies
(``--no-deps``, a few hundred milliseconds with uv): its code, and often its version
(hatch-vcs, setuptools-scm), change with every commit, and an editable install would
not survive the clean checkout, which deletes the files a build generates.

The cache is a folder shared by the runners of one user on one machine (for a root
runner, of one job user: the job user builds the environments, as every step a commit
controls runs as that user, and owns them and the installers' download cache kept
beside them, ``installer-cache/``). An
environment is built aside, in a folder named after its key and a random suffix, and
put in place only when complete, by pointing the symlink named after its key at it
(an atomic rename): a half-built one is never used, and a virtualenv must stay where it
was built (its scripts name their interpreter by path). A lock file per key keeps two
runners from building the same environment at once, and one in use from being evicted.
The cache holds at most ``max_environments``; past that the least recently used that
nobody uses go first.

uv builds environments when it is installed (``uv venv``, ``uv pip install``), pip
otherwise (``python -m venv``, and the runner's pip with ``--python``). Both honour the
machine's package index settings: pip reads its own (pip.conf, ``PIP_INDEX_URL``...);
for uv, unless ``UV_*`` index variables are set, the index, extra indexes, find-links
and constraints of pip's configuration are passed on. No index is ever hard-coded.

A failed install is the commit's failure (``setup failed: ...``), unless its output
shows that the package index could not be reached: that is the infrastructure's,
and the job is retried (``SetupFailure.infrastructure``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import functools
import glob
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from typing import Callable

from commit_ci.isolation import Launch, chown_tree
from commit_ci.processes import TIMEOUT, StepEnd, run_step
from commit_ci.project_config import CONFIG_NAME, ProjectConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

log = logging.getLogger("runner")

#: How a setup step is started, given the folders it writes besides the clone and the
#: job's own (isolation.Isolation.launch, bound to the clone).
Launcher = Callable[[tuple[str, ...]], Launch]

#: Raise when the way an environment is built changes: environments built the old
#: way are then not reused. 2: built by the job user, with the cache's own installer cache.
ENV_FORMAT = 2
#: Environments kept in the cache by default.
DEFAULT_MAX_ENVIRONMENTS = 8
#: Longest that building an environment, or installing the project, may take.
DEFAULT_SETUP_TIMEOUT_S = 20 * 60.0
#: Longest a runner waits for another to finish building the environment it needs.
LOCK_WAIT_S = DEFAULT_SETUP_TIMEOUT_S + 60.0
#: Longest a probe of an interpreter or an installer may take.
PROBE_TIMEOUT_S = 20.0
#: Minor versions looked for on PATH as python3.N.
CANDIDATE_MINORS = range(8, 16)
#: The names under which projects declare their test dependencies (groups and extras).
TEST_NAMES = ("test", "tests", "testing", "dev")
#: Test requirement files, relative to the repository.
TEST_REQUIREMENT_PATTERNS = ("requirements-test*.txt", "requirements_test*.txt", "requirements/test*.txt",
                             "test-requirements.txt", "test_requirements.txt")
#: Files whose contents key an environment, besides the ones the config names.
KEY_PATTERNS = ("pyproject.toml", "setup.py", "setup.cfg", "requirements*.txt", "*requirements.txt",
                "requirements/*.txt", "constraints*.txt", "uv.lock", "poetry.lock", "pdm.lock", "Pipfile",
                "Pipfile.lock", CONFIG_NAME)
#: Most requirement files followed through ``-r``/``-c`` lines, and most bytes read of each key file.
MAX_KEY_FILES = 256
MAX_KEY_FILE_BYTES = 4 * 1024 * 1024
#: Lines of installer output that mean the package index (or another server a build
#: needs) could not be reached: then a failed install is the infrastructure's fault.
UNREACHABLE = re.compile(
    r"Failed to establish a new connection|connection broken by|Max retries exceeded|Read timed out"
    r"|Temporary failure in name resolution|Name or service not known|Network is unreachable"
    r"|Could not fetch URL|ProxyError|tcp connect error|dns error|error sending request for url"
    r"|Connection refused|Connection reset by peer|failed to lookup address|Request failed after \d+ retries"
    r"|Could not resolve host|Failed to connect to", re.IGNORECASE)


class SetupFailure(Exception):
    """Building the environment, or installing the project, failed; ``str()`` says
    what, in one line, and the output is in the setup log. ``infrastructure``: the
    package index could not be reached, or the runner lacks a tool (retry elsewhere)."""

    def __init__(self, reason: str, infrastructure: bool = False):
        super().__init__(reason)
        self.infrastructure = infrastructure


# --- interpreters ----------------------------------------------------------------------


@dataclass(frozen=True)
class Interpreter:
    """A Python this runner can build environments with."""

    path: str  # the executable, its real path (a base interpreter, never a virtualenv's)
    version: str  # "3.11"
    full_version: str  # "3.11.7"


_PROBE = ("import os, platform, sys; "
          "print(os.path.realpath(getattr(sys, '_base_executable', None) or sys.executable), "
          "'%d.%d' % sys.version_info[:2], platform.python_version())")


def probe_interpreter(command: str) -> Interpreter | None:
    """The interpreter ``command`` runs, or None if it is no working Python 3."""
    try:
        done = subprocess.run([command, "-I", "-c", _PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    parts = done.stdout.split()
    if done.returncode != 0 or len(parts) != 3 or not re.match(r"3\.\d+\Z", parts[1]):
        return None
    return Interpreter(parts[0], parts[1], parts[2])


def find_interpreters(given: list[str] = ()) -> dict[str, Interpreter]:
    """The Pythons this runner offers, by version ("3.12"): those ``given`` (``--python``),
    then the runner's own, then each ``python3.N`` on PATH; the first found of a version wins."""
    found: dict[str, Interpreter] = {}
    candidates = [*given, sys.executable, *filter(None, (shutil.which("python3.%d" % minor) for minor in CANDIDATE_MINORS))]
    # Probed all at once: each is an interpreter starting (a pyenv shim is a shell script too).
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        probed = list(pool.map(probe_interpreter, candidates))
    for command, interpreter in zip(candidates, probed):
        if interpreter is None:
            if command in given:
                raise ValueError("%s is not a Python 3 interpreter" % command)
            continue
        found.setdefault(interpreter.version, interpreter)
    return found


# --- installers -------------------------------------------------------------------------


class Installer:
    """Makes virtualenvs and installs into them: uv, or pip (see the module docstring)."""

    def __init__(self, name: str, uv: str | None = None, uv_index_options: tuple[str, ...] = ()):
        self.name = name
        self.uv = uv
        self.uv_index_options = uv_index_options

    @classmethod
    def find(cls, choice: str = "auto") -> "Installer":
        """``choice``: "uv", "pip" or "auto" (uv if there is one). ValueError if the one
        asked for cannot be used."""
        uv = None
        if choice in ("auto", "uv"):
            uv = _find_uv()
            if uv is None and choice == "uv":
                raise ValueError("uv is not installed (pip install uv), or use --installer pip")
        if uv is not None:
            return cls("uv", uv, _uv_index_options())
        version = _pip_version()
        if version is None or version < (22, 3):
            raise ValueError("neither uv nor pip 22.3 or later is installed for %s: environments cannot be built"
                             % sys.executable)
        return cls("pip")

    @property
    def description(self) -> str:
        return "uv (%s)" % self.uv if self.name == "uv" else "pip (%s -m pip)" % sys.executable

    def create_command(self, interpreter: Interpreter, path: str) -> list[str]:
        if self.name == "uv":
            return [self.uv, "venv", "--quiet", "--python", interpreter.path, path]
        return [interpreter.path, "-m", "venv", "--without-pip", path]

    def install_command(self, python: str, arguments: list[str]) -> list[str]:
        if self.name == "uv":
            return [self.uv, "pip", "install", "--python", python, *self.uv_index_options, *arguments]
        return [sys.executable, "-m", "pip", "--python", python, "install", "--disable-pip-version-check",
                "--no-input", *arguments]

    def reinstall_arguments(self) -> list[str]:
        """What installs a package again though its version did not change."""
        return ["--reinstall"] if self.name == "uv" else ["--force-reinstall"]


def _find_uv() -> str | None:
    beside = os.path.join(sysconfig.get_path("scripts"), "uv")
    for candidate in (beside, shutil.which("uv")):
        if candidate and os.access(candidate, os.X_OK):
            try:
                done = subprocess.run([candidate, "--version"], capture_output=True, timeout=PROBE_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if done.returncode == 0:
                return candidate
    return None


def _pip_version() -> tuple[int, int] | None:
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.match(r"pip (\d+)\.(\d+)", done.stdout)
    return (int(match.group(1)), int(match.group(2))) if done.returncode == 0 and match else None


#: uv's own index settings: when one is set, pip's are not passed on.
UV_INDEX_VARIABLES = ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX", "UV_EXTRA_INDEX_URL", "UV_FIND_LINKS",
                      "UV_CONSTRAINT", "UV_NO_INDEX")


def _uv_index_options() -> tuple[str, ...]:
    """pip's index settings (``pip config list``: pip.conf and PIP_* variables) as uv
    options, so that uv looks where pip would. Local folders that do not exist are
    left out, as pip leaves them out (with a warning) where uv would fail."""
    if any(os.environ.get(name) for name in UV_INDEX_VARIABLES):
        return ()
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    settings: dict[str, str] = {}
    for line in done.stdout.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            # "global.index-url", ":env:.index-url": the variable wins, as it does for pip.
            key = name.rsplit(".", 1)[-1]
            if name.startswith(":env:") or key not in settings:
                settings[key] = value.strip().strip("'\"")
    options: list[str] = []
    for key, flag in (("index-url", "--index-url"), ("extra-index-url", "--extra-index-url"),
                      ("find-links", "--find-links"), ("constraint", "--constraint")):
        for location in settings.get(key, "").split():
            if _usable_location(location):
                options += [flag, location]
    if "--extra-index-url" in options:
        # pip takes the best version any index has; uv by default only looks in the
        # first index that has the package at all, which can leave it old versions.
        options += ["--index-strategy", "unsafe-best-match"]
    return tuple(options)


def _usable_location(location: str) -> bool:
    if location.startswith("file://"):
        return os.path.exists(location[len("file://"):])
    if "://" in location:
        return True
    return os.path.exists(location)


# --- what a commit declares ----------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """How to build a commit's environment, and its key."""

    interpreter: Interpreter
    project: bool  # the repository is a Python project: installed, and again for every commit
    extras: tuple[str, ...]  # asked for when the project is installed
    requirements: tuple[str, ...]  # requirement strings (dependency groups, pytest)
    requirement_files: tuple[str, ...]  # installed with -r, relative to the repository
    setup: tuple[str, ...]  # the config's setup commands
    key: str


def normalize(name: str) -> str:
    """A distribution, extra or group name as PEP 503 and PEP 735 compare them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def plan(clone: str, config: ProjectConfig, interpreter: Interpreter, installer: Installer) -> Recipe | None:
    """The environment the commit checked out in ``clone`` asks for, or None when it
    asks for none (no Python project, no config asking for one). ``SetupFailure`` when
    what it declares cannot be read."""
    pyproject = _read_pyproject(clone)
    project = _is_project(clone, pyproject)
    if not project and not config.wants_environment:
        return None
    install = config.install
    extras: list[str] = []
    requirements: list[str] = []
    files: list[str] = list(config.requirements)
    if install:
        if project:
            extras = _test_extras(clone, pyproject)
        requirements += _test_groups(pyproject)
        files += [path for path in _test_requirement_files(clone) if path not in files]
    if install or config.test is None:
        requirements.append("pytest")  # pytest itself: what a test command most likely runs
    if config.setup:
        requirements.append("pip")  # for the setup commands
    for requirement in requirements:
        if requirement.startswith("-"):
            raise SetupFailure("a dependency group lists %r, which is an option, not a requirement" % requirement[:80])
    key_files = [path for path in _key_files(clone, [*files, *config.dependency_files]) if path != "pyproject.toml"]
    digest = hashlib.sha256()
    identity = {"format": ENV_FORMAT, "installer": installer.name, "interpreter": dataclasses.asdict(interpreter),
                "project": project and install, "extras": extras, "requirements": requirements, "files": files,
                "setup": list(config.setup), "pyproject": _declarations(pyproject)}
    digest.update(json.dumps(identity, sort_keys=True).encode())
    for relative in key_files:
        digest.update(b"\0%s\0" % relative.encode())
        with open(os.path.join(clone, relative), "rb") as handle:
            digest.update(handle.read(MAX_KEY_FILE_BYTES))
    return Recipe(interpreter, project and install, tuple(extras), tuple(requirements), tuple(files),
                  tuple(config.setup), digest.hexdigest()[:32])


def _read_pyproject(clone: str) -> dict:
    path = os.path.join(clone, "pyproject.toml")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SetupFailure("pyproject.toml cannot be read: %s" % exc.strerror) from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise SetupFailure("pyproject.toml is larger than %d bytes" % MAX_KEY_FILE_BYTES)
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SetupFailure("pyproject.toml is not valid TOML: %s" % " ".join(str(exc).split())[:200]) from None
    return document


#: What of a pyproject.toml can change what its environment holds: the rest (its
#: version, description, classifiers, tools' settings...) is the project's, which is
#: installed again for every commit, so a change there does not need a new environment.
PROJECT_DECLARATIONS = ("name", "dependencies", "optional-dependencies", "requires-python", "dynamic")
TOOL_DECLARATIONS = ("poetry", "pdm", "uv")


def _declarations(pyproject: dict) -> dict:
    """The parts of ``pyproject`` that declare dependencies (see PROJECT_DECLARATIONS).
    When the build backend computes them (``dynamic``), its settings count too."""
    project = pyproject.get("project") if isinstance(pyproject.get("project"), dict) else {}
    tools = pyproject.get("tool") if isinstance(pyproject.get("tool"), dict) else {}
    declared = {
        "project": {key: project[key] for key in PROJECT_DECLARATIONS if key in project},
        "dependency-groups": pyproject.get("dependency-groups"),
        "tool": {name: tools[name] for name in TOOL_DECLARATIONS if name in tools},
    }
    dynamic = project.get("dynamic") or []
    if not project or "dependencies" in dynamic or "optional-dependencies" in dynamic:
        declared["build-system"] = pyproject.get("build-system")
        declared["tool"]["setuptools"] = (tools.get("setuptools") or {}).get("dynamic") \
            if isinstance(tools.get("setuptools"), dict) else None
        declared["tool"]["hatch"] = tools.get("hatch")
    return declared


def _is_project(clone: str, pyproject: dict) -> bool:
    if "project" in pyproject or "build-system" in pyproject:
        return True
    if os.path.isfile(os.path.join(clone, "setup.py")):
        return True
    setup_cfg = _read_setup_cfg(clone)
    return setup_cfg is not None and setup_cfg.has_option("metadata", "name")


def _read_setup_cfg(clone: str):
    import configparser

    path = os.path.join(clone, "setup.cfg")
    if not os.path.isfile(path):
        return None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_string(handle.read(MAX_KEY_FILE_BYTES))
    except (OSError, UnicodeDecodeError, configparser.Error):
        return None  # setuptools will say what is wrong with it, at the install
    return parser


def _test_extras(clone: str, pyproject: dict) -> list[str]:
    project = pyproject.get("project")
    if isinstance(project, dict) and "optional-dependencies" not in (project.get("dynamic") or []):
        declared = project.get("optional-dependencies") or {}
        names = [name for name in declared if isinstance(name, str)]
    else:
        setup_cfg = _read_setup_cfg(clone)
        if setup_cfg is not None and setup_cfg.has_section("options.extras_require"):
            names = list(setup_cfg.options("options.extras_require"))
        elif isinstance(project, dict) or not os.path.isfile(os.path.join(clone, "setup.py")):
            names = []  # declared statically, with none of them
        else:
            return list(TEST_NAMES)  # a setup.py: only running it would tell
    wanted = {normalize(name) for name in TEST_NAMES}
    return sorted(name for name in names if normalize(name) in wanted)


def _test_groups(pyproject: dict) -> list[str]:
    """The requirements of the dependency groups named like test groups, includes expanded."""
    groups = pyproject.get("dependency-groups")
    if not isinstance(groups, dict):
        return []
    by_name = {normalize(name): entries for name, entries in groups.items() if isinstance(name, str)}

    def expand(name: str, seen: tuple[str, ...]) -> list[str]:
        if name in seen:
            raise SetupFailure("dependency group %r includes itself" % name)
        entries = by_name.get(name)
        if not isinstance(entries, list):
            raise SetupFailure("dependency group %r is not a list" % name)
        found = []
        for entry in entries:
            if isinstance(entry, str):
                found.append(entry)
            elif isinstance(entry, dict) and isinstance(entry.get("include-group"), str):
                found += expand(normalize(entry["include-group"]), seen + (name,))
            else:
                raise SetupFailure("dependency group %r has an entry that is neither a requirement nor an include"
                                   % name)
        return found

    requirements: list[str] = []
    for name in TEST_NAMES:
        if name in by_name:
            requirements += [entry for entry in expand(name, ()) if entry not in requirements]
    return requirements


def _test_requirement_files(clone: str) -> list[str]:
    found = []
    for pattern in TEST_REQUIREMENT_PATTERNS:
        for path in sorted(glob.glob(os.path.join(clone, pattern))):
            if os.path.isfile(path):
                found.append(os.path.relpath(path, clone))
    return found


def _key_files(clone: str, named: list[str]) -> list[str]:
    """Every file whose contents key the environment, relative to ``clone``, sorted:
    the usual ones, those ``named``, and what requirement files include (-r, -c)."""
    files = set(named)
    for pattern in KEY_PATTERNS:
        files.update(os.path.relpath(path, clone) for path in glob.glob(os.path.join(clone, pattern))
                     if os.path.isfile(path))
    todo = [path for path in files if path.endswith(".txt")]
    while todo and len(files) < MAX_KEY_FILES:
        included = _included_files(clone, todo.pop())
        todo += [path for path in included if path not in files]
        files.update(included)
    return sorted(files)[:MAX_KEY_FILES]


def _included_files(clone: str, relative: str) -> list[str]:
    """The files a requirement file includes with -r/-c, when they are in the repository."""
    folder = os.path.dirname(os.path.join(clone, relative))
    root = os.path.realpath(clone)
    found = []
    try:
        with open(os.path.join(clone, relative), encoding="utf-8", errors="replace") as handle:
            lines = handle.read(MAX_KEY_FILE_BYTES).splitlines()
    except OSError:
        return []
    for line in lines:
        match = re.match(r"\s*(?:-r|-c|--requirement|--constraint)[\s=]+(\S+)", line)
        if match:
            path = os.path.realpath(os.path.join(folder, match.group(1)))
            if path.startswith(root + os.sep) and os.path.isfile(path):
                found.append(os.path.relpath(path, root))
    return found


# --- the cache -----------------------------------------------------------------------


@dataclass(frozen=True)
class Environment:
    """A complete environment in the cache."""

    key: str
    path: str  # its folder, where it was built
    built: bool  # built for this job (a cache miss), or reused

    @property
    def python(self) -> str:
        return os.path.join(self.path, "bin", "python")

    def variables(self, base: dict) -> dict:
        """``base`` with the environment activated: its bin folder first on PATH."""
        env = {name: value for name, value in base.items() if name not in ("PYTHONHOME", "__PYVENV_LAUNCHER__")}
        env["VIRTUAL_ENV"] = self.path
        env["PATH"] = os.path.join(self.path, "bin") + os.pathsep + base.get("PATH", os.defpath)
        return env


def default_cache_dir() -> str:
    """Where environments are kept: the user's cache folder; for root, whose jobs run
    as another user, a folder that user can reach."""
    if os.geteuid() == 0:
        return "/var/cache/commit-ci/environments"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "commit-ci", "environments")


class EnvironmentCache:
    """The environments of one folder, shared by the runners that use it (see the
    module docstring). One instance per runner; its worker thread is its only user."""

    def __init__(self, folder: str, installer: Installer, max_environments: int = DEFAULT_MAX_ENVIRONMENTS,
                 setup_timeout: float = DEFAULT_SETUP_TIMEOUT_S, owner: tuple[int, int] | None = None):
        """``owner``: the (uid, gid) of the job user, who builds environments when it is
        not the runner's (isolation.py): it gets the folders a build writes."""
        self.folder = folder
        self.installer = installer
        self.max_environments = max(1, max_environments)
        self.setup_timeout = setup_timeout
        self.owner = owner
        os.makedirs(folder, mode=0o755, exist_ok=True)
        #: The installers' download cache, beside the environments (on the same file
        #: system, so that uv links files from it), written by the builds.
        self.installer_cache = os.path.join(folder, "installer-cache")
        os.makedirs(self.installer_cache, mode=0o755, exist_ok=True)
        self._give(self.installer_cache)
        #: The lock held on the environment in use (shared), released by ``release``.
        self._held: int | None = None

    def _give(self, folder: str) -> None:
        """Make ``folder`` (and all in it, when it was someone else's: a cache a runner
        with another job user filled) the job user's."""
        if self.owner is None or os.stat(folder).st_uid == self.owner[0]:
            return
        os.chown(folder, *self.owner)
        chown_tree(folder, *self.owner)

    def build_variables(self, env: dict) -> dict:
        """``env`` for a build step: the installers' cache is the cache's own (the job's
        HOME is emptied after every job)."""
        return dict(env, UV_CACHE_DIR=os.path.join(self.installer_cache, "uv"),
                    PIP_CACHE_DIR=os.path.join(self.installer_cache, "pip"))

    def obtain(self, recipe: Recipe, clone: str, env: dict, log_path: str, stop: threading.Event,
               launcher: Launcher = lambda writable: Launch()) -> Environment:
        """The environment for ``recipe``, built (with its output in ``log_path``, each
        step started as ``launcher`` says) if the cache does not have it, and held until
        ``release()``: another runner does not evict it meanwhile. SetupFailure if it
        cannot be built."""
        self.release()
        lock = os.open(self._link(recipe.key) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            built = False
            # Shared: several runners may use one environment at once.
            folder = self._complete(recipe.key) if _try_lock(lock, fcntl.LOCK_SH) else None
            if folder is None:
                # Not there, or another runner is building it: build it, or wait for that.
                self._wait_for_lock(lock, fcntl.LOCK_EX, stop)
                folder = self._complete(recipe.key)
                if folder is None:
                    folder = self._build(recipe, clone, env, log_path, stop, launcher)
                    built = True
                fcntl.flock(lock, fcntl.LOCK_SH)  # from exclusive: others may use it now
        except BaseException:
            os.close(lock)
            raise
        self._held = lock
        _touch(self._link(recipe.key) + ".used")
        if built:
            self._evict(keep=recipe.key)
        return Environment(recipe.key, folder, built)

    def release(self) -> None:
        """Stop holding the environment obtained last."""
        if self._held is not None:
            os.close(self._held)
            self._held = None

    def _link(self, key: str) -> str:
        return os.path.join(self.folder, key)

    @staticmethod
    def _wait_for_lock(fd: int, operation: int, stop: threading.Event) -> None:
        """Take a lock another runner may hold while it builds (seconds to minutes).
        flock has no timeout, so it is tried every 0.1 s, within LOCK_WAIT_S."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while not _try_lock(fd, operation):
            if time.monotonic() > deadline:
                raise SetupFailure("another runner has been building this environment for more than %.0f s"
                                   % LOCK_WAIT_S, infrastructure=True)
            if stop.wait(0.1):
                raise SetupFailure("runner stopping", infrastructure=True)

    def _complete(self, key: str) -> str | None:
        """The folder of the complete environment ``key``, if the cache has one."""
        target = os.path.realpath(self._link(key))
        if os.path.islink(self._link(key)) and os.path.isfile(os.path.join(target, "bin", "python")):
            return target
        return None

    def _build(self, recipe: Recipe, clone: str, env: dict, log_path: str, stop: threading.Event,
               launcher: Launcher) -> str:
        """Build ``recipe``'s environment aside, then put it in place (exclusive lock held)."""
        for stale in glob.glob(self._link(recipe.key) + "-*"):
            shutil.rmtree(stale, ignore_errors=True)  # half-built by a runner that died (none is complete)
        name = "%s-%s" % (recipe.key, secrets.token_hex(4))
        folder = os.path.join(self.folder, name)
        started = time.monotonic()
        note(log_path, "building environment %s with %s, Python %s" % (
            recipe.key[:12], self.installer.name, recipe.interpreter.full_version), append=False)
        os.mkdir(folder, 0o755)
        self._give(folder)
        step = functools.partial(self._step, clone=clone, log_path=log_path, stop=stop,
                                 launch=lambda: launcher((folder, self.installer_cache)))
        try:
            step(self.installer.create_command(recipe.interpreter, folder), env=self.build_variables(env),
                 what="could not create the virtualenv")
            environment = Environment(recipe.key, folder, True)
            active = self.build_variables(environment.variables(env))
            arguments = [*recipe.requirements]
            for path in recipe.requirement_files:
                arguments += ["-r", os.path.join(clone, path)]
            if recipe.project:
                arguments.append(clone + ("[%s]" % ",".join(recipe.extras) if recipe.extras else ""))
            if arguments:
                step(self.installer.install_command(environment.python, arguments), env=active,
                     what="could not install the dependencies")
            for command in recipe.setup:
                note(log_path, "setup: %s" % command)
                step(command, env=active, what="setup command failed: %s" % command[:200])
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        temporary = self._link(recipe.key) + ".new"
        if os.path.lexists(temporary):
            os.unlink(temporary)
        os.symlink(name, temporary)
        os.replace(temporary, self._link(recipe.key))
        log.info("environment %s built in %.1f s (%s, Python %s)", recipe.key[:12], time.monotonic() - started,
                 self.installer.name, recipe.interpreter.full_version)
        return folder

    def install_project(self, environment: Environment, clone: str, env: dict, log_path: str,
                        stop: threading.Event, launcher: Launcher = lambda writable: Launch()) -> None:
        """Install the commit's project into its environment again, without its
        dependencies (they are the environment's): the project's code and version are
        this commit's."""
        note(log_path, "installing the project at this commit")
        command = self.installer.install_command(
            environment.python, ["--no-deps", *self.installer.reinstall_arguments(), clone])
        self._step(command, clone=clone, env=self.build_variables(environment.variables(env)), log_path=log_path,
                   stop=stop, what="could not install the project",
                   launch=lambda: launcher((environment.path, self.installer_cache)))

    def _step(self, command, *, clone: str, env: dict, log_path: str, stop: threading.Event, what: str,
              launch: Callable[[], Launch]) -> StepEnd:
        try:
            ended = run_step(command, cwd=clone, env=env, timeout=self.setup_timeout, stop=stop,
                             output_path=log_path, append=True, launch=launch())
        except OSError as exc:
            raise SetupFailure("%s: %s" % (what, exc), infrastructure=True) from None
        if ended.killed == TIMEOUT:
            raise SetupFailure("%s: took more than %g s" % (what, self.setup_timeout))
        if ended.killed:
            raise SetupFailure("runner stopping", infrastructure=True)
        if ended.status != 0:
            unreachable = bool(UNREACHABLE.search(ended.output.decode("utf-8", "replace")))
            raise SetupFailure("%s: %s" % ("package index unreachable" if unreachable else what, ended.last_line()),
                               infrastructure=unreachable)
        return ended

    def _evict(self, keep: str) -> None:
        """Remove the least recently used complete environments past the limit, but
        ``keep`` and any another runner holds."""
        links = [path for path in glob.glob(os.path.join(self.folder, "*"))
                 if os.path.islink(path) and re.fullmatch(r"[0-9a-f]{32}", os.path.basename(path))]
        if len(links) <= self.max_environments:
            return

        def last_used(path: str) -> float:
            try:
                return os.path.getmtime(path + ".used")
            except OSError:
                return 0.0

        for link in sorted(links, key=last_used)[: len(links) - self.max_environments]:
            key = os.path.basename(link)
            if key == keep:
                continue
            # The lock file stays: a runner waiting on it must find the same one.
            lock = os.open(link + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not _try_lock(lock, fcntl.LOCK_EX):
                    continue  # in use
                target = os.path.realpath(link)
                os.unlink(link)
                shutil.rmtree(target, ignore_errors=True)
                log.info("environment %s evicted (least recently used of %d)", key[:12], len(links))
            finally:
                os.close(lock)


def _try_lock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _touch(path: str) -> None:
    with open(path, "a"):
        pass
    os.utime(path, None)


def note(log_path: str, line: str, append: bool = True) -> None:
    """A line of the runner's own in a setup log, among the installers' output."""
    with open(log_path, "a" if append else "w", encoding="utf-8") as handle:
        handle.write("[runner: %s]\n" % line)
