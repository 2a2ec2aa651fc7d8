#!/usr/bin/env python3
"""Validate a shipped example dataset folder (default: every folder under datasets/ holding data files).

Python 3 standard library only. In each folder it checks:
  *.jsonl (except heldout.jsonl)  chat records {"messages": [{"role", "content"}, ...]}: strict UTF-8, no BOM,
                                   one JSON object per line, no blank lines, no keys other than "messages";
                                   roles = optional "system" first, then user/assistant alternating, ending with
                                   assistant; every content a non-empty string.
  *.csv                            alpaca rows: header has instruction,input,output (system optional, nothing
                                   else); every row has exactly the header's fields; instruction and output
                                   non-empty.
  heldout.jsonl                    {"question": str, "expected_facts": [str, ...]} per line; no question occurs
                                   verbatim (case/space-insensitive, either way round) in any training user
                                   turn, instruction or input; none is a near copy (word-set Jaccard >= 0.8);
                                   every expected fact appears in at least one training answer (so it can be
                                   learned).
Also reports counts and flags exact duplicate training records. Exit status 1 when anything is wrong.

Usage: python3 scripts/validate_dataset.py [DATASET_DIR ...]
"""

import csv
import io
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_TOTAL_BYTES = 1 << 20
NEAR_COPY = 0.8


class Report:
    def __init__(self):
        self.errors = []

    def error(self, where, msg):
        self.errors.append(f"ERROR {where}: {msg}")


def norm(text):
    return re.sub(r"\s+", " ", text.lower()).strip(" \t.?!,;:")


def words(text):
    return set(re.findall(r"[a-z0-9$@.+-]+", text.lower()))


def read_text(path, rep):
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        rep.error(path, "starts with a UTF-8 byte-order mark; remove it")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        rep.error(path, f"not valid UTF-8 at byte {e.start}")
        return None


