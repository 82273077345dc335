"""Targets and the Markdown of docs/benchmarks.md, from the results of bench/run.py."""

from __future__ import annotations

import re
import statistics
from typing import Any

from bench import affinity, fairness
from bench.loadgen import percentile

PROTOCOL_PATH = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}
SERVERS = ("daphne", "uvicorn")

# Targets of issue 7, for one router process on this 2-core machine.
STREAM_RATIO = {"daphne": 0.35, "uvicorn": 0.5}
WHOLE_RATIO = {"daphne": 0.1}
ADDED_P50_MS = 1.5
ADDED_P99_MS = 5.0
RSS_LIMIT_MB = 200.0
# Targets of issue 11, item 4 (memory bounded by settings, not by clients).
READERS_RSS_LIMIT_MB = 250.0
BODY_MARGIN_MB = 8.0  # per refused body, over what its framing lets the router hold


# -- aggregation -----------------------------------------------------------------------
def agg(results: dict[str, Any], scenario: str, target: str) -> dict[str, float] | None:
    """One scenario on one target over all rounds: throughput over the summed time, the
    median of the rounds' percentiles, every failure."""
    rows = [r for r in results["throughput"] if r["scenario"] == scenario and r["target"] == target]
    if not rows:
        return None
    requests = sum(r["requests"] for r in rows)
    seconds = sum(r["duration_s"] for r in rows)
    cpu = [r["router_cpu_ms_per_req"] for r in rows if "router_cpu_ms_per_req" in r]
    backend_cpu = [r["backend_cpu_ms_per_req"] for r in rows if "backend_cpu_ms_per_req" in r]
    return {
        "requests": requests,
        "rps": requests / seconds if seconds else 0.0,
        "p50": statistics.median(r["p50_ms"] for r in rows),
        "p99": statistics.median(r["p99_ms"] for r in rows),
        "failures": sum(r["errors"] + r["status_errors"] for r in rows),
        "cpu_ms": statistics.median(cpu) if cpu else float("nan"),
        "backend_cpu_ms": statistics.median(backend_cpu) if backend_cpu else float("nan"),
        "rounds": len(rows),
    }


