"""The affinity phase of `make bench` (bench/run.py `--only affinity`), also runnable alone:

    .venv/bin/python -m bench.affinity              # writes its section of docs/benchmarks.md
    .venv/bin/python -m bench.affinity --no-doc --conversations 10 --turns 4

Prompt-cache affinity, on against off. Three fake Ollama servers (bench/fake_backend.py), each
with a cap (`max_concurrent_connections`) and a prompt prefix cache: the time to first token is
`prefill` seconds per prompt token the server has not cached, and a server caches a bounded
number of prompt prefixes (least recently used out). CONVERSATIONS clients talk at once, each
TURNS turns of streamed /api/chat, every turn sending the whole conversation so far (a shared
system prompt, an opening message of its own, the replies and the next questions), with a
random pause between turns. Nothing tells the router which conversation a request belongs to:
the affinity key is the prompt's stable prefix. The same load runs against a router with
ROUTER_AFFINITY=0 and one with it on (fresh routers, the fakes' caches and counters reset).

Measured: the prefix cache's hits at the fakes (turns 2+ that found their conversation's
earlier prefix; cached share of all prompt tokens), time to first token at the client (mean,
p95), requests per server, and the most requests a server ever ran at once (never above its cap).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import procs
from bench.loadgen import percentile

MODEL = "chat:latest"
DOC = procs.REPO / "docs" / "benchmarks.md"
HEADING = "## Prompt-cache affinity"
WORDS = "river stone lamp orbit cedar quartz harbor pixel meadow signal copper violet lantern".split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _post(url: str, data: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


async def _converse(
    http: httpx.AsyncClient,
    index: int,
    *,
    turns: int,
    think: float,
    opening_words: int,
    question_words: int,
    system: str,
    ttfts: list[float],
    failures: list[str],
) -> None:
    rng = random.Random(1000 + index)
    messages: list[dict[str, str]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": f"conversation {index}: {_text(rng, opening_words)}"},
    ]
    await asyncio.sleep(rng.uniform(0, think))  # the conversations do not all start in step
    for turn in range(turns):
        started = time.perf_counter()
        first: float | None = None
        reply: list[str] = []
        async with http.stream("POST", "/api/chat", json={"model": MODEL, "messages": messages}) as resp:
            if resp.status_code != 200:
                failures.append(f"{resp.status_code}: {(await resp.aread())[:200]!r}")
                return
            async for line in resp.aiter_lines():
                if not line:
                    continue
                if first is None:
                    first = time.perf_counter() - started
                chunk = json.loads(line)
                reply.append(chunk.get("message", {}).get("content", ""))
        if first is not None:
            ttfts.append(first)
        messages.append({"role": "assistant", "content": "".join(reply)})
        if turn + 1 < turns:
            messages.append({"role": "user", "content": _text(rng, question_words)})
            await asyncio.sleep(rng.uniform(think / 2, think * 1.5))


async def _load(url: str, opts: argparse.Namespace) -> dict[str, Any]:
    ttfts: list[float] = []
    failures: list[str] = []
    system = "You are a helpful assistant for a bench. " + _text(random.Random(7), opts.system_words)
    limits = httpx.Limits(max_connections=opts.conversations + 10)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await asyncio.gather(
            *(
                _converse(
                    http,
                    i,
                    turns=opts.turns,
                    think=opts.think,
                    opening_words=opts.opening_words,
                    question_words=opts.question_words,
                    system=system,
                    ttfts=ttfts,
                    failures=failures,
                )
                for i in range(opts.conversations)
            )
        )
    return {"ttfts": ttfts, "failures": failures, "wall_s": time.perf_counter() - started}


def _one_run(
    mode: str, fakes: list[procs.Proc], db: str, log_dir: Path, opts: argparse.Namespace
) -> dict[str, Any]:
    env = {"ROUTER_AFFINITY": "1" if mode == "on" else "0", "ROUTER_AFFINITY_WAIT": str(opts.wait)}
    router = procs.start_router(
        opts.server, database_url=db, log_dir=log_dir, name=f"router-affinity-{mode}", extra_env=env
    )
    try:
        # one request so the router knows every server's models, then a clean slate at the fakes
        warm = {"model": MODEL, "stream": False, "messages": [{"role": "user", "content": "warm up"}]}
        _post(router.url + "/api/chat", warm)
        for fake in fakes:
            _post(fake.url + "/_fake/reset", {})
        measured = asyncio.run(_load(router.url, opts))
    finally:
        router.stop()
    per_server = []
    for fake in fakes:
        stats = _get(fake.url + "/_fake/stats")
        per_server.append(
            {
                "server": fake.name,
                "requests": stats["requests"].get("/api/chat", 0),
                "max_in_flight": stats["max_in_flight"].get(MODEL, 0),
                "prefix": stats["prefix"],
            }
        )
    prefix = {k: sum(s["prefix"][k] for s in per_server) for k in per_server[0]["prefix"]}
    ttfts = measured["ttfts"]
    later_turns = prefix["requests"] - opts.conversations  # turns 2+, the ones that can hit
    return {
        "mode": mode,
        "requests": prefix["requests"],
        "failures": measured["failures"],
        "hit_rate": prefix["hits"] / later_turns if later_turns > 0 else 0.0,
        "token_hit_rate": prefix["cached_tokens"] / prefix["prompt_tokens"]
        if prefix["prompt_tokens"]
        else 0.0,
        "ttft_mean_ms": statistics.fmean(ttfts) * 1000 if ttfts else float("nan"),
        "ttft_p95_ms": percentile(ttfts, 95) * 1000 if ttfts else float("nan"),
        "per_server": per_server,
        "wall_s": measured["wall_s"],
    }


def run(log_dir: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """The phase: fakes, a database with them, then a router with affinity off and one with it on."""
    started: list[procs.Proc] = []
    try:
        for i in range(opts.servers):
            fake = procs.start_fake(
                f"fake-affinity-{i + 1}",
                kind="ollama",
                models=[MODEL],
                tokens=opts.tokens,
                delay=opts.delay,
                log_dir=log_dir,
            )
            started.append(fake)
            _post(fake.url + "/_fake/config", {"prefill": opts.prefill, "prefix_cache": opts.cache})
        spec = [{"name": f.name, "url": f.url, "kind": "ollama", "limit": opts.cap} for f in started]
        db = procs.fleet_database(log_dir / "affinity.sqlite3", spec)
        runs = [_one_run(mode, started, db, log_dir, opts) for mode in ("off", "on")]
    finally:
        for proc in reversed(started):
            proc.stop()
    return {
        "server": opts.server,
        "conversations": opts.conversations,
        "turns": opts.turns,
        "servers": opts.servers,
        "cap": opts.cap,
        "prefill_ms_per_token": opts.prefill * 1000,
        "cache_entries": opts.cache,
        "tokens": opts.tokens,
        "delay_ms": opts.delay * 1000,
        "think_s": opts.think,
        "wait_s": opts.wait,
        "runs": runs,
    }


def section(results: dict[str, Any]) -> list[str]:
    """The "Prompt-cache affinity" section of docs/benchmarks.md."""
    a = results.get("affinity")
    if not a:
        return []
    date = results.get("meta", {}).get("date", "")
    command = results.get("command") or results.get("options", {}).get("command", "python -m bench.run")
    lines = [
        HEADING,
        "",
        f"Recorded on {date} (`{command}`). "
        f"{a['conversations']} conversations of {a['turns']} turns at once, streamed `/api/chat`, over "
        f"{a['servers']} fake Ollama servers with a cap of {a['cap']} each and a prompt prefix cache of "
        f"{a['cache_entries']} prefixes each (prefill {a['prefill_ms_per_token']:g} ms per uncached prompt "
        f"token before the first token; {a['tokens']} tokens a reply at {a['delay_ms']:g} ms each; "
        f"{a['think_s']:g} s mean pause between turns). Every turn sends the whole conversation; "
        "nothing names the conversation, so the key is the prompt's prefix. "
        f"`ROUTER_AFFINITY_WAIT` {a['wait_s']:g} s; {a['server']}. Hit rate: the turns 2 to "
        f"{a['turns']} that found their conversation's earlier prompt cached at the server they reached "
        "(a first turn has nothing to find); cached tokens: the share of all prompt tokens "
        "the servers did not have to prefill.",
        "",
        "| affinity | hit rate (turns 2+) | cached tokens | TTFT mean | TTFT p95 "
        "| requests per server | most at once per server (cap) | failed |",
        "|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in a["runs"]:
        spread = " / ".join(str(s["requests"]) for s in r["per_server"])
        peak = " / ".join(str(s["max_in_flight"]) for s in r["per_server"])
        lines.append(
            f"| {r['mode']} | {r['hit_rate'] * 100:.1f}% | {r['token_hit_rate'] * 100:.1f}% "
            f"| {r['ttft_mean_ms']:.0f} ms | {r['ttft_p95_ms']:.0f} ms | {spread} "
            f"| {peak} ({a['cap']}) | {len(r['failures'])} |"
        )
    lines += [
        "",
        "With affinity every later turn finds its prefix; the cached share of tokens stays below 100% "
        "because each first turn, and each turn's new messages (the last reply and the next "
        "question), are prefilled anyway. Without it a turn lands on a server that has seen "
        "the conversation only by chance, and finds at best an older, shorter prefix there.",
        "",
    ]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.affinity", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", choices=("daphne", "uvicorn"), default="daphne")
    p.add_argument("--conversations", type=int, default=50)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--servers", type=int, default=3)
    p.add_argument("--cap", type=int, default=4, help="max concurrent connections per server")
    p.add_argument("--prefill", type=float, default=0.0002, help="seconds per uncached prompt token")
    p.add_argument("--cache", type=int, default=32, help="prompt prefixes each server caches")
    p.add_argument("--tokens", type=int, default=16, help="tokens per reply")
    p.add_argument("--delay", type=float, default=0.005, help="seconds per generated token")
    p.add_argument("--think", type=float, default=1.0, help="mean seconds between a reply and the next turn")
    p.add_argument("--wait", type=float, default=1.0, help="ROUTER_AFFINITY_WAIT of the router")
    p.add_argument("--system-words", type=int, default=40)
    p.add_argument("--opening-words", type=int, default=120)
    p.add_argument("--question-words", type=int, default=30)
    p.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench import report  # the doc splicer; report imports this module

    args = argv if argv is not None else sys.argv[1:]
    opts = parse_args(args)
    with tempfile.TemporaryDirectory(prefix="nomyo-affinity-") as tmp:
        results: dict[str, Any] = {
            "meta": {"date": datetime.now(tz=UTC).strftime("%Y-%m-%d %H:%M UTC")},
            "command": " ".join(["python -m bench.affinity", *args]),
            "affinity": run(Path(tmp), opts),
        }
    text = "\n".join(section(results))
    print(text)
    print(json.dumps(results["affinity"]["runs"], indent=1))
    if not opts.no_doc:
        DOC.write_text(report.splice_section(DOC.read_text(), section(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
