"""Turn the bench's results into target checks, a Markdown report and PNG charts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MB = 1024 * 1024
RSS_GROWTH_LIMIT = 0.10
"""RSS "flat": at 100% of the soak at most 10% above its value at 10%."""


def _label(size: str | int) -> str:
    size = int(size)
    return f"{size:,} counter" + ("" if size == 1 else "s")


def _rate(stats: dict[str, Any]) -> str:
    return f"{stats['median']:,.0f} [{stats['min']:,.0f}-{stats['max']:,.0f}]"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def checks(results: dict[str, Any]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []

    def add(check: str, measured: str, ok: bool | None) -> None:
        out.append({"check": check, "measured": measured, "verdict": _verdict(bool(ok))})

    c = results["correctness"]
    add(
        "every counter correct after every run (else the run aborts)",
        f"{c['checked_runs']} runs checked",
        True,
    )
    for size, rows in results["throughput"].items():
        w = rows["worker"]["median"]
        if "ceiling" in rows:
            ratio = w / rows["ceiling"]["median"]
            add(
                f"worker >= 1/2 ceiling (DESIGN target), {_label(size)}",
                f"{ratio:.2f}x",
                ratio >= 0.5,
            )
        if "worker x2" in rows:
            ratio = rows["worker x2"]["median"] / w
            add(f"2 replicas >= 1 replica, {_label(size)}", f"{ratio:.2f}x", ratio >= 1.0)
        if "worker + metrics" in rows:
            ratio = rows["worker + metrics"]["median"] / w
            add(f"metrics cost at most ~3%, {_label(size)}", f"{ratio:.3f}x", ratio >= 0.97)
    if "contention" in results:
        reps = results["contention"]["replicas"]
        one, many = reps["1"], next(v for k, v in reps.items() if k != "1")
        k = len(many["per_run"][0]["applied"])
        ratio = many["median"] / one["median"]
        add(
            f"{k} replicas on 1 hot counter: total within 2x of 1 replica's",
            f"{ratio:.2f}x of 1 replica",
            ratio >= 0.5,
        )
        add(
            f"no replica starves ({k} replicas, 1 hot counter; each >= half its fair share)",
            f"smallest share {many['min_share']:.1%} (fair {1 / k:.0%})",
            many["min_share"] >= 0.5 / k,
        )
    if "soak" in results:
        s = results["soak"]
        low, high = s["rss"]["10%"], s["rss"]["100%"]
        add(
            f"worker RSS flat over {s['events']:,} events (100% <= 10% + {RSS_GROWTH_LIMIT:.0%})",
            f"{low / MB:.1f} MB -> {high / MB:.1f} MB ({(high - low) / MB:+.1f} MB)",
            high <= low * (1 + RSS_GROWTH_LIMIT),
        )
        add(
            "no exactly-once bookkeeping left after the soak's drain (sc:* keys but :v)",
            f"{len(s['bookkeeping_keys'])} keys",
            not s["bookkeeping_keys"],
        )
    left = c["bookkeeping_left"]
    add(
        "no exactly-once bookkeeping left after any worker run",
        f"{len(left)} keys over {c['worker_runs']} worker runs",
        not left,
    )
    return out


def markdown(results: dict[str, Any]) -> str:
    cfg, env = results["config"], results["environment"]
    lines = [
        "# stream-counter benchmark",
        "",
        f"{env['date']}, commit {env['commit']}; Python {env['python']}, Redis {env['redis']}, "
        f"{env['cpus']} CPUs ({env['machine']}). Each measurement: FLUSHALL, preload the same "
        f"seeded events (amounts 1..9, ~20% decr), drain, check every counter. Median of "
        f"{cfg['repeat']} run(s) [min-max]. Whole run: {results['seconds']:.0f} s. "
        "Command: `python -m bench.run" + (" --quick" if cfg["quick"] else "") + "`.",
        "",
    ]
    sets = list(results["throughput"])
    tp = results["throughput"]
    if sets:
        first = tp[sets[0]]
        lines += [
            "## Throughput, events/s",
            "",
            "| consumer | events/run | " + " | ".join(_label(s) for s in sets) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in sets) + " |",
        ]
        for name in first:
            shown = f"**{name}**" if name == "worker" else name
            cells = " | ".join(_rate(tp[s][name]) for s in sets)
            lines.append(f"| {shown} | {first[name]['events']:,} | {cells} |")
        lines += [""]
        lines += [f"- **{name}**: {desc}" for name, desc in results["consumers"].items()]
        lines += [
            "",
            "The slow per-message baselines run on the first "
            f"{min(cfg['events'], cfg['baseline_events']):,} events of the same data. Every "
            "consumer is a process of its own, timed from outside the same way: from the "
            "group's first read to entries-read = N with nothing pending. The ceilings "
            "use redis-py's Pipeline object, whose per-command cost in Python bounds "
            "them; `ceiling (summed)` sends one INCRBY per counter instead of one per event.",
            "",
            "## Worker / baseline (ratio of medians)",
            "",
            "| ratio | " + " | ".join(_label(s) for s in sets) + " |",
            "| --- | " + " | ".join("---:" for _ in sets) + " |",
        ]
        others = [n for n in first if n != "worker"]
        for name in others:
            if name in ("worker x2", "worker + metrics"):
                cells = [tp[s][name]["median"] / tp[s]["worker"]["median"] for s in sets]
                lines.append(f"| {name} / worker | " + " | ".join(f"{x:.2f}" for x in cells) + " |")
                continue
            cells = [tp[s]["worker"]["median"] / tp[s][name]["median"] for s in sets]
            lines.append(f"| worker / {name} | " + " | ".join(f"{x:.2f}" for x in cells) + " |")
        lines.append("")
    if "contention" in results:
        lines += _contention(results["contention"])
    if "soak" in results:
        lines += _soak(results["soak"])
    lines += ["## Checks", "", "| check | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {c['check']} | {c['measured']} | {c['verdict']} |" for c in results["checks"]]
    lines.append("")
    noise = results["correctness"]["worker_noise"]
    lines += ["## Worker warnings and errors logged", ""]
    if not noise:
        lines.append("None (stderr empty, no log line at WARNING or above).")
    for who, items in noise.items():
        lines.append(f"- {who}:")
        lines += [f"  - `{item[:300]}`" for item in items[:5]]
    lines.append("")
    return "\n".join(lines)


def _contention(c: dict[str, Any]) -> list[str]:
    reps = c["replicas"]
    field = next(iter(reps.values()))["wait_source"] == "lock_wait_ms"

    def pct(w: dict[str, float]) -> str:
        return " / ".join(f"{w[p]:.1f}" for p in ("p50", "p90", "p99", "max")) if w else "n/a"

    lines = [
        f"## Lock contention: 1 hot counter, {c['events']:,} events",
        "",
        "| replicas | events/s | applied share per replica (each run) "
        "| per replica: lock_busy (longest lock wait in one batch) "
        "| lock wait ms p50 / p90 / p99 / max | batch ms p50 / p90 / p99 / max |",
        "| ---: | ---: | --- | --- | --- | --- |",
    ]
    for k, r in reps.items():
        shares = "; ".join(" / ".join(f"{s:.0%}" for s in run["shares"]) for run in r["per_run"])
        busy = "; ".join(
            " / ".join(
                f"{b} ({w:.0f} ms)"
                for b, w in zip(run["lock_busy"], run["max_lock_wait_ms"], strict=True)
            )
            for run in r["per_run"]
        )
        wait = pct(r["wait_ms"]) if field else "not logged"
        lines.append(
            f"| {k} | {_rate(r)} | {shares} | {busy} | {wait} "
            f"| {pct(r['batch_ms'])} ({r['batches']} batches) |"
        )
    lines.append("")
    if field:
        lines.append(
            "Per batch, all replicas and runs pooled, from the DEBUG `batch` lines: "
            "`lock_wait_ms` (the worker's backoff while a lock is busy, within one batch) "
            "and `ms` (the whole batch). Shares are `applied` from each replica's `stopped` "
            "line; `lock_busy` counts busy-lock retries; runs are separated by `;`."
        )
    else:
        lines.append(
            "The worker logs no `lock_wait_ms`: only the time of each batch (`ms` of the "
            "DEBUG `batch` lines, all replicas and runs pooled) is shown; it includes the "
            "backoff while the lock is busy. With 1 replica it is pure work. Shares are "
            "`applied` from each replica's `stopped` line."
        )
    return [*lines, ""]


def _soak(s: dict[str, Any]) -> list[str]:
    rss = s["rss"]
    cells = [s["rss_idle"], rss["10%"], rss["50%"], rss["100%"], s["rss_max"]]
    return [
        f"## Memory soak: 1 worker, {s['events']:,} events, 100 counters "
        f"({s['rate']:,.0f} events/s)",
        "",
        "| worker RSS, MB | idle, before any event | 10% | 50% | 100% | max |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        "| | " + " | ".join(f"{x / MB:.1f}" for x in cells) + " |",
        "",
        "After the drain, Redis keys `sc:*` other than counter values (locks, markers): "
        f"**{len(s['bookkeeping_keys'])}**"
        + (
            ": " + ", ".join(f"`{k}`" for k in s["bookkeeping_keys"][:20])
            if s["bookkeeping_keys"]
            else ""
        )
        + ". Other keys besides the stream: "
        + (", ".join(f"`{k}`" for k in s["other_keys"]) or "none")
        + ".",
        "",
    ]


def charts(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    tp = results["throughput"]
    sets = list(tp)
    if sets:
        names = list(tp[sets[0]])
        fig, ax = plt.subplots(figsize=(11, 5.5))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(sets))]
            med = [tp[s][name]["median"] for s in sets]
            err = [
                [m - tp[s][name]["min"] for s, m in zip(sets, med, strict=True)],
                [tp[s][name]["max"] - m for s, m in zip(sets, med, strict=True)],
            ]
            bars = ax.bar(xs, med, width, yerr=err, capsize=2, label=name)
            ax.bar_label(bars, [f"{m / 1000:,.1f}k" for m in med], fontsize=7, padding=2)
        ax.set_yscale("log")
        ax.set_xticks(range(len(sets)), [_label(s) for s in sets])
        ax.set_ylabel("events/s (median, log scale)")
        cfg = results["config"]
        ax.set_title(
            f"stream-counter throughput, {cfg['events']:,} events "
            f"(plain/naive {min(cfg['events'], cfg['baseline_events']):,}), "
            f"median of {cfg['repeat']}"
        )
        ax.legend(fontsize=8, ncol=3)
        ax.grid(axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        path = out / "throughput.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    if "soak" in results:
        s = results["soak"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([p * 100 for _, p, _ in s["samples"]], [r / MB for _, _, r in s["samples"]])
        ax.set_xlabel("progress, % of events acknowledged")
        ax.set_ylabel("worker RSS, MB")
        ax.set_ylim(0, max(r for _, _, r in s["samples"]) / MB * 1.25)
        ax.set_title(f"worker RSS over {s['events']:,} events")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / "soak_rss.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
