"""What one ``make bench`` measured: figures per MTA, size and name, kept as JSON for the report.

Every figure is a list of runs, one per round; a round runs each command of
its group once, in turn, so that drift in the machine's load hits them all.
A ratio is the median of the per-round ratios of two figures of the same
group: both were measured in the same rounds of the same run.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional


@dataclass
class Figure:
    runs: List[float]  # seconds per round (or messages per second when unit is "msg/s")
    unit: str = "s"
    count: int = 0  # messages the command handled in each run
    max_rss_kb: List[int] = field(default_factory=list)
    tree_rss_kb: List[int] = field(default_factory=list)
    command: str = ""
    qrunner_rss_kb: List[int] = field(default_factory=list)  # qrunner's own processes (command + Lua worker), summed

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def per_message_us(self) -> Optional[float]:
        return self.median / self.count * 1e6 if self.count and self.unit == "s" else None

    @property
    def peak_rss_mb(self) -> Optional[float]:
        return max(self.max_rss_kb) / 1024 if self.max_rss_kb else None

    @property
    def peak_qrunner_mb(self) -> Optional[float]:
        """qrunner's memory: the peaks of its own processes summed, the MTA tools it ran left out."""
        return max(self.qrunner_rss_kb) / 1024 if self.qrunner_rss_kb and max(self.qrunner_rss_kb) else None

    @property
    def peak_tree_mb(self) -> Optional[float]:
        return max(self.tree_rss_kb) / 1024 if self.tree_rss_kb and max(self.tree_rss_kb) else None


@dataclass
class Profile:
    title: str
    command: str
    text: str


@dataclass
class Results:
    machine: Dict[str, str] = field(default_factory=dict)
    sizes: List[int] = field(default_factory=list)
    repeat: int = 0
    dispatch_messages: int = 0
    pymailq_size: int = 0
    target_size: int = 10_000
    tool_repeat: int = 0
    dispatch_repeat: int = 0  # rounds of the flush dispatch group (0: a results file from before it had its own)
    seconds_per_size: Dict[str, float] = field(default_factory=dict)  # "size" -> wall seconds of both MTAs' groups
    figures: Dict[str, Figure] = field(default_factory=dict)  # "mta|size|name" -> figure
    notes: List[str] = field(default_factory=list)
    profiles: List[Profile] = field(default_factory=list)
    build_seconds: Dict[str, float] = field(default_factory=dict)  # "mta|size" -> seconds the queue took to build

    @staticmethod
    def key(mta: str, size: int, name: str) -> str:
        return f"{mta}|{size}|{name}"

    def add(self, mta: str, size: int, name: str, figure: Figure) -> None:
        self.figures[self.key(mta, size, name)] = figure

    def get(self, mta: str, size: int, name: str) -> Optional[Figure]:
        return self.figures.get(self.key(mta, size, name))

    def ratio(self, mta: str, size: int, a: str, b: str) -> Optional[float]:
        """Median of the per-round ratios a/b (both from the same rounds), or None if either is missing."""
        fa, fb = self.get(mta, size, a), self.get(mta, size, b)
        if fa is None or fb is None:
            return None
        if len(fa.runs) == len(fb.runs):
            return statistics.median(x / y for x, y in zip(fa.runs, fb.runs))
        return fa.median / fb.median

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)  # in insertion order: the report keeps the machine table's

    @classmethod
    def from_json(cls, text: str) -> "Results":
        raw = json.loads(text)
        results = cls(**{k: v for k, v in raw.items() if k not in ("figures", "profiles")})
        results.figures = {k: Figure(**v) for k, v in raw["figures"].items()}
        results.profiles = [Profile(**p) for p in raw["profiles"]]
        return results
