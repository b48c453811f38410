"""The floor of planning on qrunner's stack: the least a planner in Python and lupa does, nothing more.

    python bench/floor_plan.py postfix CONFIG_DIRECTORY QUEUE_DIRECTORY SCRIPT [--header]
    python bench/floor_plan.py exim INPUT_DIRECTORY SCRIPT

One process: list the queue (Postfix: ``postqueue -j``, each line decoded;
Exim: every ``-H`` file read and its envelope parsed, as qrunner lists an
Exim queue), oldest first (the order the policy contract gives), then one
``CheckFile`` call per message in one plain lupa state, with a header table
read from the queue file where asked (Postfix ``--header``: the ``N`` records
of the first 16 KB; Exim: the header lines of the ``-H`` file already read),
and the decisions printed as one JSON list. What it leaves out is what
qrunner adds: the sandbox and its limits, the worker process under
``script_user`` and the watchdog, the records, the plan, every check of a
damaged file. The bench checks that it skips exactly what the script should
skip, so that a floor that did less than the job never times as fast.

It reads only the files the bench builds (one plain ``N`` record per header
line, no long lines; ordinary ``-H`` files): it is a yardstick, not a reader
for anyone's queue.
"""

import json
import os
import subprocess
import sys

import lupa.lua54 as lupa

REC_TYPE_SIZE, REC_TYPE_NORM = ord("C"), ord("N")


def postfix_headers(path: str) -> dict:
    """The header fields of the first 16 KB of a queue file, lower-cased names: the message content starts
    where the size record says; one ``N`` record per line up to the empty line."""
    with open(path, "rb", buffering=0) as f:
        buf = f.read(16384)
    pos = int(buf[2:2 + buf[1]].split()[1])
    fields = {}
    name = None
    while pos + 2 <= len(buf) and buf[pos] == REC_TYPE_NORM:
        length = buf[pos + 1]
        if length >= 0x80:
            length, pos = (length & 0x7F) | (buf[pos + 2] << 7), pos + 1
        line = buf[pos + 2:pos + 2 + length]
        pos += 2 + length
        if not line:
            break
        if line[:1] in b" \t" and name:
            fields[name] += b"\n" + line
            continue
        key, _colon, value = line.partition(b":")
        name = key.strip().lower()
        fields.setdefault(name, value.strip())
    return fields


def postfix(config_directory: str, queue_directory: str, header: bool):
    proc = subprocess.Popen(["postqueue", "-c", config_directory, "-j"], stdout=subprocess.PIPE)
    listed = [json.loads(line) for line in proc.stdout]
    if proc.wait() != 0:
        sys.exit("postqueue -j failed")
    listed.sort(key=lambda m: (m["arrival_time"], m["queue_id"]))
    for m in listed:
        queue_id = m["queue_id"]
        path = os.path.join(queue_directory, m["queue_name"], queue_id[0], queue_id) if header else ""
        yield (queue_id, m["message_size"], m["sender"], [r["address"] for r in m["recipients"]],
               postfix_headers(path) if header else {})


def exim_message(path: str):
    """(arrival, sender, recipients, headers) of one -H file, as the bench writes them."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    sender = lines[2][1:-1]
    arrival = int(lines[3].split()[0])
    n = 4
    while lines[n][:1] == b"-":
        n += 1
    if lines[n] != b"XX":
        raise SystemExit(f"{path}: a non-recipients tree; this floor reads only the bench's files")
    count = int(lines[n + 1])
    recipients = [r.split(b" ")[0] for r in lines[n + 2:n + 2 + count]]
    fields, name = {}, None
    for line in lines[n + 3 + count:]:
        if line[:1] in b" \t" and name:
            continue
        if len(line) > 5 and line[4:5] == b" ":
            key, _colon, value = line[5:].partition(b":")
            name = key.strip().lower()
            if line[3:4] != b"*":
                fields.setdefault(name, value.strip())
    return arrival, sender, recipients, fields


def exim(input_directory: str):
    listed = []
    for name in os.listdir(input_directory):
        if name.endswith("-H"):
            path = os.path.join(input_directory, name)
            arrival, sender, recipients, fields = exim_message(path)
            size = os.stat(path[:-1] + "D").st_size  # the -D file: the body; enough for a size in the floor
            listed.append((arrival, name[:-2], size, sender, recipients, fields))
    listed.sort(key=lambda m: (m[0], m[1]))
    for _arrival, message_id, size, sender, recipients, fields in listed:
        yield message_id, size, sender, recipients, fields


def main() -> None:
    kind = sys.argv[1]
    if kind == "postfix":
        messages = postfix(sys.argv[2], sys.argv[3], "--header" in sys.argv[5:])
        script = sys.argv[4]
    else:
        messages = exim(sys.argv[2])
        script = sys.argv[3]
    lua = lupa.LuaRuntime(encoding=None)
    with open(script, "rb") as f:
        lua.execute(f.read())
    check = lua.globals()[b"CheckFile"]
    table = lua.table_from
    decisions = []
    for queue_id, size, sender, recipients, fields in messages:
        actions = table({b"SkipSend": 0, b"Priority": 50, b"Reason": b""})
        raw = [r if type(r) is bytes else r.encode() for r in recipients]
        result = check(queue_id.encode(), actions, size, b"", sender if type(sender) is bytes else sender.encode(),
                       table(raw), table(fields))
        decisions.append({"queue_id": queue_id, "action": "skip" if result[b"SkipSend"] else "send",
                          "priority": result[b"Priority"], "errors": []})
    print(json.dumps({"decisions": decisions}))


if __name__ == "__main__":
    main()
