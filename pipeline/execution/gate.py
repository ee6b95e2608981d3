"""A gate that lets tests stop a run at a known point, whatever the machine's speed (no sleeps).

Off unless `ORACLE_FARM_TASK_GATE` names a folder (Ray's local workers inherit the driver's
environment). Then every task, as it starts, takes one ticket from that folder (a `ticket-*` file,
claimed by an atomic rename); when there is none it writes `waiting-<pid>-<what>` there and waits
(polling) until a ticket appears or the folder holds a file named `open`. A test that gives one ticket
knows, once a marker and a `waiting-*` file exist, that exactly one task finished and the next is held
at its start: the moment to SIGKILL a driver or a worker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "ORACLE_FARM_TASK_GATE"


def pass_gate(what: str) -> None:
    """Return at once when the gate is off; else once this task holds a ticket or the gate is open."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    gate = Path(folder)
    waiting = gate / f"waiting-{os.getpid()}-{what}"
    try:
        while not (gate / "open").exists() and not _take_ticket(gate):
            if not waiting.exists():
                waiting.write_text(what)
            time.sleep(0.05)
    finally:
        waiting.unlink(missing_ok=True)


def _take_ticket(gate: Path) -> bool:
    for ticket in sorted(gate.glob("ticket-*")):
        try:
            os.rename(ticket, gate / f"used-{ticket.name}-{os.getpid()}")  # one taker per ticket
            return True
        except FileNotFoundError:
            continue
    return False
