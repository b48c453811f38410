"""Figures for RELIABILITY.md, written by the tests that measured them (issue 14, point 5).

A reliability test takes the ``figures`` fixture and calls ``figures.record(section, name, tried=..., survived=...,
lost=...)`` once per case it ran: faults injected and survived, inputs generated and handled, messages run and lost.
When ``QRUNNER_FIGURES`` names a file (``make reliability`` sets it), each record is appended to it as one JSON line;
otherwise nothing is written and the test only asserts. ``tests/reliability_report.py`` turns the file into the
figures section of RELIABILITY.md, so no figure there is typed by hand.

Sections: ``faults`` (kills and failures injected, run after run), ``inputs`` (hostile and generated inputs),
``load`` (long and racing runs). ``tried`` counts what was injected or generated, ``survived`` what ended as the
contract says (the test asserts ``survived == tried``), ``lost`` messages lost or stranded (asserted zero).
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Optional

import pytest

SECTIONS = ("faults", "inputs", "load")


class Figures:
    """Appends one JSON line per record to ``path`` (or keeps nothing when ``path`` is None)."""

    def __init__(self, path: Optional[str], test_id: str):
        self.path = path
        self.test_id = test_id

    def record(self, section: str, name: str, *, tried: int, survived: int, lost: int = 0,
               duplicates: int = 0, note: str = "") -> None:
        if section not in SECTIONS:
            raise ValueError(f"figures section {section!r} is not one of {SECTIONS}")
        if not self.path:
            return
        line = json.dumps({"section": section, "name": name, "tried": tried, "survived": survived,
                           "lost": lost, "duplicates": duplicates, "note": note, "test": self.test_id},
                          sort_keys=True)
        with open(self.path, "a", encoding="utf-8") as out:
            fcntl.flock(out, fcntl.LOCK_EX)
            out.write(line + "\n")


@pytest.fixture
def figures(request) -> Figures:
    """Where a reliability test records what it injected, generated or ran (see the module docstring)."""
    return Figures(os.environ.get("QRUNNER_FIGURES") or None, request.node.nodeid)
