"""What ``pip install .`` puts into an environment: the package, its commands, its
shell scripts, and nothing else at the top level of site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT


def checkout_copy(destination):
    """The files a clean clone would have (what git tracks, and new files not ignored)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def test_the_wheel_holds_one_package_and_its_commands(tmp_path):
    source = checkout_copy(tmp_path / "checkout")
    # What an in-place upgrade of an older checkout leaves behind: setuptools would pack it.
    (source / "build" / "lib").mkdir(parents=True)
    (source / "build" / "lib" / "helpers.py").write_text("# from version 0.1, when modules were top level\n")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
                            "--wheel-dir", str(tmp_path / "wheels"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheels").glob("commit_ci-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/RECORD"))
        top_level = archive.read(info + "/top_level.txt").decode().split()
        entry_points = archive.read(info + "/entry_points.txt").decode()
    data = info.replace(".dist-info", ".data")
    assert {name.split("/")[0] for name in names} == {"commit_ci", info, data}
    assert top_level == ["commit_ci"]
    assert {name for name in names if name.startswith(data)} == {
        "%s/scripts/%s" % (data, script) for script in ("update_repo.sh", "test_runner_script.sh", "run_or_fail.sh")}
    for command, module in (("ci-dispatcher", "dispatcher"), ("ci-runner", "runner"), ("ci-observer", "observer"),
                            ("ci-local", "launcher"), ("ci-ctl", "ctl"), ("ci-trigger", "push_trigger")):
        assert "%s = commit_ci.%s:main" % (command, module) in entry_points
    # Every module of the package is in it, and the pytest plugin a shard loads (sharding.py).
    assert {name for name in names if name.startswith("commit_ci/") and name.endswith(".py")} == {
        path.relative_to(ROOT).as_posix() for path in (ROOT / "commit_ci").rglob("*.py") if "__pycache__" not in path.parts}
