"""`--processes N` and configuration errors (serving/gateway_processes.py `supervise`), with stand-in
children: a configuration error (exit 2) at the start stops every process; a process restarted after a
crash that then finds a bad configuration (a bad live edit the others survived) is retried, and the
processes still serving are left alone."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

# The supervisor in its own process (it installs signal handlers); its children run CHILD with their
# index and whether they are a restart (the supervisor's env says which index; restarts are counted in
# a file per index).
RUNNER = r"""
import os, sys
from pathlib import Path
import serving.gateway_processes as gp
scenario, tmp = sys.argv[1], sys.argv[2]
CHILD = '''
import os, sys, time
from pathlib import Path
i = os.environ["TOKENPORT_GATEWAY_PROCESS"]
runs = Path(sys.argv[2]) / ("runs-" + i)
n = int(runs.read_text()) if runs.exists() else 0
runs.write_text(str(n + 1))
scenario = sys.argv[1]
if scenario == "bad-at-start" and i == "0":
    sys.exit(2)
if scenario == "bad-after-crash" and i == "0":
    if n == 0:
        time.sleep(0.5)
        sys.exit(1)  # a crash (an OOM kill, say)
    sys.exit(2)  # restarted: the configuration on disk is bad now
time.sleep(60)
'''
gp.child_argv = lambda argv: [sys.executable, "-c", CHILD, scenario, tmp]
gp.RESTART_DELAY_S = 0.2
sys.exit(gp.supervise([], 2, None))
"""


def _start(scenario: str, tmp: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", RUNNER, scenario, tmp], stderr=subprocess.PIPE, text=True)


def test_a_configuration_error_at_the_start_stops_every_process(tmp_path: Path) -> None:
    sup = _start("bad-at-start", str(tmp_path))
    _out, err = sup.communicate(timeout=30)
    assert sup.returncode == 2 and "stopped on a configuration error; stopping" in err


def test_a_restarted_process_with_a_bad_configuration_is_retried_not_the_fleet_stopped(
    tmp_path: Path,
) -> None:
    sup = _start("bad-after-crash", str(tmp_path))
    try:
        time.sleep(3.0)
        assert sup.poll() is None, "the supervisor stopped the process still serving"
        assert int((tmp_path / "runs-0").read_text()) >= 3  # the crash, then restarts exiting 2, retried
        assert int((tmp_path / "runs-1").read_text()) == 1  # the one still serving: untouched
    finally:
        sup.send_signal(signal.SIGTERM)
        _out, err = sup.communicate(timeout=30)
    assert "stopping" not in err and "exited with 2; restarting" in err
