"""Processes a job leaves running, whatever session or process group they moved to
(``setsid``, a double-forked daemon): killed by the subreaper they come back to."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, STRAY_CODE, running_strays, stray_pids


#: Runs in a process of its own (a subreaper cannot stop being one, and the test
#: process must not become one): starts a kept child and strays that escape in
#: every way, kills the strays with kill_leftovers, and prints what it found.
KILL_LEFTOVERS_PROBE = r'''
import json, os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from warm_pytest import _children, become_subreaper, kill_leftovers

folder, stray_code = sys.argv[2], sys.argv[3]
stray = [sys.executable, "-c", stray_code, folder]
# Hops (forks, and the parent exits) as fast as it can, for 60 s at most.
hopper = [sys.executable, "-c", """import os, sys, time
deadline = time.monotonic() + 60
hops = 0
while time.monotonic() < deadline:
    if os.fork():
        os._exit(0)
    hops += 1
    if hops == 50:
        open(os.path.join(sys.argv[1], "hopping"), "w").close()
""", folder]
assert become_subreaper()
kept = subprocess.Popen(stray)
subprocess.Popen(stray, start_new_session=True)
subprocess.run(["sh", "-c", 'setsid "$@" & exit 0', "sh", *stray])  # a daemon: its parent is gone
subprocess.Popen(["sh", "-c", '"$@" & exec "$@"', "sh", *stray], start_new_session=True)  # one with a child
subprocess.Popen(hopper, start_new_session=True)
deadline = time.monotonic() + 30
while len([name for name in os.listdir(folder) if name.isdigit()]) < 5 or not os.path.exists(os.path.join(folder, "hopping")):
    assert time.monotonic() < deadline, "the strays did not start"
    time.sleep(0.01)
killed, stuck = kill_leftovers({kept.pid})
after = sorted(pid for pid, _ in _children())
kept_running = kept.poll() is None
kept.kill()
kept.wait()
print(json.dumps({"kept": kept.pid, "killed": killed, "stuck": stuck, "children_after": after, "kept_running": kept_running}))
'''


def test_kill_leftovers_kills_every_generation_and_spares_the_kept(strays):
    done = subprocess.run([sys.executable, "-c", KILL_LEFTOVERS_PROBE, str(ROOT), str(strays), STRAY_CODE],
                          capture_output=True, text=True, timeout=60, start_new_session=True)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["stuck"] == []
    assert found["children_after"] == [found["kept"]] and found["kept_running"]
    # The session's, the daemon, the chain's two, and the hopper where it was.
    assert found["killed"] >= 5, found
    assert len(stray_pids(strays)) == 5
    assert running_strays(strays) == []
