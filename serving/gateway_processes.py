"""`tokenport gateway --processes N`: N gateway processes on one port.

Each process is a whole gateway (its own event loop, worker pool, ledger writer, metrics) listening on
the same address with SO_REUSEPORT, so the kernel spreads new connections over them: a Python process
uses one core, and this is how a gateway uses several. They share what decides money through the
database and the limits backend (the ledger, tenants, keys; budgets and rate limits in Redis when
`limits.backend: redis`, else each process counts its own; see the README's "Running a fleet").

Metrics: process i answers on its own metrics listener, `gateway.metrics_port + i` (one scrape target
per process; Prometheus sums them: `sum by (...)`). The public `/metrics` (with the metrics token)
answers for whichever process took the connection.

The parent only supervises: it starts the N children, restarts one that dies (after a second), and on
SIGINT/SIGTERM passes the signal on and waits for all of them (each drains its streams).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

RESTART_DELAY_S = 1.0


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening address several processes can bind at once (the kernel balances connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def child_argv(argv: Sequence[str]) -> list[str]:
    """This command line for one child: `--processes N` dropped, `--reuse-port` added."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--processes":
            skip = True
            continue
        if arg.startswith("--processes="):
            continue
        out.append(arg)
    return [sys.executable, "-c", "from serving.cli import main; main()", *out, "--reuse-port"]


CONFIG_ERROR = 2  # a child's exit code for a configuration error (the CLI's typer.Exit(2))


def supervise(argv: Sequence[str], processes: int, metrics_port: int | None) -> int:
    """Run `processes` children of `argv` until a signal; returns the exit code."""
    stopping = False
    children: dict[int, subprocess.Popen[bytes]] = {}

    def env_for(i: int) -> dict[str, str]:
        env = dict(os.environ)
        if metrics_port is not None:
            env["TOKENPORT_GATEWAY__METRICS_PORT"] = str(metrics_port + i if metrics_port else 0)
        env["TOKENPORT_GATEWAY_PROCESS"] = str(i)
        return env

    def start(i: int) -> None:
        children[i] = subprocess.Popen(child_argv(argv), env=env_for(i))

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in children.values():
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    for i in range(processes):
        start(i)
    code = 0
    restarted: set[int] = set()  # a configuration error stops the fleet only at its start
    while True:
        alive = False
        for i, p in list(children.items()):
            rc = p.poll()
            if rc is None:
                alive = True
            elif not stopping and rc == CONFIG_ERROR and i not in restarted:  # the start's configuration
                print(f"gateway process {i} stopped on a configuration error; stopping", file=sys.stderr)
                stop(signal.SIGTERM, None)
                code = CONFIG_ERROR
            elif not stopping:
                # a restarted process that finds a bad edit (the others keep their last good set) is
                # retried, not a reason to stop the ones still serving
                print(f"gateway process {i} (pid {p.pid}) exited with {rc}; restarting", file=sys.stderr)
                time.sleep(RESTART_DELAY_S)
                restarted.add(i)
                start(i)
                alive = True
            else:
                code = code or (rc if rc > 0 else 0)
        if not alive:
            return code
        time.sleep(0.2)
