"""Write the figures section of RELIABILITY.md from the JSON lines the reliability tests recorded.

Usage: python tests/reliability_report.py FIGURES.jsonl RELIABILITY.md

Records with the same section and name are summed (a case run over several back ends or rounds is one row).
Only the text between the two marker lines is replaced; the prose around it is written by hand.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from collections import OrderedDict

BEGIN = "<!-- figures: begin (written by make reliability; do not edit by hand) -->"
END = "<!-- figures: end -->"
TITLES = {"faults": "Faults injected and survived", "inputs": "Hostile and generated inputs",
          "load": "Load and racing runs"}


def summed(lines):
    rows: "OrderedDict[tuple, dict]" = OrderedDict()
    for line in lines:
        if not line.strip():
            continue
        record = json.loads(line)
        key = (record["section"], record["name"])
        row = rows.setdefault(key, {"tried": 0, "survived": 0, "lost": 0, "duplicates": 0, "tests": set(),
                                    "note": record.get("note", "")})
        for field in ("tried", "survived", "lost", "duplicates"):
            row[field] += int(record.get(field, 0))
        row["tests"].add(record["test"].split("[")[0])
    return rows


def table(rows, section):
    out = [f"### {TITLES[section]}", "", "| case | tried | survived | lost | delivered twice | test |",
           "| --- | ---: | ---: | ---: | ---: | --- |"]
    total = {"tried": 0, "survived": 0, "lost": 0, "duplicates": 0}
    for (sec, name), row in rows.items():
        if sec != section:
            continue
        for field in total:
            total[field] += row[field]
        tests = ", ".join(f"`{t}`" for t in sorted(row["tests"]))
        label = f"{name} ({row['note']})" if row["note"] else name
        out.append(f"| {label} | {row['tried']} | {row['survived']} | {row['lost']} | {row['duplicates']} | {tests} |")
    out.append(f"| **total** | **{total['tried']}** | **{total['survived']}** | **{total['lost']}** | "
               f"**{total['duplicates']}** | |")
    return out, total


def render(rows, command):
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [BEGIN, "", f"Measured {when} on {platform.node()} ({platform.platform()}, Python "
           f"{platform.python_version()}) by `{command}`.", ""]
    grand = {"tried": 0, "survived": 0, "lost": 0, "duplicates": 0}
    for section in TITLES:
        if not any(sec == section for sec, _ in rows):
            continue
        lines, total = table(rows, section)
        out += lines + [""]
        for field in grand:
            grand[field] += total[field]
    out += [f"In all: {grand['tried']} faults and inputs tried, {grand['survived']} ended as the contract says, "
            f"**{grand['lost']} messages lost**, {grand['duplicates']} delivered twice.", "", END]
    return "\n".join(out)


def main(argv):
    figures_path, document = argv[1], argv[2]
    command = argv[3] if len(argv) > 3 else "make reliability"
    with open(figures_path, encoding="utf-8") as f:
        rows = summed(f)
    with open(document, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        sys.exit(f"{document} has no figures markers ({BEGIN!r} ... {END!r}); put them where the figures go.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(document + ".new", "w", encoding="utf-8") as f:
        f.write(head + render(rows, command) + tail)
    import os
    os.replace(document + ".new", document)
    print(f"{document}: figures from {sum(1 for _ in open(figures_path))} records written")


if __name__ == "__main__":
    main(sys.argv)
