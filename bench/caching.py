#!/usr/bin/env python
"""What a tick costs with prompt caching: real ticks against the caching Messages-API stand-in.

    .venv/bin/python bench/caching.py                       # 16 personas at concurrency 1, 4 and 8
    .venv/bin/python bench/caching.py --personas 32 --concurrency 8 --latency-ms 500
    .venv/bin/python bench/caching.py --tiny --out /tmp/x   # what the suite runs (6 personas)

Each concurrency gets a fresh world: the sandbox with its real 33-tool surface and N personas
(each with its own system prompt), a fresh stand-in (tests/fake_anthropic.py, a cold cache that
follows the API's caching rules) whose model answers after `--latency-ms`, and ONE round of the
runner as `once` wires it (`provider_factory` + `open_runtime` + `run_once`, the Anthropic
provider through the real SDK). All N ticks are due together: one burst.

Everything is measured from the stand-in's own records: the usage it reported, priced with the
runner's price table as Haiku 4.5; the cache entries it wrote, whether anything read them, and
how often the shared tool prefix was written. "Uncached" prices the same tokens as plain input.

The script runs against whatever runner sits beside it, so the shape before a change is measured
by running this script (with the stand-in and runner/cost.py) in a checkout of the older commit;
bench/README.md gives the commands.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench.run_bench import PERSONA_SPEC, SEED_SECRET, SERVICE_KEY, WEEKDAY  # noqa: E402  # the same fleet

MODEL = "claude-haiku-4-5"


async def measure(personas: int, concurrency: int, latency_s: float) -> dict[str, Any]:
    import httpx
    from anthropic.types import Usage
    from fake_anthropic import FakeAnthropic, default_brain

    from runner import log
    from runner.cost import DEFAULT_PRICES_FILE, cost_usd, load_prices
    from runner.dispatch import run_once
    from runner.runtime import open_runtime, provider_factory
    from runner.sandbox import Sandbox, SandboxConfig
    from runner.settings import load_settings

    log.configure("console", "warning")
    price = load_prices(DEFAULT_PRICES_FILE).models[MODEL]
    tmp = Path(tempfile.mkdtemp(prefix="persona-caching-"))
    catalog = tmp / "empty-catalog.json"
    catalog.write_text("[]")  # the due list is exactly the bench personas

    async def model(body: dict[str, Any]) -> Any:
        await asyncio.sleep(latency_s)
        return default_brain(body)

    config = SandboxConfig(
        db_path=str(tmp / "sandbox.db"),
        seed_secret=SEED_SECRET,
        service_key=SERVICE_KEY,
        personas_file=catalog,
        mcp_surface="real",
    )
    async with (
        Sandbox(config) as sandbox,
        FakeAnthropic(brain=model) as fake,
        httpx.AsyncClient(base_url=sandbox.api_url, timeout=60) as control,
    ):
        (await control.post("/__sandbox/clock", json={"now": WEEKDAY})).raise_for_status()
        for i in range(personas):
            # Each persona its own system prompt: only the tool list is shared.
            spec = {**PERSONA_SPEC, "name": f"cache{i:03d}", "systemPrompt": f"{PERSONA_SPEC['systemPrompt']} ({i})"}
            (await control.post("/__sandbox/personas", json=spec)).raise_for_status()
        settings = load_settings(
            mana_api_url=sandbox.api_url,
            mana_auth_url=sandbox.auth_url,
            mana_mcp_url=sandbox.mcp_url,
            mana_service_key=SERVICE_KEY,
            persona_seed_secret=SEED_SECRET,
            llm_provider="anthropic",
            anthropic_model=MODEL,
            anthropic_api_key="bench-key",
            anthropic_base_url=fake.base_url,
            persona_concurrency=concurrency,
            mana_login_rate="1000/1s",
            runner_env="development",
            node_env=None,
            runner_state_path=tmp / "runner.db",
            log_format="console",
            log_level="warning",
        )
        before = _outcomes()
        started = time.perf_counter()
        async with provider_factory(settings) as make_provider, open_runtime(settings, make_provider) as runtime:
            report = await run_once(runtime)
        wall_s = time.perf_counter() - started
        outcomes = {k: v - before.get(k, 0) for k, v in _outcomes().items() if v > before.get(k, 0)}

    ok = [x for x in fake.exchanges if x.status == 200]
    usages = [x.response["usage"] for x in ok]
    cost = sum(cost_usd(Usage.model_validate(u), price) for u in usages)
    uncached = sum(
        (
            (u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"]) * price.input
            + x.response["usage"]["output_tokens"] * price.output
        )
        * 1e-6
        for x, u in zip(ok, usages, strict=True)
    )
    later = [u for x, u in zip(ok, usages, strict=True) if len(x.body["messages"]) > 1]
    later_in = sum(u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"] for u in later)
    writes = fake.cache.writes
    ticks = len(report.ticks)
    return {
        "personas": personas,
        "concurrency": concurrency,
        "latency_ms": round(latency_s * 1000),
        "ticks": ticks,
        "outcomes": outcomes,
        "backlog": report.backlog,
        "requests": len(ok),
        "wall_s": round(wall_s, 2),
        "cost_per_tick_usd": cost / ticks if ticks else 0.0,
        "uncached_per_tick_usd": uncached / ticks if ticks else 0.0,
        "shared_prefix_writes": sum(1 for w in writes if w.level == "tools"),
        "writes": len(writes),
        "unread_writes": sum(1 for w in writes if not w.read),
        "unread_write_tokens": sum(w.paid for w in writes if not w.read),
        "hit_share_turns_2_plus": sum(u["cache_read_input_tokens"] for u in later) / later_in if later_in else 0.0,
        "tokens": {
            kind: sum(u[key] for u in usages)
            for kind, key in (
                ("input", "input_tokens"),
                ("cache_write", "cache_creation_input_tokens"),
                ("cache_read", "cache_read_input_tokens"),
                ("output", "output_tokens"),
            )
        },
    }


def _outcomes() -> dict[str, int]:
    """Ticks by outcome so far in this process, from the runner's own metric (not the journal's tables)."""
    from runner import metrics

    return {
        sample.labels["outcome"]: int(sample.value)
        for family in metrics.REGISTRY.collect()
        if family.name == "persona_ticks"
        for sample in family.samples
        if sample.name == "persona_ticks_total"
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| concurrency | ticks | cost/tick | uncached/tick | shared prefix writes | unread writes (tokens) "
        "| hit share, turns ≥ 2 | requests |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['concurrency']} | {r['ticks']} | ${r['cost_per_tick_usd']:.5f} | ${r['uncached_per_tick_usd']:.5f} "
            f"| {r['shared_prefix_writes']} | {r['unread_writes']} ({r['unread_write_tokens']}) "
            f"| {100 * r['hit_share_turns_2_plus']:.1f} % | {r['requests']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--personas", type=int, default=16)
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated PERSONA_CONCURRENCY values")
    parser.add_argument("--latency-ms", type=float, default=300, help="the stand-in model's time per answer")
    parser.add_argument("--tiny", action="store_true", help="6 personas, 50 ms: the suite's smoke run")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--name", default="latest")
    args = parser.parse_args()
    personas, latency_ms = (6, 50.0) if args.tiny else (args.personas, args.latency_ms)
    results = [
        asyncio.run(measure(personas, int(c), latency_ms / 1000)) for c in args.concurrency.split(",") if c.strip()
    ]
    base = results[0]["cost_per_tick_usd"]
    for r in results:
        r["cost_vs_first"] = r["cost_per_tick_usd"] / base - 1 if base else 0.0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    document = {
        "command": " ".join(["bench/caching.py", *sys.argv[1:]]),
        "commit": commit.stdout.strip(),
        "python": platform.python_version(),
        "model_priced_as": MODEL,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"caching-{args.name}.json").write_text(json.dumps(document, indent=2) + "\n")
    (args.out / f"caching-{args.name}.md").write_text(
        f"# caching, `{document['command']}` at {document['commit']}\n\n{table(results)}\n"
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
