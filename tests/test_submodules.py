"""Git submodules: a runner checks each one out at the revision the commit records,
cleanly, with nothing of an earlier job left in it or beside it.

The submodules here are local repositories, which git's file:// transport serves:
test_runner_script.sh leaves that transport forbidden for submodules (git's default),
so the runners of these tests allow it through their environment only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import GIT_ENV, JOBS_AS_RUNNER, LOOPBACK, ROOT, RUNNER_ENV, git

SCRIPT = ROOT / "test_runner_script.sh"

#: git's file:// transport allowed for submodules, for a runner's process only.
ALLOW_FILE_TRANSPORT = {
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "protocol.file.allow",
    "GIT_CONFIG_VALUE_0": "always",
}

#: A test of the commit that checks the submodule's module (sub/shapes.py).
SHAPES_TEST = "from sub import shapes\n\n\ndef test_sides():\n    assert shapes.SIDES == %d\n"


def make_library(folder: Path, sides: list[int]) -> tuple[Path, list[str]]:
    """A repository whose commits set shapes.SIDES to each of ``sides`` in turn; its
    path and the commits' shas."""
    folder.mkdir()
    git(folder, "init", "--quiet", "--initial-branch=main")
    shas = []
    for count in sides:
        (folder / "shapes.py").write_text("SIDES = %d\n" % count)
        git(folder, "add", "--all")
        git(folder, "commit", "--quiet", "-m", "%d sides" % count)
        shas.append(git(folder, "rev-parse", "HEAD"))
    return folder, shas


def add_submodule(upstream, library: Path, path: str = "sub") -> None:
    """Add ``library`` as a submodule of the upstream work tree (committed by the next
    upstream.commit); --force: again after a removal, from the git folder it left."""
    git(upstream.path, "-c", "protocol.file.allow=always", "submodule", "--quiet", "add", "--force", str(library), path)


def move_submodule(upstream, revision: str, path: str = "sub") -> None:
    """Check ``revision`` out in the upstream's submodule (recorded by the next upstream.commit)."""
    git(upstream.path / path, "checkout", "--quiet", revision)


def remove_submodule(upstream, path: str = "sub") -> None:
    """Remove the submodule and, with it gone, .gitmodules (committed by the next upstream.commit)."""
    git(upstream.path, "rm", "--quiet", path)
    git(upstream.path, "rm", "--quiet", "--force", ".gitmodules")


def start_runner(ci, *extra: str):
    """CISystem.start_runner's runner, with the file:// transport allowed in its environment."""
    index = len(ci.runners) + 1
    clone = ci.upstream.clone(ci.folder / ("runner%d-clone" % index))
    argv = [sys.executable, str(ROOT / "test_runner.py"), "--host", LOOPBACK,
            "--dispatcher-server", ci.address, str(clone), *extra]
    runner = ci.processes.start("runner%d" % index, argv, env={**RUNNER_ENV, **ALLOW_FILE_TRANSPORT})
    runner.wait_for_log(r"registered with dispatcher")
    ci.runners.append(runner)
    return runner


def start_system(ci, upstream, *dispatcher_options: str, runner_options: tuple[str, ...] = ()) -> None:
    """Dispatcher, one runner, observer; returns once the initial commit is tested."""
    ci.start_dispatcher(*dispatcher_options)
    start_runner(ci, *runner_options)
    ci.start_observer()
    assert ci.wait_result(upstream.head())["status"] == "passed"


def commit_and_test(ci, upstream, files: dict, message: str) -> dict:
    """Commit, then wait for its result: one commit at a time, in order, on the one runner."""
    sha = upstream.commit(files, message)
    result = ci.wait_result(sha, timeout=60)
    assert result["commit"] == sha
    return result


def assert_passed(ci, result: dict, passed: int) -> None:
    assert (result["status"], result["passed"], result["failed"], result["errors"]) == ("passed", passed, 0, 0), \
        ci.report(result["commit"])


# --- the whole system ------------------------------------------------------------------


def test_submodule_is_checked_out_at_the_recorded_revision(ci, upstream, tmp_path):
    # The branch tip of the library (5 sides) is recorded by no commit.
    library, (three, four, _five) = make_library(tmp_path / "library", [3, 4, 5])
    start_system(ci, upstream)

    add_submodule(upstream, library)
    move_submodule(upstream, three)
    first = commit_and_test(ci, upstream, {"test_shapes.py": SHAPES_TEST % 3}, "use the library at 3 sides")
    assert_passed(ci, first, 2)

    move_submodule(upstream, four)
    second = commit_and_test(ci, upstream, {"test_shapes.py": SHAPES_TEST % 4}, "move the library to 4 sides")
    assert_passed(ci, second, 2)
    assert "checkout failed" not in ci.runners[0].log()
    # git registers each submodule in the clone's config at every checkout: no warning for that.
    assert "put back what changed" not in ci.runners[0].log()


