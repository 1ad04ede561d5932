"""Crash points for the fault-tolerance tests: a real SIGKILL at a chosen line, nothing simulated.

Set EDGEFL_CRASH_AT="<point>@<round>" (for example `agent.after_publish@2`) and the process kills
itself with SIGKILL when it reaches that point in that round. Unset (always, outside the tests),
`crash_point` is a dictionary lookup and returns.
"""

from __future__ import annotations

import os
import signal

ENV = "EDGEFL_CRASH_AT"


def crash_point(name: str, round_no: int) -> None:
    spec = os.environ.get(ENV)
    if spec and spec == f"{name}@{round_no}":
        os.kill(os.getpid(), signal.SIGKILL)