def scenarios(results: dict[str, Any]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for r in results["throughput"]:
        seen.setdefault(
            r["scenario"],
            {"key": r["scenario"], "protocol": r["protocol"], "stream": r["stream"], "c": r["concurrency"]},
        )
    return list(seen.values())


def routers(results: dict[str, Any]) -> list[str]:
    found = {r["target"] for r in results["throughput"]} | {r["target"] for r in results["slow"]}
    found |= {r["target"] for r in results["ttfb"]}
    return [s for s in SERVERS if s in found]


def ttfb_summary(results: dict[str, Any], protocol: str, target: str) -> dict[str, float] | None:
    rows = [r for r in results["ttfb"] if r["protocol"] == protocol and r["target"] == target]
    if not rows:
        return None
    firsts = [v for r in rows for v in r["ttfb_ms"]]
    totals = [v for r in rows for v in r["total_ms"]]
    return {
        "n": len(firsts),
        "errors": sum(r["errors"] for r in rows),
        "p50": percentile(firsts, 50),
        "p99": percentile(firsts, 99),
        "total_p50": percentile(totals, 50),
        "total_p99": percentile(totals, 99),
    }


def label(sc: dict[str, Any]) -> str:
    return f"`{PROTOCOL_PATH[sc['protocol']]}` {'stream' if sc['stream'] else 'non-stream'} c={sc['c']}"


# -- targets ---------------------------------------------------------------------------
def _target(
    name: str, value: float | None, limit: str, ok: bool | None, shown: str | None = None
) -> dict[str, Any]:
    return {"name": name, "value": value, "shown": shown, "limit": limit, "pass": ok}


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    scs = scenarios(results)
    top_c = max((s["c"] for s in scs), default=0)
    low_c = min((s["c"] for s in scs), default=0)
    for server in routers(results):
        for stream, limits in ((True, STREAM_RATIO), (False, WHOLE_RATIO)):
            if server not in limits:
                continue
            for protocol in ("ollama", "openai"):
                key = f"{protocol}-{'stream' if stream else 'whole'}-c{top_c}"
                d, r = agg(results, key, "direct"), agg(results, key, server)
                if not d or not r or not d["rps"]:
                    continue
                ratio = r["rps"] / d["rps"]
                mode = "streaming" if stream else "non-streaming"
                out.append(
                    _target(
                        f"{server}: {mode} {PROTOCOL_PATH[protocol]} c={top_c}, router/direct",
                        ratio,
                        f">= {limits[server]:.2f}",
                        ratio >= limits[server],
                        f"{ratio:.2f}",
                    )
                )
    for server in routers(results)[:1]:  # the default server: daphne
        added50, added99 = [], []
        for sc in scs:
            if sc["c"] != low_c:
                continue
            d, r = agg(results, sc["key"], "direct"), agg(results, sc["key"], server)
            if d and r:
                added50.append((r["p50"] - d["p50"], label(sc)))
                added99.append((r["p99"] - d["p99"], label(sc)))
        if added50:
            worst = max(added50)
            out.append(
                _target(
                    f"{server}: added p50 latency at c={low_c} (worst scenario: {worst[1]})",
                    worst[0],
                    f"<= {ADDED_P50_MS} ms",
                    worst[0] <= ADDED_P50_MS,
                    f"{worst[0]:.2f} ms",
                )
            )
            worst = max(added99)
            out.append(
                _target(
                    f"{server}: added p99 latency at c={low_c} (worst scenario: {worst[1]})",
                    worst[0],
                    f"<= {ADDED_P99_MS} ms",
                    worst[0] <= ADDED_P99_MS,
                    f"{worst[0]:.2f} ms",
                )
            )
    for row in results["slow"]:
        if row["target"] == "direct":
            continue
        if row["target"] == "daphne" or row["target"] == routers(results)[0]:
            out.append(
                _target(
                    f"{row['target']}: {row['streams']:,} concurrent slow streams, router RSS peak",
                    row["rss_peak_mb"],
                    f"< {RSS_LIMIT_MB:.0f} MB",
                    row["rss_peak_mb"] < RSS_LIMIT_MB,
                    f"{row['rss_peak_mb']:.0f} MB",
                )
            )
            out.append(
                _target(
                    f"{row['target']}: {row['streams']:,} concurrent slow streams, errors",
                    row["errors"],
                    "0",
                    row["errors"] == 0 and row["open_at_once"] >= row["streams"],
                    f"{row['errors']} ({row['open_at_once']:,} open at once)",
                )
            )
    out += memory_targets(results)
    failures = sum(r["errors"] + r["status_errors"] for r in results["throughput"])
    failures += sum(r["errors"] for r in results["ttfb"]) + sum(r["errors"] for r in results["slow"])
    stats = results.get("stats") or {}
    failures += stats.get("sequential", {}).get("errors", 0)
    conc = stats.get("concurrent", {})
    failures += conc.get("errors", 0) + conc.get("status_errors", 0)
    out.append(_target("zero failures, all phases", failures, "0", failures == 0, str(failures)))
    return out


def body_growth_limit_mb(row: dict[str, Any]) -> float:
    """What refusing `row`'s bodies may add to the router's RSS: a margin per body, plus, for a
    chunked body (no length to refuse it by), up to ROUTER_MAX_BODY held before it passes it."""
    held = row["max_body"] / (1 << 20) if row["framing"] == "chunked" else 0.0
    return float(row["bodies"] * (held + BODY_MARGIN_MB))


def memory_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    mem = results.get("memory") or {}
    out: list[dict[str, Any]] = []
    size = mem.get("reply_bytes", 0) / 1e6
    for r in mem.get("readers", []):
        out.append(
            _target(
                f"{r['target']}: {r['streams']} clients reading a {size:.1f} MB stream slowly, "
                "router RSS peak",
                r["rss_peak_mb"],
                f"< {READERS_RSS_LIMIT_MB:.0f} MB",
                r["rss_peak_mb"] < READERS_RSS_LIMIT_MB,
                f"{r['rss_peak_mb']:.0f} MB",
            )
        )
        out.append(
            _target(
                f"{r['target']}: those replies started, and every slot back after the hang-up",
                r["started"],
                f"{r['streams']}, yes",
                r["started"] == r["streams"] and r["slots_released"],
                f"{r['started']}, {'yes' if r['slots_released'] else 'NO'}",
            )
        )
    for r in mem.get("bodies", []):
        growth = r["rss_peak_mb"] - r["rss_before_mb"]
        limit = body_growth_limit_mb(r)
        refused = all(status == 413 for status in r["statuses"])
        out.append(
            _target(
                f"{r['target']}: {r['bodies']} concurrent {r['body_bytes'] >> 20} MiB bodies "
                f"({r['framing']}), 413 each, router RSS growth",
                growth,
                f"413s, < {limit:.0f} MB",
                refused and growth < limit,
                f"{'413s' if refused else r['statuses']}, {growth:.0f} MB",
            )
        )
    return out


def memory_section(results: dict[str, Any]) -> list[str]:
    """The "Memory bounded by settings" section: method, targets and both tables."""
    mem = results.get("memory") or {}
    if not mem.get("readers") and not mem.get("bodies"):
        return []
    o = results["options"]
    max_body = (mem["bodies"][0]["max_body"] >> 20) if mem.get("bodies") else o.get("memory_max_body_mb")
    m = results["meta"]
    lines = [
        "## Memory bounded by settings, not by clients",
        "",
        f"Recorded on {m['date']} at commit `{m.get('commit', '-')}` (load average "
        f"{m['loadavg_start'][0]:.1f} at the start: the machine was shared), with the memory phase "
        "of `make bench` alone:",
        "",
        "```sh",
        f"{o['command']}",
        "python -m bench.report bench/results/bench-<stamp>.json --memory-section  # this section only",
        "```",
        "",
        f"- **Slow readers (backpressure).** {o['memory_streams']} clients each stream one "
        f"`/api/chat` reply of {mem.get('reply_bytes', 0) / 1e6:.1f} MB ({o['memory_tokens']:,} "
        f"tokens of ~{o['memory_pad'] + 120:,} bytes from a fake backend that writes as fast as "
        f"the connection takes it) and read {o['memory_read_bytes']:,} bytes every "
        f"{o['memory_interval']:g} s straight from their sockets, for {o['memory_duration']:g} s (the "
        "shape of the field report, shortened: a whole reply would take hours at that pace); then "
        "they all hang up. Before backpressure the router read every reply whole into its memory "
        "(the field report: 97 MB to 798 MB). *Backend wrote* is what the fake handed to its "
        "connections: on loopback Linux lets each connection's socket buffers grow to several MB "
        "(tcp_rmem/tcp_wmem autotuning), so a reply of this size can wait whole in the kernel "
        "between the backend and the router; what matters here is that it does not wait in the "
        "router. (tests/integration/test_memory_bounds.py shows the backend itself held back, "
        "with an 82 MB reply.) *Slots back*: /metrics shows no slot held once the clients hung up.",
        f"- **Refused bodies.** {o['memory_bodies']} clients at once each POST a "
        f"{o['memory_body_mb']} MiB body to `/api/chat`, written as fast as the router takes it "
        "without waiting for the reply (as a naive client does), first with a Content-Length, "
        f"then chunked; the routers run with `ROUTER_MAX_BODY={max_body} MiB` (set for this run; "
        "the default is 64 MiB). *Sent before the cut* is what each client got to send before the router "
        "closed the connection. The limit on RSS growth is "
        f"{BODY_MARGIN_MB:.0f} MB per body, plus ROUTER_MAX_BODY per chunked body: a body "
        "without a length can only be refused once it has passed the limit (under daphne it "
        "is then on disk, in Twisted's temporary file; under uvicorn in memory).",
        "- RSS is sampled from `/proc/PID/status` every 50 ms.",
        "",
        *_table(
            ["target", "measured", "limit", "verdict"],
            [
                [
                    t["name"],
                    t["shown"] if t["shown"] is not None else _f(t["value"]),
                    t["limit"],
                    "**pass**" if t["pass"] else "**FAIL**",
                ]
                for t in memory_targets(results)
            ],
            "lrrl",
        ),
        "",
    ]
    if mem.get("readers"):
        rows = []
        total = o["memory_streams"] * mem.get("reply_bytes", 0) / 1e6
        for r in mem["readers"]:
            rows.append(
                [
                    r["target"],
                    f"{r['started']}/{r['streams']}",
                    f"{r['bytes_read'] / 1e6:.2f} MB",
                    f"{r['backend_bytes'] / 1e6:.0f} of {total:.0f} MB",
                    f"{r['backend_completed']}",
                    "yes" if r["slots_released"] else "**no**",
                    f"{r['rss_before_mb']:.0f} MB",
                    f"**{r['rss_peak_mb']:.0f} MB**",
                    f"{r['rss_after_mb']:.0f} MB",
                ]
            )
        lines += _table(
            [
                "router",
                "replies started",
                "clients read",
                "backend wrote",
                "replies completed",
                "slots back",
                "RSS before",
                "RSS peak",
                "RSS after",
            ],
            rows,
        )
        lines.append("")
    if mem.get("bodies"):
        rows = []
        for r in mem["bodies"]:
            rows.append(
                [
                    r["target"],
                    r["framing"],
                    ", ".join(str(x) for x in r["statuses"]),
                    ", ".join(f"{x:g}" for x in r["sent_mb"]) + " MiB",
                    f"{r['rss_before_mb']:.0f} MB",
                    f"**{r['rss_peak_mb']:.0f} MB**",
                    f"{r['rss_peak_mb'] - r['rss_before_mb']:.0f} MB",
                    f"{body_growth_limit_mb(r):.0f} MB",
                ]
            )
        header = ["router", "framing", "replies", "sent before the cut", "RSS before", "RSS peak"]
        lines += _table([*header, "growth", "limit"], rows)
        lines.append("")
    return lines


def splice_section(doc: str, section: list[str]) -> str:
    """`doc` with its "## Memory bounded..." section replaced by `section` (or inserted before
    the /api/stats section, else at the end)."""
    if not section:
        return doc
    heading = section[0]
    text = "\n".join(section).rstrip() + "\n\n"
    start = doc.find(heading)
    if start >= 0:
        end = doc.find("\n## ", start + len(heading))
        return doc[:start] + text + (doc[end + 1 :] if end >= 0 else "")
    anchor = doc.find("## `/api/stats`")
    if anchor < 0:
        return doc.rstrip() + "\n\n" + text
    return doc[:anchor] + text + doc[anchor:]


# -- formatting -----------------------------------------------------------------------
def _f(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:,.{digits}f}"


def _rps(value: float) -> str:
    return f"{value:,.0f}"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def throughput_table(results: dict[str, Any]) -> list[str]:
    servers = routers(results)
    header = ["scenario", "direct req/s"]
    for s in servers:
        header += [f"{s} req/s", f"{s}/direct"]
    header += ["failures"]
    rows = []
    for sc in scenarios(results):
        d = agg(results, sc["key"], "direct")
        if d is None:
            continue
        row = [label(sc), _rps(d["rps"])]
        fails = d["failures"]
        for s in servers:
            r = agg(results, sc["key"], s)
            if r is None:
                row += ["-", "-"]
                continue
            row += [_rps(r["rps"]), f"**{r['rps'] / d['rps']:.2f}**" if d["rps"] else "-"]
            fails += r["failures"]
        rows.append([*row, str(int(fails))])
    return _table(header, rows)


def latency_table(results: dict[str, Any]) -> list[str]:
    servers = routers(results)
    header = ["scenario", "direct p50", "direct p99"]
    for s in servers:
        header += [f"{s} p50", f"{s} p99"]
    rows = []
    for sc in scenarios(results):
        d = agg(results, sc["key"], "direct")
        if d is None:
            continue
        row = [label(sc), _f(d["p50"]), _f(d["p99"])]
        for s in servers:
            r = agg(results, sc["key"], s)
            row += [_f(r["p50"]), _f(r["p99"])] if r else ["-", "-"]
        rows.append(row)
    return _table(header, rows)


def best_round_added_p99(results: dict[str, Any], scenario: str, target: str) -> float | None:
    """The smallest router-minus-direct p99 of any one round (both measured in that round)."""
    direct = {
        r["round"]: r for r in results["throughput"] if r["scenario"] == scenario and r["target"] == "direct"
    }
    added = [
        r["p99_ms"] - direct[r["round"]]["p99_ms"]
        for r in results["throughput"]
        if r["scenario"] == scenario and r["target"] == target and r["round"] in direct
    ]
    return min(added) if added else None


def cpu_table(results: dict[str, Any]) -> list[str]:
    """CPU time per request: the fake backend's (direct runs) against each router's."""
    servers = routers(results)
    header = ["scenario", "backend CPU ms/req"]
    for s in servers:
        header += [f"{s} CPU ms/req", f"{s} req/s per core", f"{s} CPU-bound ratio"]
    rows = []
    for sc in scenarios(results):
        d = agg(results, sc["key"], "direct")
        if d is None:
            continue
        row = [label(sc), _f(d["backend_cpu_ms"])]
        for s in servers:
            r = agg(results, sc["key"], s)
            if r is None or not r["cpu_ms"] or r["cpu_ms"] != r["cpu_ms"]:
                row += ["-", "-", "-"]
                continue
            row += [_f(r["cpu_ms"]), _rps(1000 / r["cpu_ms"]), _f(d["backend_cpu_ms"] / r["cpu_ms"])]
        rows.append(row)
    return _table(header, rows)


def added_table(results: dict[str, Any]) -> list[str]:
    servers = routers(results)
    scs = scenarios(results)
    low_c = min((s["c"] for s in scs), default=1)
    header = ["scenario"] + [f"{s} added p50" for s in servers] + [f"{s} added p99" for s in servers]
    header += [f"{s} added p99, quietest round" for s in servers]
    rows = []
    for sc in scs:
        if sc["c"] != low_c:
            continue
        d = agg(results, sc["key"], "direct")
        if d is None:
            continue
        p50s, p99s, best = [], [], []
        for s in servers:
            r = agg(results, sc["key"], s)
            p50s.append(_f(r["p50"] - d["p50"]) if r else "-")
            p99s.append(_f(r["p99"] - d["p99"]) if r else "-")
            best.append(_f(best_round_added_p99(results, sc["key"], s)))
        rows.append([label(sc), *p50s, *p99s, *best])
    return _table(header, rows)


def ttfb_table(results: dict[str, Any]) -> list[str]:
    servers = routers(results)
    header = ["stream", "n", "direct p50", "direct p99"]
    for s in servers:
        header += [f"{s} p50", f"{s} p99", f"{s} added p50"]
    rows = []
    for protocol in ("ollama", "openai"):
        d = ttfb_summary(results, protocol, "direct")
        if d is None:
            continue
        row = [f"`{PROTOCOL_PATH[protocol]}`", str(d["n"]), _f(d["p50"], 3), _f(d["p99"], 3)]
        for s in servers:
            r = ttfb_summary(results, protocol, s)
            row += [_f(r["p50"], 3), _f(r["p99"], 3), _f(r["p50"] - d["p50"], 3)] if r else ["-", "-", "-"]
        rows.append(row)
    return _table(header, rows)


def slow_table(results: dict[str, Any]) -> list[str]:
    header = [
        "target",
        "complete",
        "open at once",
        "backend peak",
        "chunks/s",
        "stream p50",
        "stream p99",
        "stream max",
        "reply starts p50",
        "reply starts p99",
        "RSS before",
        "RSS peak",
        "RSS after",
    ]
    rows = []
    for r in results["slow"]:
        mem = (
            [f"{r['rss_before_mb']:.0f} MB", f"**{r['rss_peak_mb']:.0f} MB**", f"{r['rss_after_mb']:.0f} MB"]
            if "rss_peak_mb" in r
            else ["-", "-", "-"]
        )
        rows.append(
            [
                r["target"],
                f"{r['ok']:,}/{r['streams']:,}",
                f"{r['open_at_once']:,}",
                f"{r['backend_max_in_flight']:,}",
                f"{r['chunks_per_s']:,.0f}",
                f"{r['duration_p50_s']:.2f} s",
                f"{r['duration_p99_s']:.2f} s",
                f"{r['duration_max_s']:.2f} s",
                f"{r['first_byte_p50_ms']:.1f} ms",
                f"{r['first_byte_p99_ms']:.1f} ms",
                *mem,
            ]
        )
    return _table(header, rows)


def targets_table(results: dict[str, Any]) -> list[str]:
    rows = []
    for t in results.get("targets", []):
        verdict = "n/a" if t["pass"] is None else ("**pass**" if t["pass"] else "**FAIL**")
        rows.append(
            [t["name"], t["shown"] if t["shown"] is not None else _f(t["value"]), t["limit"], verdict]
        )
    return _table(["target", "measured", "limit", "verdict"], rows, "lrrl")


def stats_section(results: dict[str, Any]) -> list[str]:
    s = results.get("stats") or {}
    if not s:
        return ["Not run (`--only` left it out)."]
    if "skipped" in s:
        return [f"Skipped: {s['skipped']}."]
    fill, req, seq, conc, ex = s["fill"], s["request"], s["sequential"], s["concurrent"], s["explain"]
    lines = [
        f"Scratch database `nomyo_bench` on {ex['postgres_version'].split(' on ')[0]}: "
        f"**{fill['rows']:,} rows** in `stats_tokentimeseries` ({fill['table_size']} with indexes), "
        f"one row per (model, endpoint, minute), {len(fill['models'])} models x "
        f"{len(fill['endpoints'])} endpoints, "
        f"12 of the 20 pairs in each minute, from {fill['first'][:16]} to {fill['last'][:16]} UTC; "
        f"loaded with COPY in {fill['copy_s']} s, then `VACUUM ANALYZE`.",
        "",
        f"Request, through the router under {seq['server']}: `POST /api/stats` "
        f'`{{"model": "{req["model"]}", "from": "{req["from"]}", "to": "{req["to"]}"}}` '
        f"(7 days; the answer has {s['answer']['points']} points, bucket `{s['answer']['bucket']}`).",
        "",
    ]
    lines += _table(
        ["measure", "p50", "p99", "throughput", "failures"],
        [
            [
                f"{seq['n']} sequential requests (c=1)",
                f"{seq['total_p50_ms']:.1f} ms",
                f"{seq['total_p99_ms']:.1f} ms",
                "-",
                str(seq["errors"]),
            ],
            [
                f"wrk, {conc['connections']} connections, {conc['duration_s']:.0f} s",
                f"{conc['p50_ms']:.1f} ms",
                f"{conc['p99_ms']:.1f} ms",
                f"{conc['rps']:.1f} req/s",
                str(conc["errors"] + conc["status_errors"]),
            ],
            [
                "`queries.model_stats()` in process (no HTTP)",
                f"{ex['in_process_ms_p50']:.1f} ms",
                "-",
                "-",
                "-",
            ],
        ],
    )
    plan = ex["explain"]
    used = re.findall(r"(?:Index Only Scan|Index Scan|Bitmap Index Scan) (?:using|on) (\w+)", plan)
    removed = re.search(r"Rows Removed by Filter: (\d+)", plan)
    took = re.search(r"Execution Time: ([\d.]+) ms", plan)
    lines += [
        "",
        f"PostgreSQL runs the main query in {took.group(1) if took else '?'} ms"
        + (f", reading the index {', '.join(f'`{u}`' for u in used)}" if used else ", without an index")
        + (
            f" and dropping {int(removed.group(1)):,} rows of other models after reading them"
            if removed
            else ""
        )
        + ". "
        + STATS_NOTES,
        "",
        "The main query (the time series; the other statements read the all-time totals):",
        "",
        "```sql",
        ex["main_sql"],
        "```",
        "",
        "```",
        ex["explain"],
        "```",
    ]
    return lines


STATS_NOTES = (
    "(A note kept by hand in bench/report.py:) with data inserted in time order the planner "
    "prefers the timestamp index, "
    "whose order matches the table's, to the (model, timestamp, endpoint) one; forcing the latter "
    "gave about the same time here (65 against 78 ms), because sorting the range's ~24,000 rows "
    "by (endpoint, hour) and summing them is half of the work. A covering index "
    "(model, timestamp) INCLUDE (endpoint and the counts) would allow an index-only scan."
)

PROFILE_NOTES = """\
Found with py-spy on the router while wrk ran streamed chat at c=32. This section is kept by
hand in bench/report.py (`PROFILE_NOTES`); everything above it is regenerated by every run.

Now (`py-spy record --pid <router> -f raw -r 400 --nonblocking --gil`: only samples where the
loop thread holds the GIL, i.e. CPU; without `--gil` py-spy piles samples onto whatever line
sits next to a system call, `asyncio.get_running_loop()` and log writes among them, which
sent an earlier round of tuning after costs that A/B runs then showed were not there):

- daphne, streaming `/api/chat`: the aiohttp client about 30%, the router's own code 24%,
  Twisted 15%, asyncio 13%, daphne 7%, Django 3%, the recorder 2%, logging 2%.
- uvicorn, streaming `/v1/chat/completions`: aiohttp 35%, the router 28%, uvicorn 17%,
  asyncio 7%, the recorder 3%, logging 2%.

What is left is mostly per HTTP chunk inside aiohttp: a streamed reply arrives chunk-encoded,
one chunk per token, and for each one aiohttp's parser calls `feed_data` and
`end_http_chunk_receiving`, and `readany()` pops it again with `_read_nowait_chunk`, all in
Python: roughly 2 us a token even when a whole reply arrives in one read (aiohttp 3.14 added
a parser re-feed per chunk on top, hence the pin to 3.13 below). That, and not the
router's relay, is most of the gap between the streamed and whole replies in the CPU table
above. Going below it would need an upstream client of our own (an asyncio protocol on
httptools); not done.

Earlier (plain `py-spy record`, 250 samples/s, before the changes below), by library:
Twisted + daphne about 23%, aiohttp 17%, asyncio 15%, httpx 13%, the router 11%, Django 3%.
The largest single costs then were httpx's request layer on the hot path (`build_request`
~140 us a request; the proxy now calls aiohttp directly), Twisted's form parsing of every
POST, the epoll registration of every write burst, and a fresh `asyncio.timeout` around
every upstream read.

Changes made from these measurements:

- `routing/server/daphne_hooks.py`: Twisted's POST form parsing switched off for daphne's requests.
  Router CPU per request, A/B in one run (old and new router side by side, 3 rounds):
  streaming `/api/chat` c=32 3.07 -> 2.36 ms, non-streaming c=32 2.33 -> 2.19 ms, streaming
  `/v1/chat/completions` c=32 3.04 -> 2.81 ms, non-streaming c=1 2.71 -> 2.46 ms.
- `routing/server/daphne_hooks.py`: daphne listens with a backlog of 2048 instead of Twisted's 50. With
  1,000 streams opened within a second the kernel counted 1,361 listen-queue overflows and
  966 SYN retransmits; streams whose SYN was dropped started 1 to 3 s late, so only 876 to
  934 were ever open at once (backend peak 469 to 678). After: 0 overflows, 1,000 open at once,
  876 to 1,000 at the backend, and the relay rate rose from 4,400-5,000 to 6,900-7,400 chunks/s.
- `routing/upstream/client.py`: the shared upstream client keeps no cookie jar. httpx stored every
  backend's cookies and sent them with all later requests of every user; parsing them cost
  ~45 us per reply.
- TCP_NODELAY: strace shows every accepted socket getting `setsockopt(fd, SOL_TCP,
  TCP_NODELAY, [1])`, but (found later) that call is Twisted's own: since 24.7 its
  HTTPChannel sets it. The router's hook was set on the protocol daphne's factory returns, a
  proxy whose makeConnection goes straight to the channel, so it never ran; it now wraps the
  channel's connectionMade (and keeps setting TCP_NODELAY, for an older Twisted).
- `routing/server/daphne_hooks.py`: replies leave without asking epoll. Twisted registered each
  socket for writability on every write burst and unregistered it after the send: two
  `epoll_ctl` per reply (per chunk for a slow stream) and one more poll event. The send is
  now scheduled with `call_soon` (still one `send` for a reply's head and body); strace at
  c=1: epoll_ctl 2 per request -> none. With that, daphne's own access-log line for proxied
  requests (the router logs its own), a light request object instead of Django's
  `ASGIRequest`, exact-path view lookup, a cheaper snapshot notification and histogram: router
  CPU per request, A/B in one run, c=1 0.81 -> 0.69 ms (whole), 0.89 -> 0.82 (stream); c=32
  0.57 -> 0.48 ms (stream /api/chat), 0.64 -> 0.55 (stream /v1), 0.47 -> 0.39 (whole).
  Under 1,000 slow streams the replies' first bytes came 1.2 s (p50) after connecting before,
  70 ms after; the relay rate went from 78% to 99% of direct.
- `routing/engine/proxy.py`: the proxied request calls aiohttp directly (httpx stays for probes and
  fan-out, over the same connection pool): router CPU per request -17 to -21% in an A/B run.
- `routing/protocols/common/streams.py`, `routing/upstream/client.py`: a fast path for whole SSE token
  events, one gap timer per stream instead of aiohttp's re-armed timer per read, include_usage appended
  to the client's bytes: each measurably cheaper in isolation (an SSE reply read at once
  22 -> 14 us), but within the noise of an A/B run (1-3%); kept because they cost nothing.
- `requirements.txt`: aiohttp pinned to 3.13.5 instead of 3.14.5. Found with cProfile on the
  router in process: aiohttp 3.14's StreamReader calls `resume_reading()` after every HTTP
  chunk it hands out, paused or not, and that re-feeds the parser (`data_received(b"")`): 34
  extra call chains per streamed reply of 32 tokens. 3.13 makes the call only when reading
  was paused. Side by side under uvicorn (same code, two virtualenvs, 3 rounds): router CPU
  per request, streaming `/api/chat` c=32 0.36-0.37 -> 0.33 ms, streaming
  `/v1/chat/completions` c=32 0.39 -> 0.35 ms, whole replies c=32 0.25 -> 0.24 ms, whole c=1
  0.46 -> 0.43-0.44 ms; `/v1` streaming went from 0.49-0.50 to 0.53-0.54 of direct.
- Tried and dropped: running daphne's Twisted reactor on uvloop: 3 to 8% less CPU, not worth
  a launcher of our own in front of daphne's.
- Packages by role (issue 13: the flat `routing/` split into server, protocols, status, engine,
  fleet, upstream, auth, observability and core; accounting through sinks, signals instead of
  listener lists, a principal on every request). `python -m bench.ab` against the commit before
  (15c13fa), router CPU per request B/A: daphne c=32 0.95 (stream `/api/chat`), 0.89 (whole),
  1.04 (stream `/v1`); daphne c=1 0.91, 0.99, 0.97; uvicorn c=32 1.05, 0.97, 0.95. An A/A run
  (15c13fa against itself, daphne c=32) gave 1.05, 0.99, 1.12: every figure is within noise.
"""


METHOD = """\
## How it was measured

```sh
make bench   # = .venv/bin/python -m bench.run; installs wrk with apt-get when missing (as root)
# this run: {command}
```

- Fake backends (`bench/fake_backend.py`), each its own process: an Ollama one (`/api/chat`,
  NDJSON) and an OpenAI-compatible one (`/v1/chat/completions`, SSE), **{tokens} tokens per
  reply**, {delay:g} s per token, one streamed chunk per token.
- The router, one process: `daphne -b 127.0.0.1 -p PORT nomyo_site.asgi:application` as
  `make run` starts it{uvicorn}; a scratch SQLite
  database; endpoints with `max_concurrent_connections` 64, so the router's own limit never
  queues a request; default settings (its logs on, written to a file).
- Throughput and latency: `wrk -t1 -cC -dD --timeout=10s -s bench/post.lua URL`, {duration:g} s
  per run, {rounds} round(s); each round runs direct, then each router, back to back (reversed
  in the next round). Throughput is the requests over the summed time of the rounds; latencies
  are the median of the rounds' wrk percentiles, from the request sent to the last byte of the
  reply (the whole stream). A failure is a socket error, a timeout or a reply that is not
  2xx/3xx. Before measuring, one reply per target is checked to be 200 and complete.
- CPU ms/req: a process's user + system CPU time (`/proc/PID/stat`) over the run, per
  request: the router's, and the fake backend's in the direct runs.
- Time to first byte: {ttfb} sequential streamed requests per target on one keep-alive
  connection (`bench/loadgen.py`, a small asyncio HTTP/1.1 client), from the request's first
  byte sent to the first byte of the reply's body (the first token's chunk).
- Slow streams: {slow:,} concurrent streamed `/api/chat` requests, one connection each,
  started evenly over 1 s, against a fake that sends {slow_tokens} tokens {slow_ms:g} ms apart
  (ideal stream {ideal:.1f} s). A stream counts when it is 200, complete and ends with Ollama's
  `"done":true` line. "Open at once" is the most streams the client had open together;
  "backend peak" the fake's own peak of concurrent requests (lower when the router forwards
  the last requests after the first streams ended); "chunks/s" the token chunks that reached
  the client per second of the whole test; "reply starts" the time from connecting to the
  reply's first byte (while 1,000 requests arrive within a second, each also has to wait for
  the router to admit the ones before it). The router's RSS is sampled from
  `/proc/PID/status` every 50 ms.
"""


def method_args(results: dict[str, Any]) -> dict[str, Any]:
    o = results["options"]
    uvicorn = "uvicorn" in routers(results)
    return {
        "command": o["command"],
        "tokens": o["tokens"],
        "delay": o["delay"],
        "uvicorn": ",\n  and `uvicorn nomyo_site.asgi:application --no-access-log` beside it"
        if uvicorn
        else "",
        "duration": o["duration"],
        "rounds": o["rounds"],
        "ttfb": o["ttfb_requests"],
        "slow": o["slow_streams"],
        "slow_tokens": o["slow_tokens"],
        "slow_ms": o["slow_delay"] * 1000,
        "ideal": o["slow_tokens"] * o["slow_delay"],
    }


def markdown(results: dict[str, Any]) -> str:
    m, o = results["meta"], results["options"]
    v = m["versions"]
    lines = [
        "# Benchmarks",
        "",
        "<!-- Written by `make bench` (bench/run.py): edit bench/report.py, not this file. -->",
        "",
        f"Generated by `make bench` on **{m['date']}** in {m['wall_s']:.0f} s. Every figure is the router "
        "against the same fake backend reached directly, measured back to back in the same run; "
        "the machine is shared and noisy, so read the ratios, not the absolute numbers.",
        "",
        "## Machine",
        "",
        *_table(
            ["", ""],
            [
                ["code", f"`{m.get('commit', '-')}`"],
                ["CPUs (nproc)", str(m["nproc"])],
                ["CPU model", m["cpu"]],
                ["memory", f"{m['memory_gb']} GB"],
                ["kernel", m["kernel"]],
                ["Python", m["python"]],
                ["load generator", m["wrk"]],
                [
                    "servers",
                    f"daphne {v['daphne']} (Twisted {v['Twisted']}), uvicorn {v['uvicorn']}, "
                    f"Django {v['Django']}",
                ],
                [
                    "upstream client",
                    f"aiohttp {v['aiohttp']} for proxied requests; httpx {v['httpx']} over it"
                    " (httpx-aiohttp) for probes and fan-out",
                ],
                [
                    "load average (1, 5, 15 min)",
                    f"start {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}; "
                    f"end {', '.join(f'{x:.2f}' for x in m['loadavg_end'])}",
                ],
            ],
            "ll",
        ),
        "",
        *METHOD.format(**method_args(results)).splitlines(),
        "",
        "## Targets",
        "",
        *targets_table(results),
        "",
        "## Throughput",
        "",
        *throughput_table(results),
        "",
        "## Latency (ms, wrk)",
        "",
        *latency_table(results),
        "",
        "### Added by the router at low concurrency (ms, router minus direct)",
        "",
        *added_table(results),
        "",
        "## CPU per request",
        "",
        "The same runs seen as CPU time (`/proc/PID/stat`, user + system, median of the rounds), which "
        'the other load on a shared machine disturbs far less than throughput. "req/s per core" is '
        'what one fully available core would carry at that cost; the "CPU-bound ratio" is the '
        "backend's CPU per request over the router's: the throughput ratio to expect when the router "
        "and the backend each have a core of their own (the router is one process, one thread).",
        "",
        *cpu_table(results),
        "",
        "## Time to first byte (ms)",
        "",
        *ttfb_table(results),
        "",
    ]
    first = results.get("first_request") or {}
    if first:
        lines += [
            "First routed request after start-up (streamed `/api/chat`, right after the router "
            "answered its first request): "
            + ", ".join(f"{s} {_f(ms, 1)} ms" for s, ms in first.items())
            + ".",
            "",
        ]
    lines += [
        f"## {o['slow_streams']:,} concurrent slow streams",
        "",
        *slow_table(results),
        "",
        *memory_section(results),
        *fairness.section(results),
        *affinity.section(results),
        "## `/api/stats` over 1,000,000 time-series rows (PostgreSQL)",
        "",
        *stats_section(results),
        "",
        "## Where the router's time goes",
        "",
        PROFILE_NOTES.rstrip(),
        "",
    ]
    return "\n".join(lines)


def summary_text(results: dict[str, Any]) -> str:
    lines = ["Targets:"]
    for t in results.get("targets", []):
        verdict = "n/a" if t["pass"] is None else ("pass" if t["pass"] else "FAIL")
        shown = t["shown"] if t["shown"] is not None else _f(t["value"])
        lines.append(f"  [{verdict:4s}] {t['name']}: {shown} (limit {t['limit']})")
    lines.append("")
    lines += throughput_table(results)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Re-render a saved run: python -m bench.report bench/results/bench-*.json [--doc PATH]."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("results", type=Path)
    parser.add_argument(
        "--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    )
    parser.add_argument(
        "--memory-section",
        action="store_true",
        help="only replace the doc's memory section with the one of these results (a `--only memory` run)",
    )
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    results["targets"] = evaluate(results)
    if args.memory_section:
        args.doc.write_text(splice_section(args.doc.read_text(), memory_section(results)))
        print("\n".join(memory_section(results)))
        return 0
    args.doc.write_text(markdown(results))
    print(summary_text(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