def test_a_hook_planted_in_a_submodules_git_folder_never_runs(ci, upstream, tmp_path):
    library, (three, four) = make_library(tmp_path / "library", [3, 4])
    # Jobs that may write the clone's git folders, as a runner's own user (another
    # user's cannot: test_isolation.py).
    start_system(ci, upstream, runner_options=JOBS_AS_RUNNER)
    add_submodule(upstream, library)
    move_submodule(upstream, three)
    marker = tmp_path / "hook-ran"
    planting_test = (
        "import os, subprocess\n\n\n"
        "def test_plants_a_hook():\n"
        "    sub = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sub')\n"
        "    git_dir = subprocess.run(['git', '-C', sub, 'rev-parse', '--absolute-git-dir'], capture_output=True,\n"
        "                             text=True, check=True).stdout.strip()\n"
        "    hook = os.path.join(git_dir, 'hooks', 'post-checkout')\n"
        "    with open(hook, 'w') as handle:\n"
        "        handle.write('#!/bin/sh\\ntouch %s\\n')\n"
        "    os.chmod(hook, 0o755)\n" % marker
    )
    planting = commit_and_test(ci, upstream, {"test_shapes.py": SHAPES_TEST % 3, "test_plant.py": planting_test},
                               "tests that plant a hook in the submodule's git folder")
    assert_passed(ci, planting, 3)

    move_submodule(upstream, four)
    after = commit_and_test(ci, upstream, {"test_shapes.py": SHAPES_TEST % 4, "test_plant.py": None},
                            "the submodule moves: git checks it out again")
    assert_passed(ci, after, 2)
    assert not marker.exists(), "the planted hook ran"
    ci.runners[0].wait_for_log(r"put back what changed in the clone's \.git .*modules/sub/hooks/post-checkout")


def test_files_left_in_a_submodule_do_not_change_the_next_verdict(ci, upstream, tmp_path):
    library, (three,) = make_library(tmp_path / "library", [3])
    start_system(ci, upstream)
    add_submodule(upstream, library)
    move_submodule(upstream, three)
    # This commit's tests leave, inside the submodule, a conftest.py that would end any
    # later pytest run (an untracked file), and change its tracked file.
    planting_test = (
        "import os\n\nSUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sub')\n\n\n"
        "def test_plants():\n"
        "    with open(os.path.join(SUB, 'conftest.py'), 'w') as handle:\n"
        "        handle.write('raise SystemExit(\"planted by the commit before\")\\n')\n"
        "    with open(os.path.join(SUB, 'shapes.py'), 'w') as handle:\n"
        "        handle.write('SIDES = 99\\n')\n"
    )
    planting = commit_and_test(ci, upstream, {"test_shapes.py": SHAPES_TEST % 3, "test_plant.py": planting_test},
                               "tests that leave files in the submodule")
    assert_passed(ci, planting, 3)

    after = commit_and_test(ci, upstream, {"test_plant.py": None}, "the same submodule revision, tested again")
    assert_passed(ci, after, 2)


def test_files_left_where_a_submodule_comes_next_do_not_block_it(ci, upstream, tmp_path):
    library, (three,) = make_library(tmp_path / "library", [3])
    start_system(ci, upstream)
    # A plain folder first, and this commit's tests leave a file in it.
    planting_test = (
        "import os\n\n\ndef test_plants():\n"
        "    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'lib', 'conftest.py')\n"
        "    with open(path, 'w') as handle:\n"
        "        handle.write('raise SystemExit(\"planted by the commit before\")\\n')\n"
    )
    plain = commit_and_test(ci, upstream, {"lib/shapes.py": "SIDES = 6\n", "test_plant.py": planting_test,
                                           "test_shapes.py": SHAPES_TEST.replace("sub", "lib") % 6},
                            "a plain folder, and a file left in it")
    assert_passed(ci, plain, 3)

    # Then a submodule there, never checked out on this runner before: git clones
    # it only into an empty folder.
    git(upstream.path, "rm", "--quiet", "-r", "lib")
    add_submodule(upstream, library, "lib")
    move_submodule(upstream, three, "lib")
    only_its_files = (
        "import os\n\n\ndef test_only_the_submodule():\n"
        "    lib = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'lib')\n"
        "    assert sorted(os.listdir(lib)) == ['.git', 'shapes.py']\n"
    )
    submodule = commit_and_test(ci, upstream, {"test_plant.py": only_its_files,
                                               "test_shapes.py": SHAPES_TEST.replace("sub", "lib") % 3},
                                "the folder becomes a submodule")
    assert_passed(ci, submodule, 3)


#: A test of the commit: the submodule's folder is gone, or empty.
NO_SUBMODULE_TEST = """import os

SUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sub")


def test_no_submodule_left():
    assert not os.path.exists(SUB) or os.listdir(SUB) == []
"""

#: A test of the commit: sub/ holds the commit's own file, nothing of the submodule it replaced.
VENDORED_TEST = """import os

from sub import shapes

SUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sub")


def test_only_the_vendored_file():
    assert sorted(os.listdir(SUB)) == ["shapes.py"]
    assert shapes.SIDES == 6
"""