def check_chat(path, rep):
    text = read_text(path, rep)
    if text is None:
        return [], []
    if text and not text.endswith("\n"):
        rep.error(path, "last line has no newline at the end")
    prompts, answers, seen = [], [], {}
    n = n_system = n_multi = 0
    max_user_turns = 0
    for lineno, line in enumerate(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"), 1):
        where = f"{path}:{lineno}"
        if not line.strip():
            rep.error(where, "blank line")
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            rep.error(where, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(rec, dict) or set(rec) != {"messages"}:
            rep.error(where, 'expected an object with exactly one key, "messages"')
            continue
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            rep.error(where, '"messages" must be a non-empty list')
            continue
        ok = True
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                rep.error(where, f'message {i} must have exactly the keys "role" and "content"')
                ok = False
            elif not isinstance(m["content"], str) or not m["content"].strip():
                rep.error(where, f"message {i} ({m.get('role')}) has empty or non-string content")
                ok = False
        if not ok:
            continue
        roles = [m["role"] for m in msgs]
        body = roles[1:] if roles[0] == "system" else roles
        expected = ["user", "assistant"] * (len(body) // 2 + 1)
        if not body or body != expected[: len(body)] or body[-1] != "assistant":
            rep.error(where, f"roles {roles}: need optional system, then user/assistant alternating, ending with "
                             "assistant")
            continue
        n += 1
        n_system += roles[0] == "system"
        users = sum(r == "user" for r in roles)
        n_multi += users > 1
        max_user_turns = max(max_user_turns, users)
        key = json.dumps(msgs, sort_keys=True)
        if key in seen:
            rep.error(where, f"exact duplicate of line {seen[key]}")
        seen[key] = lineno
        for m in msgs:
            (prompts if m["role"] == "user" else answers if m["role"] == "assistant" else []).append(m["content"])
    print(f"{path.relative_to(ROOT)}: {n} conversations, {n_system} with a system prompt, {n_multi} multi-turn "
          f"({100 * n_multi / max(n, 1):.0f}%), up to {max_user_turns} user turns, "
          f"{len(prompts)} user / {len(answers)} assistant messages")
    return prompts, answers


def check_csv(path, rep):
    text = read_text(path, rep)
    if text is None:
        return [], []
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        rep.error(path, "empty file")
        return [], []
    header = rows[0]
    required, optional = ["instruction", "input", "output"], ["system"]
    missing = [c for c in required if c not in header]
    extra = [c for c in header if c not in required + optional]
    if missing or extra or len(set(header)) != len(header):
        rep.error(f"{path}:1", f"header {header}: need columns {required} (+ optional {optional}), no others, "
                               "no repeats")
        return [], []
    col = {c: header.index(c) for c in header}
    prompts, answers, seen = [], [], {}
    n = n_input = n_system = 0
    for rowno, row in enumerate(rows[1:], 2):
        where = f"{path}: record {rowno}"
        if len(row) != len(header):
            rep.error(where, f"{len(row)} fields, header has {len(header)} (check quoting of commas/quotes)")
            continue
        if not row[col["instruction"]].strip() or not row[col["output"]].strip():
            rep.error(where, "empty instruction or output")
            continue
        n += 1
        n_input += bool(row[col["input"]].strip())
        n_system += "system" in col and bool(row[col["system"]].strip())
        key = tuple(row)
        if key in seen:
            rep.error(where, f"exact duplicate of record {seen[key]}")
        seen[key] = rowno
        prompts += [row[col["instruction"]], row[col["input"]]]
        answers.append(row[col["output"]])
    print(f"{path.relative_to(ROOT)}: {n} rows, columns {header}, {n_input} with input, {n_system} with system")
    return prompts, answers


def check_heldout(path, prompts, answers, rep):
    text = read_text(path, rep)
    if text is None:
        return
    train_norm = [norm(p) for p in prompts if p.strip()]
    train_words = [(words(p), p) for p in prompts if p.strip()]
    answers_lc = [a.lower() for a in answers]
    n = 0
    worst = (0.0, "", "")
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            rep.error(where, f"invalid JSON ({e.msg})")
            continue
        q, facts = rec.get("question"), rec.get("expected_facts")
        if set(rec) != {"question", "expected_facts"} or not isinstance(q, str) or not q.strip() \
                or not isinstance(facts, list) or not facts \
                or not all(isinstance(f, str) and f.strip() for f in facts):
            rep.error(where, 'expected {"question": non-empty str, "expected_facts": [non-empty str, ...]}')
            continue
        n += 1
        qn = norm(q)
        for t in train_norm:
            if qn == t or qn in t or (len(t) >= 20 and t in qn):
                rep.error(where, f"question appears verbatim in the training data: {t!r}")
                break
        qw = words(q)
        for tw, t in train_words:
            j = len(qw & tw) / max(len(qw | tw), 1)
            if j > worst[0]:
                worst = (j, q, t)
            if j >= NEAR_COPY:
                rep.error(where, f"question is a near copy (Jaccard {j:.2f}) of training text {t!r}")
        for f in facts:
            if not any(f.lower() in a for a in answers_lc):
                rep.error(where, f"expected fact {f!r} is in no training answer, so it cannot be learned")
    print(f"{path.relative_to(ROOT)}: {n} held-out questions; closest training prompt has word-set Jaccard "
          f"{worst[0]:.2f} ({worst[1]!r} vs {worst[2]!r})")


def check_dir(d, rep):
    files = sorted(p for p in d.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    prompts, answers = [], []
    for p in files:
        if p.suffix == ".jsonl" and p.name != "heldout.jsonl":
            pr, an = check_chat(p, rep)
        elif p.suffix == ".csv":
            pr, an = check_csv(p, rep)
        else:
            continue
        prompts += pr
        answers += an
    held = d / "heldout.jsonl"
    if held.exists():
        check_heldout(held, prompts, answers, rep)
    print(f"{d.relative_to(ROOT)}: {total} bytes in {len(files)} files")
    if total > MAX_TOTAL_BYTES:
        rep.error(d, f"{total} bytes, over the {MAX_TOTAL_BYTES} byte budget")


def main(argv):
    dirs = [pathlib.Path(a).resolve() for a in argv] or sorted(
        p for p in (ROOT / "datasets").iterdir()
        if p.is_dir() and any(q.suffix in (".jsonl", ".csv") for q in p.iterdir()))
    if not dirs:
        print("no dataset folders found", file=sys.stderr)
        return 1
    rep = Report()
    for d in dirs:
        if not d.is_dir():
            rep.error(d, "not a directory")
            continue
        check_dir(d, rep)
    for e in rep.errors:
        print(e)
    print("FAILED" if rep.errors else "OK", f"({len(rep.errors)} errors)")
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
