#!/usr/bin/env python3
"""Turn bench/results/*.json into the docs' benchmark block (docs/benchmarks.md) and one PNG plot.

    python bench/report.py            # rewrite the block between the markers in docs/benchmarks.md, and the plot
    python bench/report.py --check    # exit 1 if the page's block differs from what the JSON renders

Only the text between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is generated;
the plot is docs/assets/bench.png (the page shows it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "assets" / "bench.png"
#: Docs pages with a block of their own (markers bench:NAME:start/end): page -> (block name, results key).
DOC_BLOCKS = {"docs/how-to/balancers.md": ("balancer", "defaults")}
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
NAMES = ("overhead", "slowclient", "workercpu", "scale", "surface", "syscalls", "defaults", "relay", "asyncidle", "deadworker")

MODE_LABELS = {
    "plain": "plain `accept()`",
    "defer": "kernel `TCP_DEFER_ACCEPT`",
    "dataready-c": "`dataready`, C core",
    "httpready-c": "`httpready`, C core",
    "dataready-python": "`dataready`, Python core",
    "httpready-python": "`httpready`, Python core",
    "dataready-c-defer": "`dataready`, C core, `defer_accept=1`",
    "httpready-c-defer": "`httpready`, C core, `defer_accept=1`",
    "httpready-python-defer": "`httpready`, Python core, `defer_accept=1`",
    "plain-selector": "plain, selector server",
    "httpready-c-selector": "`httpready`, C core, selector server",
}
SETUP_LABELS = {
    "no-attack": "no attack",
    "no-attack-acceptfilter": "no attack, acceptfilter `httpready`",
    "attack-unprotected": "attack, no protection",
    "attack-acceptfilter": "attack, acceptfilter `httpready`",
    "attack-nginx": "attack, nginx in front",
    "no-attack-nginx": "no attack, nginx in front",
}


def load(directory: Path = RESULTS) -> dict[str, dict[str, Any]]:
    out = {}
    for name in NAMES:
        path = directory / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def _n(x: Any, fmt: str = "{:,.0f}") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return fmt.format(x)


def _machine(results: dict[str, dict[str, Any]]) -> str:
    for data in results.values():
        m = data.get("machine")
        if m:
            kinds = sorted({"quick" if d.get("quick") else "full" for d in results.values()})
            dates = sorted({d.get("date", "?") for d in results.values()})
            return (f"Machine: {m['cores']} cores ({m['cpu_model']}), Linux {m['kernel']}, Python {m['python']}, "
                    f"acceptfilter {m['acceptfilter']}, wrk {m['wrk'] or '-'}, nginx {m['nginx'] or '-'}, "
                    f"gunicorn {m['gunicorn'] or '-'}; {'/'.join(kinds)} run, {', '.join(dates)}.")
    return "Machine: no results yet."


def _overhead(d: dict[str, Any]) -> list[str]:
    c = d["config"]
    lines = [f"**Overhead** — {c['server']}; {c['request']}; {c['client']} with {c['connections']} connections, "
             f"{c['rounds']} rounds x {c['seconds_per_sample']:g} s per mode, alternating; medians "
             "(x plain: the median over rounds of the ratio within a round).", "",
             "| mode | conn/s | x plain | p99 ms | errors |", "|---|---:|---:|---:|---:|"]
    for mode, r in d["results"].items():
        lines.append(f"| {MODE_LABELS.get(mode, mode)} | {_n(r['conn_per_s'])} | {_n(r['paired_ratio_median'], '{:.2f}')} "
                     f"| {_n(r['p99_ms'], '{:.2f}')} | {r['errors']} |")
    return lines


def _slowclient(d: dict[str, Any]) -> list[str]:
    c = d["config"]
    if "unavailable" in d:
        return [f"**Slow-client immunity** — not run: {d['unavailable']}."]
    lines = [f"**Slow-client immunity** — gunicorn {c['gunicorn']}; attack: {c['attack']}; wrk "
             f"(Connection: close, {c['wrk_connections']} connections), {c['rounds']} round(s) x "
             f"{c['seconds_per_sample']:g} s per set-up; medians. nginx: {c['nginx']}.", "",
             "| set-up | legit req/s | p50 ms | p99 ms | errors (timeouts, non-2xx) |", "|---|---:|---:|---:|---:|"]
    for setup, r in d["results"].items():
        label = SETUP_LABELS.get(setup, setup)
        if "unavailable" in r:
            lines.append(f"| {label} | unavailable: {r['unavailable']} | | | |")
            continue
        stalled = " (no request completed)" if r.get("stalled_samples") else ""
        lines.append(f"| {label} | {_n(r['rps'])}{stalled} | {_n(r['p50_ms'], '{:.1f}')} | {_n(r['p99_ms'], '{:.1f}')} "
                     f"| {r['errors']} ({r['timeouts']}, {r['non_2xx']}) |")
    paired = d.get("paired") or {}
    if paired:
        lines += ["", f"The goals, measured side by side ({c['paired']}):", ""]
        for name, label in (("everyday_tax", "everyday tax: acceptfilter, no attack"),
                            ("protected", "protected: acceptfilter under the attack")):
            r = paired.get(name)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"- {label}: not measured ({r['error'][:200]})")
                continue
            lines.append(f"- {label}: **{r['ratio_median']:.3f}x** plain gunicorn unattacked (quartiles "
                         f"{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}; {_n(r['rps_other_median'])} against "
                         f"{_n(r['rps_base_median'])} req/s; errors {r['errors_other']})")
            cpu = r.get("cpu_us") or {}
            mine, theirs = cpu.get(r["other"], {}), cpu.get(r["base"], {})
            if mine.get("machine") and theirs.get("machine") and mine.get("server") and theirs.get("server"):
                lines.append(f"  - CPU per request (medians): the whole machine {mine['machine']:.1f} against "
                             f"{theirs['machine']:.1f} µs ({mine['machine'] / theirs['machine'] - 1:+.1%}), the "
                             f"server's processes {mine['server']:.1f} against {theirs['server']:.1f} µs "
                             f"({mine['server'] / theirs['server'] - 1:+.1%})")
    return lines


def _workercpu(d: dict[str, Any]) -> list[str]:
    if "unavailable" in d or "error" in d:
        return [f"**CPU per request in gunicorn** — not run: {d.get('unavailable') or d.get('error')}."]
    c, r = d["config"], d["results"]
    plain, mine = r["setups"]["plain"], r["setups"]["acceptfilter"]
    lines = [f"**CPU per request in gunicorn** (where the everyday tax goes) — gunicorn {c['gunicorn']}; wrk "
             f"(Connection: close, {c['wrk_connections']} connections), {c['seconds_per_sample']:g} s samples; "
             f"{c['method']}.", "",
             "| CPU µs per request | plain gunicorn (median) | acceptfilter `httpready` (median) "
             "| difference, median over starts (quartiles) | x plain |", "|---|---:|---:|---:|---:|"]
    labels = {"workers": "the workers", "arbiter": "the arbiter", "filter_process": "the filter process",
              "server": "all of the server's processes", "machine": "the whole machine (wrk included)"}
    for part, label in labels.items():
        diff, ratio = r["difference_us"][part], r["ratio"].get(part)
        times = f"{ratio['median']:.3f}x" if ratio else "-"  # no ratio of the parts that are ~0 in both
        lines.append(f"| {label} | {plain['cpu_us_median'][part]:.1f} | {mine['cpu_us_median'][part]:.1f} "
                     f"| {diff['median']:+.1f} ({diff['q1']:+.1f} to {diff['q3']:+.1f}) | {times} |")
    rps = r["ratio"]["rps"]

    def spread(xs: list[float]) -> str:
        return f"{min(xs):.1f}-{max(xs):.1f}"

    lines += ["", f"Requests/s meanwhile: {_n(mine['rps_median'])} against {_n(plain['rps_median'])} "
              f"({rps['median']:.3f}x, quartiles {rps['q1']:.3f}-{rps['q3']:.3f}); errors {mine['errors']} and "
              f"{plain['errors']}. The workers' CPU per request, one started instance to the next: "
              f"{spread(plain['instances_workers_cpu_us_median'])} µs plain, "
              f"{spread(mine['instances_workers_cpu_us_median'])} µs with acceptfilter."]
    return lines


def _scale(d: dict[str, Any]) -> list[str]:
    c = d["config"]
    lines = [f"**Scale** — idle connections held by `{c['filter']}` ({c['sources']}); CPU over "
             f"{c['idle_seconds']:g} s idle; legit latency over {c['legit_requests']} sequential requests.", "",
             "| held | core | bytes / held conn (RSS) | idle CPU % of a core | legit p99 ms, none held → held |",
             "|---:|---|---:|---:|---:|"]
    for r in d["results"]:
        core = r["mode"].rsplit("-", 1)[1]
        if "unreachable" in r:
            lines.append(f"| {r['connections']:,} | {core} | not reachable here: {r['unreachable']} | | |")
            continue
        held = f"{r.get('held', 0):,}" + ("" if r.get("held", 0) >= r["connections"] else f" of {r['connections']:,}")
        lines.append(f"| {held} | {core} | {_n(r.get('bytes_per_held_connection'))} "
                     f"| {_n(r.get('idle_cpu_percent_of_core'), '{:.2f}')} "
                     f"| {_n(r.get('legit_p99_ms_none_held'), '{:.2f}')} → {_n(r.get('legit_p99_ms_held'), '{:.2f}')} |")
        if r.get("note"):
            lines.append(f"| | | {r['note']} | | |")
    if any(r["mode"].endswith("-python") for r in d["results"]):
        lines += ["", "The Python core keeps a Python object per held connection (and registers each one with "
                  "`select.epoll` from Python), so it is expected to cost more per connection than the C core's slot."]
    return lines


def _surface(d: dict[str, Any]) -> list[str]:
    c = d["config"]
    lines = [f"**Time to surface** — {c['rounds']} rounds x {c['requests_per_round']} requests at "
             f"{c['rate_per_s']:g}/s, one connection each; from the client's last byte ({c['clock']}).", "",
             "| mode | accept() p50 µs | accept() p99 µs | head read p50 µs | head read p99 µs "
             "| head read p50 / plain's, per round |",
             "|---|---:|---:|---:|---:|---:|"]
    for mode, r in d["results"].items():
        ratio = "-"
        if "read_p50_ratio_median" in r:  # median of the rounds' ratios (quartiles)
            ratio = (f"{r['read_p50_ratio_median']:.2f}x ({r['read_p50_ratio_q1']:.2f}-"
                     f"{r['read_p50_ratio_q3']:.2f})")
        lines.append(f"| {MODE_LABELS.get(mode, mode)} | {_n(r['accept_p50_us'])} | {_n(r['accept_p99_us'])} "
                     f"| {_n(r['read_p50_us'])} | {_n(r['read_p99_us'])} | {ratio} |")
    return lines


def _syscalls(d: dict[str, Any]) -> list[str]:
    if "unavailable" in d:
        return [f"**System calls per connection** — unavailable: {d['unavailable']}"]
    modes = list(d["results"])
    names = sorted({n for r in d["results"].values() for n, v in r["per_connection"].items() if v >= 0.05})
    lines = [f"**System calls per connection** — `strace -c -f` on the overhead benchmark's server, "
             f"{d['config']['client']}; calls / completed requests (below 0.05 left out).", "",
             "| call | " + " | ".join(MODE_LABELS.get(m, m) for m in modes) + " |",
             "|---|" + "---:|" * len(modes)]
    for name in names:
        lines.append(f"| `{name}` | " + " | ".join(f"{d['results'][m]['per_connection'].get(name, 0):.2f}"
                                                    for m in modes) + " |")
    lines.append("| **all** | " + " | ".join(f"**{d['results'][m]['total_per_connection']:.2f}**" for m in modes) + " |")
    return lines


DEFAULTS_LABELS = {
    "gunicorn-sync": "gunicorn sync x4",
    "gunicorn-gthread": "gunicorn gthread 2x4",
    "serve": "`acceptfilter serve` (http.server, thread per connection)",
    "uvicorn": "uvicorn (`acceptfilter run`)",
    "waitress": "waitress (4 threads)",
}


def _defaults(d: dict[str, Any]) -> list[str]:
    c = d["config"]
    lines = [f"**Defaults under attack** — {c['attack']}; legit: {c['legit']}; defaults: {c['defaults']}. "
             "Old default: `on_timeout=surface`.", "",
             "| server model | no attack: p50 ms | defaults: served | p50 ms | p99 ms "
             "| old default: served | p50 ms |", "|---|---:|---:|---:|---:|---:|---:|"]

    def served(r: dict[str, Any] | None) -> str:
        if not r:
            return "-"
        if "error" in r:
            return "error"
        return f"{r['served']:,} of {r['served'] + r['failed']:,} ({r['served_fraction'] * 100:.0f} %)"

    for model, r in d["results"].items():
        base, new, old = r.get("no-attack", {}), r.get("attack-defaults", {}), r.get("attack-old-default")
        lines.append(f"| {DEFAULTS_LABELS.get(model, model)} | {_n(base.get('p50_ms'), '{:.1f}')} | {served(new)} "
                     f"| {_n(new.get('p50_ms'), '{:.1f}')} | {_n(new.get('p99_ms'), '{:.1f}')} | {served(old)} "
                     f"| {_n((old or {}).get('p50_ms'), '{:.1f}')} |")
    return [*lines, "", *_balancer(d)]


def _balancer(d: dict[str, Any]) -> list[str]:
    """The balancer rows of bench/defaults: pre-opened connections used after 8 s, 60 s, 300 s; evictions."""
    b = d.get("balancer")
    if not b:
        return ["**Balancer pools** — no results yet."]
    idles = sorted({k for r in b["results"].values() for k in r if k.startswith("reuse-after-")},
                   key=lambda k: float(k.split("-")[-1][:-1]))
    lines = [f"**Balancer pools with default settings** — {b['config']}. Answered of sent "
             "(each connection: its first request after the idle time, then one reuse).", "",
             "| server model | " + " | ".join(f"used after {float(k.split('-')[-1][:-1]):g} s" for k in idles) + " |",
             "|---|" + "---:|" * len(idles)]

    def cell(g: dict[str, Any] | None) -> str:
        if not g:
            return "-"
        return f"{g['answered']:,} of {g['sent']:,}" + (f" ({g['unanswered']} unanswered)" if g["unanswered"] else "")

    for model, r in b["results"].items():
        if "error" in r:
            lines.append(f"| {DEFAULTS_LABELS.get(model, model)} | error |")
            continue
        lines.append(f"| {DEFAULTS_LABELS.get(model, model)} | " + " | ".join(cell(r.get(k)) for k in idles) + " |")
    e = d.get("evictions")
    if e and "error" not in e:
        lines += ["", f"**Evictions by source** — `acceptfilter serve` at `ulimit -n {e['ulimit_n']}` (max held "
                  f"{e['max_held']}, from the fd limit) while {e['attack'].get('opened', 0):,} connections from one "
                  f"address (1,000 idle + 200 slowloris, reopened when closed) attack: {e['evicted']:,} evicted, "
                  f"and a pool of {e['connections']} connections from another address (8 s idle) had "
                  f"{e['answered']} of {e['sent']} requests answered."]
    return lines


def _relay(d: dict[str, Any]) -> list[str]:
    if "unavailable" in d:
        return [f"**Relay** — not run: {d['unavailable']}."]
    c, r = d["config"], d["results"]
    labels = {"direct": "direct",
              "relay-c": "through the relay: one C event loop, recv/send (the default)",
              "relay-c-splice": "through the relay: one C event loop, splice through pipes",
              "relay-thread": "through the relay: a thread per connection in one C call (poll + splice; before)",
              "relay-splice": "through the relay: os.splice from Python threads",
              "relay-copy": "through the relay: recv/sendall in Python (the first relay)",
              "haproxy": "through HAProxy, mode tcp, one thread (reference)"}
    bulk = r.get("bulk", {})
    extra = f"; bulk: {c['bulk']}" if "bulk" in c else ""
    lines = [f"**Relay** — `{c['relay']}`; redis: `{c['redis']}`, {c['rounds']} rounds, alternating; "
             f"TLS: {c['tls']}{extra}. CPU: the relay process's user + system time per redis request "
             "(for direct: redis-server's own).", "",
             "| path | redis GET req/s | x direct | CPU µs / request | TLS request p50 ms | p90 ms | bulk MiB/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for setup, red in r["redis"].items():
        tls = r["tls"].get(setup, {})
        lines.append(f"| {labels.get(setup, setup)} | {_n(red['rps'])} | {_n(red['ratio_to_direct'], '{:.2f}')} "
                     f"| {_n(red.get('cpu_us_per_request'), '{:.1f}')} "
                     f"| {_n(tls.get('p50_ms'), '{:.2f}')} | {_n(tls.get('p90_ms'), '{:.2f}')} "
                     f"| {_n(bulk.get(setup, {}).get('mib_s'))} |")
    return lines


def _asyncidle(d: dict[str, Any]) -> list[str]:
    c = d["config"]
    lines = [f"**Async servers pay for idle connections too** — {c['idle_connections']:,} idle connections "
             f"(sent nothing) open against each server, {c['loop']} loop; legit latency over {c['legit_requests']} "
             "sequential requests, connection per request.", "",
             "| server | RSS MiB, before → idle open | bytes / idle conn | descriptors held | legit p99 ms, none → idle open "
             "| errors |", "|---|---:|---:|---:|---:|---:|"]
    for r in d["results"]:
        name, mode = r["server"].split("-")
        label = f"{name}{', `httpready` in front' if mode == 'httpready' else ''}"
        lines.append(f"| {label} | {_n(r['rss_before_mib'], '{:.1f}')} → {_n(r['rss_idle_open_mib'], '{:.1f}')} "
                     f"| {_n(r['rss_bytes_per_idle_connection'])} | {r['server_fds_with_idle_open']:,} "
                     f"| {_n(r['legit_p99_ms_none_idle'], '{:.2f}')} → {_n(r['legit_p99_ms_idle_open'], '{:.2f}')} "
                     f"| {r['legit_errors']} |")
    return lines


def _deadworker(d: dict[str, Any]) -> list[str]:
    c = d["config"]
    lines = [f"**Dead worker** — {c['workers']} workers, each its own engine ({c['filter']}); {c['idle']:,} idle "
             f"connections held; worker A stopped, {c['requests']:,} complete requests sent, A killed; "
             f"{c['rounds']} rounds.", "",
             "| listen socket | requests answered | requests lost (reset) | held idle closed with A |",
             "|---|---:|---:|---:|"]
    labels = {"shared": "one, shared by the workers", "reuseport": "`SO_REUSEPORT` shard per worker"}
    for r in d["results"]:
        lines.append(f"| {labels.get(r['mode'], r['mode'])} | {r['answered']:,} of "
                     f"{r['requests_sent_while_worker_stopped']:,} | {r['lost']:,} "
                     f"| {r['idle_closed_when_worker_died']:,} of {r['idle_held']:,} |")
    return lines


def render(results: dict[str, dict[str, Any]]) -> str:
    out = [START, "<!-- generated by `python bench/report.py` from bench/results/*.json: do not edit by hand -->", "",
           _machine(results), ""]
    if results:
        out += [f"![benchmark plot](assets/{PLOT.name})", ""]
    for name, fn in (("overhead", _overhead), ("slowclient", _slowclient), ("workercpu", _workercpu),
                     ("scale", _scale), ("surface", _surface),
                     ("syscalls", _syscalls), ("defaults", _defaults), ("relay", _relay),
                     ("asyncidle", _asyncidle), ("deadworker", _deadworker)):
        if name in results:
            out += [*fn(results[name]), ""]
        else:
            out += [f"**{name}** — no results yet.", ""]
    out.append(END)
    return "\n".join(out)


def splice(readme: str, block: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"the page has no {START} ... {END} markers")
    head, rest = readme.split(START, 1)
    tail = rest.split(END, 1)[1]
    return head + block + tail


def current_block(readme: str) -> str:
    if START not in readme or END not in readme:
        return ""
    return START + readme.split(START, 1)[1].split(END, 1)[0] + END


def plot(results: dict[str, dict[str, Any]], path: Path = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ov = results.get("overhead", {}).get("results", {})
    if ov:
        names = list(ov)
        bars = axes[0].barh(names, [ov[m]["conn_per_s"] for m in names], color=["#888" if "-" not in m else
                            ("#1f77b4" if m.endswith("-c") else "#ff7f0e") for m in names])
        axes[0].bar_label(bars, labels=[f"{ov[m]['paired_ratio_median']:.2f}x" for m in names], padding=3)
        axes[0].invert_yaxis()
        axes[0].set_xlabel("connections/s (median), higher is better")
        axes[0].set_title("Overhead: connection per request (label: x plain)")
    sc = results.get("slowclient", {}).get("results", {})
    if sc:
        names = [s for s in sc if "rps" in sc[s]]
        bars = axes[1].barh([SETUP_LABELS.get(s, s).replace("`", "") for s in names], [sc[s]["rps"] for s in names],
                            color=["#2ca02c" if "acceptfilter" in s else "#888" for s in names])
        axes[1].bar_label(bars, labels=[f"{sc[s]['rps']:,.0f}" + (" (stalled)" if sc[s].get("stalled_samples") else "")
                                        for s in names], padding=3)
        axes[1].invert_yaxis()
        axes[1].set_xlabel("legit requests/s (median), gunicorn sync x4")
        axes[1].set_title("Slow clients: " + results["slowclient"]["config"]["attack"].split(" (")[0])
    for ax in axes:
        ax.margins(x=0.18)  # room for the labels
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def _doc_blocks(results: dict[str, dict[str, Any]], root: Path) -> dict[Path, tuple[str, str]]:
    """Each docs page with a block: (its text now, its text with the block rendered from ``results``)."""
    out = {}
    for rel, (name, key) in DOC_BLOCKS.items():
        page = root / rel
        start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
        if not page.exists():
            continue
        text = page.read_text()
        if start not in text or end not in text:
            continue
        body = _balancer(results[key]) if key in results else ["no results yet."]
        block = "\n".join([start, "<!-- generated by `python bench/report.py` from bench/results/*.json: "
                           "do not edit by hand -->", "", *body, "", end])
        head, rest = text.split(start, 1)
        out[page] = (text, head + block + rest.split(end, 1)[1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if the page's block is not what the JSON renders")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--page", type=Path, default=PAGE, help="the Markdown page with the markers (docs/benchmarks.md)")
    p.add_argument("--plot", type=Path, default=PLOT)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    results = load(args.results)
    block = render(results)
    readme = args.page.read_text()
    docs = _doc_blocks(results, ROOT) if args.page == PAGE else {}
    if args.check:
        if current_block(readme) != block:
            print(f"{args.page}: the benchmark block differs from what {args.results}/*.json renders; "
                  "run `python bench/report.py`", file=sys.stderr)
            return 1
        for page, (text, new) in docs.items():
            if text != new:
                print(f"{page}: its benchmark block differs from what {args.results}/*.json renders; "
                      "run `python bench/report.py`", file=sys.stderr)
                return 1
        return 0
    args.page.write_text(splice(readme, block))
    for page, (text, new) in docs.items():
        if text != new:
            page.write_text(new)
    if not args.no_plot and results:
        plot(results, args.plot)
    print(f"wrote the block in {args.page}" + ("" if args.no_plot or not results else f" and {args.plot}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
