"""Time one command for the benchmarks; a command that fails ends the benchmark.

A failing command can be faster than a working one (``qrunner plan`` that
stops at a configuration error takes milliseconds), so its time would be a
false result: the benchmark stops with a non-zero exit and says which
command failed and why.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from typing import Mapping, Optional, Sequence


def timed_run(argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> float:
    """Seconds ``argv`` took; SystemExit naming the command when it exits non-zero."""
    started = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        why = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise SystemExit("benchmark stopped: %s exited with %d%s"
                         % (shlex.join(argv), result.returncode, (": " + why[-1]) if why else ""))
    return elapsed
