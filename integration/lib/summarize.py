#!/usr/bin/env python3
"""Turns the JSON lines of bench-vs-qsd.sh / bench-engines.sh into Markdown tables.

usage: summarize.py vs-qsd|engines RESULTS.jsonl

Every figure is the median over the rounds of one run; ratios are of those medians.
"""

import json
import statistics
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def median(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(v, digits=0):
    return "-" if v is None else f"{v:,.{digits}f}"


def ratio(a, b):
    return None if a is None or not b else a / b


def verdict(r, target, higher_is_better=True):
    if r is None:
        return "-"
    ok = r >= target if higher_is_better else r <= target
    return f"{r:.2f} ({'met' if ok else 'missed'}: {'≥' if higher_is_better else '≤'} {target})"


def vs_qsd(rows):
    by = defaultdict(list)
    for r in rows:
        by[(r["backend"], r["workload"])].append(r)
    rounds = max((r["round"] for r in rows), default=0)

    def m(backend, workload, key):
        return median(by[(backend, workload)], key)

    errors = sum(r.get("errors") or 0 for r in rows)
    out = [
        f"Medians of {rounds} round(s), A B A B; vublk engine auto, qsd aio=io_uring,cache.direct=on; "
        f"1 queue unless stated; {errors} I/O errors in all runs.",
        "",
        "| workload | metric | vublk | qsd | host fio | vublk/qsd (target) | vublk/host (target) |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]

    def row(workload, label, key, digits, target=None, higher=True, host_target=None):
        v, q, h = m("vublk", workload, key), m("qsd", workload, key), m("host", workload, key)
        vq = ratio(v, q)
        vh = ratio(v, h)
        out.append(
            f"| {workload} | {label} | {fmt(v, digits)} | {fmt(q, digits)} | {fmt(h, digits)} | "
            f"{verdict(vq, target, higher) if target else fmt(vq, 2)} | "
            f"{verdict(vh, host_target) if host_target else fmt(vh, 2)} |"
        )

    row("randread-4k-qd32", "IOPS", "iops", 0, 1.5, True, 0.7)
    row("randread-4k-qd32", "backend CPU µs/IO", "backend_cpu_us_per_io", 2, 0.7, False)
    row("randread-4k-qd1", "p50 µs", "lat_p50_us", 1, 0.7, False)
    row("randread-4k-qd1", "p99 µs", "lat_p99_us", 1, 1.0, False)
    row("randread-4k-qd1", "IOPS", "iops", 0)
    row("randwrite-4k-qd32", "IOPS", "iops", 0, 1.3, True)
    row("randwrite-4k-qd32", "backend CPU µs/IO", "backend_cpu_us_per_io", 2)
    row("read-128k-qd8", "MiB/s", "mib_s", 0, 1.0, True)
    row("read-128k-qd8-hugepages", "MiB/s", "mib_s", 0)
    row("write-128k-qd8", "MiB/s", "mib_s", 0)
    row("null-randread-4k-qd32-q1", "IOPS (vs null-co)", "iops", 0, 1.5, True)
    row("null-randread-4k-qd32-q1", "backend CPU µs/IO", "backend_cpu_us_per_io", 2)
    row("null-randread-4k-qd32-q2", "IOPS (vs null-co)", "iops", 0)
    v1, v2 = m("vublk", "null-randread-4k-qd32-q1", "iops"), m("vublk", "null-randread-4k-qd32-q2", "iops")
    q1, q2 = m("qsd", "null-randread-4k-qd32-q1", "iops"), m("qsd", "null-randread-4k-qd32-q2", "iops")
    out += [
        "",
        f"Null backing, 2 queues over 1 queue: vublk {verdict(ratio(v2, v1), 1.6)}, "
        f"qsd {fmt(ratio(q2, q1), 2)}.",
    ]
    nobounce = []
    for w in ("read-128k-qd8", "write-128k-qd8"):
        off, on, q = m("vublk-nobounce", w, "mib_s"), m("vublk", w, "mib_s"), m("qsd", w, "mib_s")
        if off is not None:
            nobounce.append(
                f"{w} {fmt(off)} MiB/s ({fmt(ratio(off, q), 2)}× qsd; with bounce buffers "
                f"{fmt(ratio(on, off), 2)}× this)"
            )
    if nobounce:
        out += ["", "vublk with `--huge-bounce off`: " + "; ".join(nobounce) + "."]
    return "\n".join(out)


def engines(rows):
    choice = {r["storage"]: r for r in rows if r["suite"] == "choice"}
    runs = [r for r in rows if r["suite"] == "engines"]
    storages = list(dict.fromkeys(r["storage"] for r in runs))
    configs = list(dict.fromkeys(r["config"] for r in runs))
    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    by = defaultdict(list)
    for r in runs:
        by[(r["storage"], r["config"], r["workload"])].append(r)
    rounds = max((r["round"] for r in runs), default=0)
    misses = []
    out = [
        f"Medians of {rounds} round(s). IOPS (MiB/s for sequential workloads); "
        "`*` marks what `auto` chose; auto/best is that configuration over the best one.",
        "",
    ]
    for s in storages:
        c = choice.get(s, {})
        out.append(f"**{s}**: auto chose {c.get('config', '?')} ({c.get('why', '')})")
        out.append("")
        out.append("| workload | " + " | ".join(configs) + " | auto/best |")
        out.append("| --- | " + " | ".join("---:" for _ in configs) + " | --- |")
        for w in workloads:
            key = "mib_s" if w.startswith(("read-", "write-")) else "iops"
            vals = {k: median(by[(s, k, w)], key) for k in configs}
            present = {k: v for k, v in vals.items() if v is not None}
            if not present:
                continue
            best_k = max(present, key=present.get)
            auto_v = vals.get(c.get("config"))
            r = ratio(auto_v, present[best_k])
            cells = []
            for k in configs:
                cell = fmt(vals[k])
                if k == c.get("config"):
                    cell += " *"
                cells.append(cell)
            if r is None:
                judged = "-"
            elif r >= 0.95:
                judged = f"{r:.2f}"
            else:
                judged = f"{r:.2f} (miss: best {best_k})"
                misses.append(f"{s} {w}: auto {c.get('config')} = {r:.2f} of {best_k}")
            out.append(f"| {w} | " + " | ".join(cells) + f" | {judged} |")
        out.append("")
    out.append("auto within 5% of the best everywhere." if not misses else "auto more than 5% below the best:")
    out += [f"- {x}" for x in misses]
    return "\n".join(out)


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("vs-qsd", "engines"):
        sys.exit("usage: summarize.py vs-qsd|engines RESULTS.jsonl")
    rows = load(sys.argv[2])
    print(vs_qsd(rows) if sys.argv[1] == "vs-qsd" else engines(rows))


if __name__ == "__main__":
    main()
