"""The report as one self-contained HTML page: inline CSS and SVG charts, no script, nothing fetched.

Drawn from the data `runner.report.build` returns, so the page and `--json` never disagree.
"""

from __future__ import annotations

from datetime import date, timedelta
from html import escape
from typing import Any

# Colour-blind-safe (Okabe-Ito), cycled when there are more modules than colours.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
WIDTH, HEIGHT, PAD = 720, 260, 40

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; background: #fff; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; }
.new { color: #b00; font-weight: bold; } .gone { color: #080; } .regression { color: #b00; font-weight: bold; }
svg { background: #fafafa; border: 1px solid #ddd; }
svg text { font: 11px system-ui, sans-serif; fill: #444; }
"""


def _days(since: str, until: str) -> list[str]:
    first, last = date.fromisoformat(since), date.fromisoformat(until)
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def ratings_chart(series: dict[str, dict[str, float]], since: str, until: str) -> str:
    """Mean rating (1..5) per module and day: a line per module, a dot per day that has ratings."""
    days = _days(since, until)
    step = (WIDTH - 2 * PAD) / max(len(days) - 1, 1)

    def x(day: str) -> float:
        return PAD + days.index(day) * step

    def y(rating: float) -> float:
        return HEIGHT - PAD - (rating - 1) / 4 * (HEIGHT - 2 * PAD)

    parts = [f'<svg id="ratings-chart" width="{WIDTH}" height="{HEIGHT + 20 * len(series)}" role="img">']
    for level in range(1, 6):
        parts.append(f'<line x1="{PAD}" x2="{WIDTH - PAD}" y1="{y(level):.1f}" y2="{y(level):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{PAD - 14}" y="{y(level) + 4:.1f}">{level}</text>')
    parts.append(f'<text x="{PAD}" y="{HEIGHT - 10}">{escape(since)}</text>')
    parts.append(f'<text x="{WIDTH - PAD - 60}" y="{HEIGHT - 10}">{escape(until)}</text>')
    for i, (module, by_day) in enumerate(sorted(series.items())):
        colour = PALETTE[i % len(PALETTE)]
        points = [(x(d), y(r), d, r) for d, r in sorted(by_day.items()) if d in days]
        line = " ".join(f"{px:.1f},{py:.1f}" for px, py, _, _ in points)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for px, py, day, rating in points:
            label = escape(f"{module} {day}: {rating:.2f}")
            parts.append(
                f'<circle class="point" cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{colour}">'
                f"<title>{label}</title></circle>"
            )
        ly = HEIGHT + 14 + 20 * i
        parts.append(f'<rect x="{PAD}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{PAD + 16}" y="{ly}">{escape(module)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def error_chart(tools: list[dict[str, Any]]) -> str:
    """Error rate per tool: a horizontal bar each, 0 to 100 %."""
    row, label_w = 18, 220
    height = PAD + row * len(tools)
    scale = WIDTH - label_w - PAD
    parts = [f'<svg id="errors-chart" width="{WIDTH}" height="{height}" role="img">']
    for i, tool in enumerate(tools):
        rate = tool["error_rate"] or 0.0
        top = 10 + i * row
        colour = "#D55E00" if rate else "#009E73"
        label = escape(f"{tool['tool']}: {tool['errors']} of {tool['calls']} calls failed")
        parts.append(f'<text x="4" y="{top + 12}">{escape(tool["tool"])}</text>')
        # A zero rate still gets a sliver, so every tool has a visible mark.
        parts.append(
            f'<rect class="bar" x="{label_w}" y="{top}" width="{max(rate * scale, 2):.1f}" height="{row - 4}" '
            f'fill="{colour}"><title>{label}</title></rect>'
        )
        parts.append(f'<text x="{label_w + max(rate * scale, 2) + 6:.1f}" y="{top + 12}">{rate:.0%}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: tuple[str, ...], rows: list[tuple[Any, ...]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(
            f'<td class="num">{c}</td>' if isinstance(c, (int, float)) else f"<td>{escape(str(c))}</td>" for c in row
        )
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(report: dict[str, Any]) -> str:
    period = report["period"]
    findings = report["findings"]
    finding_rows = [
        (
            f["id"],
            f["status"],
            f["tool"],
            f["cause_class"],
            f["cause"],
            f["calls"],
            f["ticks"],
            f["personas"],
            f["first_seen"],
            f["last_seen"],
        )
        for f in findings
    ]
    module_rows = [
        (
            m["module"],
            m["ticks"],
            m["calls"],
            _num(m["error_rate"]),
            _num(m["rating_mean"]),
            m["rating_n"],
            _num(m["trend"]["recent_mean"]),
            _num(m["trend"]["prior_mean"]),
            _num(m["trend"]["delta"]),
            "yes" if m["trend"]["regression"] else "no",
        )
        for m in report["modules"]
    ]
    cov = report["coverage"]
    title = f"What the personas found, {period['since']} to {period['until']}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
            f"<h1>{escape(title)}</h1>",
            "<h2>Ratings per module over days</h2>",
            ratings_chart(report["ratings_by_day"], period["since"], period["until"]),
            "<h2>Error rate per tool</h2>",
            error_chart(report["tools"]),
            "<h2>Findings</h2>",
            _table(
                ("id", "status", "tool or stage", "class", "cause", "calls", "ticks", "personas", "first", "last"),
                finding_rows,
                [f["status"] for f in findings],
            ),
            "<h2>Modules</h2>",
            _table(
                ("module", "ticks", "calls", "error rate", "rating", "n", "recent", "prior", "delta", "regression"),
                module_rows,
                ["regression" if m["trend"]["regression"] else "" for m in report["modules"]],
            ),
            "<h2>Coverage</h2>",
            f"<p>{cov['exercised']} of {cov['served']} served tools exercised. Never called: "
            f"{escape(', '.join(cov['never_called']) or 'none')}. Asked for without a tool: "
            f"{escape(', '.join(cov['demand_without_tool']) or 'none')}.</p>",
            *_cost(report["cost"]),
            "</body></html>",
        ]
    )


def _cost(cost: dict[str, Any]) -> list[str]:
    usd = "{:.4f}".format
    return [
        f"<h2>Cost</h2><p>USD {usd(cost['total_usd'])} in the period; "
        "per module and per tick within the journal's retention.</p>",
        _table(("day (UTC)", "USD", "model calls"), [(d["day"], usd(d["usd"]), d["calls"]) for d in cost["by_day"]]),
        _table(
            ("persona", "USD", "model calls"), [(p["persona"], usd(p["usd"]), p["calls"]) for p in cost["by_persona"]]
        ),
        _table(("module", "USD"), [(m["module"], usd(m["usd"])) for m in cost["by_module"]]),
        _table(
            ("most expensive tick", "persona", "USD", "model calls", "modules"),
            [
                (t["tick"], t["persona"], usd(t["usd"]), t["model_calls"], ", ".join(t["modules"]))
                for t in cost["costly_ticks"]
            ],
        ),
    ]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