def test_a_removed_submodule_leaves_nothing_behind(ci, upstream, tmp_path):
    library, (three, four) = make_library(tmp_path / "library", [3, 4])
    start_system(ci, upstream)
    add_submodule(upstream, library)
    move_submodule(upstream, three)
    added = commit_and_test(ci, upstream, {"test_shapes.py": SHAPES_TEST % 3}, "add the submodule")
    assert_passed(ci, added, 2)

    # Removed: its folder, files and .git link in it, does not outlive it.
    remove_submodule(upstream)
    removed = commit_and_test(ci, upstream, {"test_shapes.py": NO_SUBMODULE_TEST}, "remove the submodule")
    assert_passed(ci, removed, 2)
    clone = ci.folder / "runner1-clone"
    assert not (clone / "sub").exists() and not (clone / ".gitmodules").exists()

    # Added again (the runner's clone still has its git folder), at another revision.
    add_submodule(upstream, library)
    move_submodule(upstream, four)
    again = commit_and_test(ci, upstream, {"test_shapes.py": SHAPES_TEST % 4}, "add the submodule again")
    assert_passed(ci, again, 2)

    # Replaced by a plain folder of the same name (the library vendored in): no .git
    # link of the submodule, nor any of its files, is left in it.
    remove_submodule(upstream)
    vendored = commit_and_test(ci, upstream, {"sub/shapes.py": "SIDES = 6\n", "test_shapes.py": VENDORED_TEST},
                               "vendor the library in")
    assert_passed(ci, vendored, 2)
    assert sorted(path.name for path in (clone / "sub").iterdir()) == ["shapes.py"]


def test_a_missing_submodule_revision_is_an_infrastructure_error(ci, upstream, tmp_path):
    library, (three,) = make_library(tmp_path / "library", [3])
    start_system(ci, upstream, "--max-attempts", "1")
    add_submodule(upstream, library)
    move_submodule(upstream, three)
    # Committed without `git add --all`, which would record the submodule's HEAD instead.
    git(upstream.path, "update-index", "--cacheinfo", "160000,%s,sub" % ("deadbeef" * 5))
    git(upstream.path, "commit", "--quiet", "-m", "a submodule revision nobody has")
    broken = upstream.head()

    result = ci.wait_result(broken, timeout=60)

    assert result["status"] == "error"
    assert result["attempts"] == 1
    assert "could not check out the submodules of %s" % broken in result["reason"], result["reason"]
    assert re.search(r"attempt \d+: checkout failed: could not check out the submodules of %s" % broken,
                     ci.runners[0].log())


# --- the script on its own -------------------------------------------------------------


def run_script(clone: Path, commit: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), str(clone), commit], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=60)


def isolated_env(home: Path, **extra: str) -> dict:
    """The environment of a runner on a machine whose git configuration allows nothing extra."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("GIT_")}
    home.mkdir(exist_ok=True)
    return {**env, "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0", **GIT_ENV, **extra}


def test_the_script_does_not_allow_local_submodule_repositories(upstream, tmp_path):
    library, (three,) = make_library(tmp_path / "library", [3])
    add_submodule(upstream, library)
    move_submodule(upstream, three)
    sha = upstream.commit({}, "a submodule from a local path")
    clone = upstream.clone(tmp_path / "clone")

    refused = run_script(clone, sha, isolated_env(tmp_path / "home"))

    assert refused.returncode == 1
    assert "transport 'file' not allowed" in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == "could not check out the submodules of %s" % sha
    assert not (clone / "sub" / "shapes.py").exists()

    # Allowed by the environment of the runner: checked out. A lock file left in the
    # submodule's git folder (a git killed mid-checkout) does not block the next one.
    allowed = isolated_env(tmp_path / "home", **ALLOW_FILE_TRANSPORT)
    assert run_script(clone, sha, allowed).returncode == 0
    assert (clone / "sub" / "shapes.py").read_text() == "SIDES = 3\n"
    (clone / ".git" / "modules" / "sub" / "index.lock").write_text("")
    (clone / "sub" / "shapes.py").write_text("SIDES = 99\n")
    again = run_script(clone, sha, allowed)
    assert again.returncode == 0, again.stderr
    assert (clone / "sub" / "shapes.py").read_text() == "SIDES = 3\n"


def test_a_commit_without_submodules_runs_the_same_git_commands_as_before(upstream, tmp_path):
    sha = upstream.commit({"test_more.py": "def test_more():\n    pass\n"}, "no submodules")
    clone = upstream.clone(tmp_path / "clone")
    git(clone, "reset", "--quiet", "--hard", "HEAD~1")
    calls = tmp_path / "git-calls"
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "git").write_text('#!/bin/sh\necho "$*" >> %s\nexec %s "$@"\n' % (calls, shutil.which("git")))
    (shim / "git").chmod(0o755)
    env = isolated_env(tmp_path / "home", PATH="%s%s%s" % (shim, os.pathsep, os.environ["PATH"]))

    done = run_script(clone, sha, env)

    assert done.returncode == 0, done.stderr
    subcommands = [line.split()[0] if not line.startswith("-c") else line.split()[2]
                   for line in calls.read_text().splitlines()]
    assert subcommands == ["rev-parse", "for-each-ref", "cat-file", "reset", "clean", "rev-parse"]
