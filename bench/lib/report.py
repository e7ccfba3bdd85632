#!/usr/bin/env python3
"""Turns the benchmark's results into Markdown, SVG charts and the project's ratios.

  report.py compare RESULTS.json META.json [--doc docs/performance.md]
  report.py soak SOAK.json META.json [--doc ...]
  report.py streams STREAMS.json META.json [--doc ...]
  report.py profile PROFILE.json META.json --perf SHARES.md [--flame FLAME.svg] [--doc ...]
  report.py count COUNT.json META.json [--doc ...]

With --doc, the section between `<!-- bench:KIND:start -->` and `<!-- bench:KIND:end -->`
in that file is replaced (appended when the markers are missing) and the chart is written
next to it; the text outside the markers is left alone. Standard library only.
"""

import json
import math
import os
import shutil
import statistics
import sys
from html import escape

COLOURS = {"direct": "#9e9e9e", "nginx": "#4caf50", "litellm": "#e57373", "portkey": "#ffb74d",
           "crisp": "#1e88e5", "crisp-w": "#64b5f6", "crisp-p": "#90caf9",
           "crisp-x": "#0d47a1", "stack": "#a5d6a7"}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=2):
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def fmt_ms(x):
    if x is None:
        return "–"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def machine_line(meta):
    return (f"{meta['nproc']} cores ({meta['cpu']}), {meta['mem_gib']} GiB memory, "
            f"{meta['os']}, Linux {meta['kernel']}")


def versions_line(meta):
    return (f"nginx {meta['nginx']}; wrk {meta['wrk'].removeprefix('wrk ')}; "
            f"LiteLLM {meta['litellm']} (Python {meta.get('python') or '?'}, "
            f"{meta['litellm_workers']} workers); Portkey gateway {meta['portkey']} "
            f"(node {meta['node']}); crisp {meta['crisp']} ({meta['rustc']})")


# --- compare ----------------------------------------------------------------------------

def aggregate(results):
    runs = results["runs"]
    by = {}
    for r in runs:
        by.setdefault((r["target"], r["connections"]), []).append(r)
    direct = {(r["round"], r["connections"]): r for r in runs if r["target"] == "direct"}
    rows = {}
    for (t, c), rs in by.items():
        added50 = [r["p50_ms"] - direct[(r["round"], c)]["p50_ms"] for r in rs
                   if (r["round"], c) in direct]
        added99 = [r["p99_ms"] - direct[(r["round"], c)]["p99_ms"] for r in rs
                   if (r["round"], c) in direct]
        failed = sum(r["failed"] for r in rs)
        attempts = sum(r["requests"] + r["errors"]["connect"] + r["errors"]["timeout"] for r in rs)
        rows[(t, c)] = {
            "rps": median(r["rps"] for r in rs),
            "p50_ms": median(r["p50_ms"] for r in rs),
            "p99_ms": median(r["p99_ms"] for r in rs),
            "added_p50_ms": median(added50) if t != "direct" else None,
            "added_p99_ms": median(added99) if t != "direct" else None,
            "cpu_s_per_1k": median(r["cpu_s_per_1k"] for r in rs),
            "peak_rss_mib": median(r["peak_rss_mib"] for r in rs),
            "failed": failed,
            "error_rate": failed / attempts if attempts else (1.0 if failed else 0.0),
            "rounds": len(rs),
        }
    return rows


def cell(rows, target, conns, key):
    """One figure of one target at one concurrency, or None when it was not measured."""
    return rows.get((target, conns), {}).get(key)


def ratios(rows):
    """The project's goals, as (text, value, goal text, met) tuples."""
    def get(t, c, k):
        return cell(rows, t, c, k)
    out = []
    # The default (every answer waits for its event's fdatasync), then the durability
    # that waits only for the write, when it was measured.
    for key, what in (("crisp", "crisp in-region"), ("crisp-w", "crisp in-region, durability write"),
                      ("crisp-p", "crisp in-region, durability write, busy-polling client threads")):
        if not any(t == key for t, _ in rows):
            continue
        cr, ng = get(key, 64, "rps"), get("nginx", 64, "rps")
        if cr and ng:
            v = cr / ng
            out.append((f"{what} req/s at 64 connections, as a share of nginx proxy_pass",
                        f"{v:.0%}", "≥ 80%", v >= 0.8))
        ca, na = get(key, 1, "added_p50_ms"), get("nginx", 1, "added_p50_ms")
        if ca is not None and na is not None:
            v = ca / na if na > 0 else math.inf
            out.append((f"{what} added p50 at 1 connection vs nginx's added p50",
                        f"{ca * 1000:.0f} µs vs {na * 1000:.0f} µs = {v:.1f}x", "≤ 2x", v <= 2))
        for other, name, goal in (("litellm", "LiteLLM", 100), ("portkey", "Portkey", 20)):
            o = get(other, 64, "rps")
            if cr and o:
                v = cr / o
                out.append((f"{what} req/s vs {name} at 64 connections",
                            f"{v:.1f}x", f"≥ {goal}x", v >= goal))
            elif cr:
                out.append((f"{what} req/s vs {name} at 64 connections",
                            "not measured", f"≥ {goal}x", None))
    return out


def compare_svg(results, rows, meta):
    conc = results["concurrency"]
    targets = [t for t in results["targets"]
               if not t.get("unavailable") and any((t["name"], c) in rows for c in conc)]
    bar, gap, group_gap = 16, 3, 22
    # Room for the longest label (about 6.6 px per character at 12 px) and the group names.
    longest = max((len(t["label"]) for t in targets), default=20)
    left, right, top = max(190, 80 + math.ceil(6.6 * longest)), 110, 58
    width = left + 600 + right
    plot_w = width - left - right
    vals = [rows[(t["name"], c)]["rps"] for t in targets for c in conc
            if rows.get((t["name"], c), {}).get("rps")]
    lo = 10 ** math.floor(math.log10(max(min(vals), 1))) if vals else 1
    hi = 10 ** math.ceil(math.log10(max(vals))) if vals else 10

    def x(v):
        v = max(v, lo)
        return left + plot_w * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    group_h = len(targets) * (bar + gap)
    height1 = top + len(conc) * (group_h + group_gap)
    # Second panel: added p50 at one connection.
    added = [(t, rows.get((t["name"], conc[0]), {}).get("added_p50_ms")) for t in targets
             if t["name"] != "direct"]
    added = [(t, a) for t, a in added if a is not None]
    top2 = height1 + 60
    height = top2 + len(added) * (bar + gap) + 40
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="{left}" y="22" font-size="15" font-weight="bold">Requests/s (successful), '
         f'log scale: higher is better</text>',
         f'<text x="{left}" y="40" fill="#555">{escape(machine_line(meta))}</text>']
    d = lo
    while d <= hi:
        s.append(f'<line x1="{x(d):.1f}" y1="{top - 6}" x2="{x(d):.1f}" y2="{height1 - group_gap + 4}" '
                 f'stroke="#ddd"/>')
        s.append(f'<text x="{x(d):.1f}" y="{height1 - group_gap + 18}" text-anchor="middle" '
                 f'fill="#555">{d:,.0f}</text>')
        d *= 10
    y = top
    for c in conc:
        s.append(f'<text x="10" y="{y + group_h / 2 + 4:.0f}" font-weight="bold">{c} conn.</text>')
        for t in targets:
            r = rows.get((t["name"], c), {})
            v = r.get("rps") or 0
            colour = COLOURS.get(t["name"], "#777")
            s.append(f'<text x="{left - 6}" y="{y + bar - 4}" text-anchor="end">{escape(t["label"])}</text>')
            if v > 0:
                s.append(f'<rect x="{left}" y="{y}" width="{max(x(v) - left, 1):.1f}" height="{bar}" '
                         f'fill="{colour}"/>')
            label = f"{v:,.0f}" + (f"  ({r['error_rate']:.1%} errors)" if r.get("failed") else "")
            s.append(f'<text x="{x(v) + 4 if v > 0 else left + 4:.1f}" y="{y + bar - 4}">{label}</text>')
            y += bar + gap
        y += group_gap
    if added:
        amax = max(a for _, a in added) * 1.15 or 1
        s.append(f'<text x="{left}" y="{top2 - 18}" font-size="15" font-weight="bold">Added p50 latency '
                 f'over direct at {conc[0]} connection (ms): lower is better</text>')
        y = top2
        for t, a in added:
            w = plot_w * max(a, 0) / amax
            s.append(f'<text x="{left - 6}" y="{y + bar - 4}" text-anchor="end">{escape(t["label"])}</text>')
            s.append(f'<rect x="{left}" y="{y}" width="{max(w, 1):.1f}" height="{bar}" '
                     f'fill="{COLOURS.get(t["name"], "#777")}"/>')
            s.append(f'<text x="{left + w + 4:.1f}" y="{y + bar - 4}">{a:.3f}</text>')
            y += bar + gap
    s.append("</svg>")
    return "\n".join(s) + "\n"


def compare_md(results, rows, meta, svg_name):
    lines = [f"Measured in the run started {meta['date']}, on {machine_line(meta)}. Each run lasts "
             f"{results['seconds']} s; {results['rounds']} rounds with the targets interleaved; "
             f"medians over rounds.", "",
             f"Versions: {versions_line(meta)}.", "",
             f"![Requests/s and added latency per target]({svg_name})", "",
             "| target | conns | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms "
             "| CPU s / 1k req | peak RSS MiB | errors |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for c in results["concurrency"]:
        for t in results["targets"]:
            if t.get("unavailable"):
                if c == results["concurrency"][0]:
                    lines.append(f"| {t['label']} | – | not measured: {escape(t['unavailable'][:200])} "
                                 f"| | | | | | | |")
                continue
            r = rows.get((t["name"], c))
            if not r:
                continue
            errors = (f"**{r['failed']} ({r['error_rate']:.2%})**" if r["failed"] else "0")
            lines.append(
                f"| {t['label']} | {c} | {fmt(r['rps'])} | {fmt_ms(r['p50_ms'])} | {fmt_ms(r['p99_ms'])} "
                f"| {fmt_ms(r['added_p50_ms'])} | {fmt_ms(r['added_p99_ms'])} "
                f"| {fmt(r['cpu_s_per_1k'], 3)} | {fmt(r['peak_rss_mib'], 1)} | {errors} |")
    lines += ["", "The project's goals:", "",
              "| goal | measured | target | met |", "|---|--:|--:|:-:|"]
    for text, value, goal, met in ratios(rows):
        lines.append(f"| {text} | {value} | {goal} | {'–' if met is None else ('yes' if met else '**no**')} |")
    stack = stack_line(rows)
    if stack:
        lines += ["", stack]
    return "\n".join(lines) + "\n"


def stack_line(rows):
    """What the stack crisp is built on reaches with none of crisp's work, for scale."""
    def get(t, c, k):
        return cell(rows, t, c, k)
    st, ng = get("stack", 64, "rps"), get("nginx", 64, "rps")
    if not (st and ng):
        return None
    text = (f"For scale: the pass-through on tokio and hyper, the libraries crisp is built on, "
            f"doing none of crisp's work, answered {st / ng:.0%} of nginx's req/s at 64 "
            f"connections")
    sa, na = get("stack", 1, "added_p50_ms"), get("nginx", 1, "added_p50_ms")
    if sa is not None and na is not None:
        text += f" and added {sa * 1000:.0f} µs at the median for a lone request (nginx: {na * 1000:.0f} µs)"
    shares = [f"{get(key, 64, 'rps') / st:.0%}{what}"
              for key, what in (("crisp", " (the default node)"), ("crisp-w", " with `\"write\"`"),
                                ("crisp-p", " with busy-polling client threads"))
              if get(key, 64, "rps")]
    if shares:
        listed = shares[0] if len(shares) == 1 else ", ".join(shares[:-1]) + " and " + shares[-1]
        text += f"; of the pass-through's rate, crisp answered {listed}"
    return text + "."


# --- soak and streams -------------------------------------------------------------------

def soak_svg(soak, meta):
    samples = soak["samples"]
    width, height, left, right, top, bottom = 900, 300, 70, 30, 50, 45
    tmax = max(s["t"] for s in samples) or 1
    rmax = max(s["rss_mib"] for s in samples) * 1.2 or 1
    px = lambda t: left + (width - left - right) * t / tmax  # noqa: E731
    py = lambda r: top + (height - top - bottom) * (1 - r / rmax)  # noqa: E731
    pts = " ".join(f"{px(s['t']):.1f},{py(s['rss_mib']):.1f}" for s in samples)
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="{left}" y="22" font-size="15" font-weight="bold">crisp RSS (MiB) under '
         f'{soak["connections"]} connections for {soak["seconds"]} s</text>',
         f'<text x="{left}" y="40" fill="#555">{escape(machine_line(meta))}</text>']
    step = 10 ** math.floor(math.log10(rmax)) if rmax > 1 else 1
    if rmax / step < 3:
        step /= 5
    r = 0.0
    while r <= rmax:
        s.append(f'<line x1="{left}" y1="{py(r):.1f}" x2="{width - right}" y2="{py(r):.1f}" stroke="#eee"/>')
        s.append(f'<text x="{left - 6}" y="{py(r) + 4:.1f}" text-anchor="end" fill="#555">{r:g}</text>')
        r += step
    for i in range(6):
        t = tmax * i / 5
        s.append(f'<text x="{px(t):.1f}" y="{height - bottom + 18}" text-anchor="middle" '
                 f'fill="#555">{t:.0f} s</text>')
    s.append(f'<polyline points="{pts}" fill="none" stroke="{COLOURS["crisp"]}" stroke-width="2"/>')
    s.append("</svg>")
    return "\n".join(s) + "\n"


def soak_md(soak, meta, svg_name):
    samples = soak["samples"]
    rss = [x["rss_mib"] for x in samples]
    t_end = samples[-1]["t"]
    first = [x["rss_mib"] for x in samples if 0 < x["t"] <= 60] or rss[:2]
    last = [x["rss_mib"] for x in samples if x["t"] >= t_end - 60] or rss[-2:]
    lines = [f"Measured in the run started {meta['date']}, on {machine_line(meta)}; crisp {meta['crisp']}.", "",
             f"{soak['target']['label']} (API key, Cedar policy, audit trail) under wrk at "
             f"{soak['connections']} connections for {soak['seconds']} s, its RSS (VmRSS) read "
             f"every {soak['interval']} s.", "",
             f"![crisp RSS during the soak]({svg_name})", "",
             "| requests | req/s | p50 ms | p99 ms | errors | RSS idle | RSS first minute (mean) "
             "| RSS last minute (mean) | RSS max | CPU s / 1k req |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
             f"| {soak['requests']:,} | {soak['rps']:,.0f} | {fmt_ms(soak['p50_ms'])} | "
             f"{fmt_ms(soak['p99_ms'])} | {soak['failed']} | {rss[0]:.1f} MiB | "
             f"{statistics.mean(first):.1f} MiB | {statistics.mean(last):.1f} MiB | {max(rss):.1f} MiB | "
             f"{soak['cpu_s'] / soak['requests'] * 1000 if soak['requests'] else 0:.3f} |"]
    return "\n".join(lines) + "\n"


def streams_md(st, meta):
    per = (st["peak_rss_mib"] - st["idle_rss_mib"]) * 1024 / st["streams"] if st["streams"] else 0
    rate = st["target"].get("slow_rate")
    lines = [f"Measured in the run started {meta['date']}, on {machine_line(meta)}; crisp {meta['crisp']}.", "",
             f"crisp in-region (API key, Cedar policy, audit trail), its openai backend pointed at "
             f"the upstream's slow SSE server (the same stream trickled at {rate} bytes/s per "
             f"connection, about {1409 / rate if rate else 0:.0f} s per answer). wrk holds "
             f"{st['streams']} connections, each sending `stream: true` requests back to back, for "
             f"{st['seconds']} s. Peak RSS is crisp's VmHWM after the run "
             f"({'reset just before it' if st['peak_is_vmhwm'] else 'the largest VmRSS sample'}); "
             f"open connections are counted with `ss` every second.", "",
             "| streams requested | client connections open at once (max) | upstream connections "
             "open at once (max) | streams completed | errors | RSS idle | peak RSS | per open stream |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|",
             f"| {st['streams']} | {st['max_client_conns']} | {st['max_upstream_conns']} | "
             f"{st['completed']} | {st['failed']} | {st['idle_rss_mib']:.1f} MiB | "
             f"{st['peak_rss_mib']:.1f} MiB | {per:.1f} KiB |"]
    return "\n".join(lines) + "\n"


def profile_md(results, rows, meta, perf_md, flame_name=None):
    lines = [f"Measured in the run started {meta['date']}, on {machine_line(meta)}; crisp {meta['crisp']}.", ""]
    if perf_md.strip():
        lines += ["crisp in-region at 64 connections under `perf record` (DWARF call graphs). "
                  "Each sample is charged to the innermost component on its stack, so "
                  "allocator, library and kernel time count where they are caused:", "",
                  perf_md.strip(), ""]
    if flame_name:
        lines += ["The same samples as a flame graph (each frame's width is its share of the "
                  "CPU time, callers below callees; open the SVG on its own to zoom and search):", "",
                  f"![Flame graph of crisp in-region at 64 connections]({flame_name})", ""]
    variants = sum(1 for t in results["targets"] if t["name"] not in ("direct", "crisp"))
    lines += [f"The same node measured again beside {variants} variants (each a separate node with "
              "the API key, the Cedar policy and the audit trail; "
              f"{results['rounds']} rounds of {results['seconds']} s, medians):", "",
              "| variant | req/s at 64 conns | p50 ms at 1 conn | added p50 ms at 1 conn "
              "| CPU s / 1k req at 64 conns |", "|---|--:|--:|--:|--:|"]
    for t in results["targets"]:
        if t["name"] == "direct":
            continue
        r64, r1 = rows.get((t["name"], 64), {}), rows.get((t["name"], 1), {})
        err = "" if not (r64.get("failed") or r1.get("failed")) else " (errors!)"
        lines.append(f"| {t['label']}{err} | {fmt(r64.get('rps'))} | {fmt_ms(r1.get('p50_ms'))} "
                     f"| {fmt_ms(r1.get('added_p50_ms'))} | {fmt(r64.get('cpu_s_per_1k'), 3)} |")
    return "\n".join(lines) + "\n"


def count_md(c, meta):
    per = c["instructions_per_request"]
    lines = [f"Measured in the run started {meta['date']}, on {machine_line(meta)}; crisp {meta['crisp']}.", "",
             f"{c['label']} under `valgrind --tool=callgrind`, instrumented only while wrk sends "
             f"requests over {c['connections']} connections for {c['seconds']:.0f} s, after a "
             "warm-up. User-space instructions and calls to `malloc` divided by the requests "
             "answered: counts, not timings, so they repeat from run to run where wall-clock "
             "figures on a shared machine move by 10–30%. Valgrind's virtual CPU has no SHA "
             "extensions, so SHA-256 (API keys, the audit trail's running digest) runs `sha2`'s "
             "portable code here and counts far more than it costs natively. The audit file is not "
             "sealed while counting (`seal_bytes` of 1 GiB): a seal's read-back is once per "
             "8 MiB of events by default, not per request.", "",
             "| requests | errors | instructions per request | allocations per request |",
             "|--:|--:|--:|--:|",
             f"| {c['requests']:,} | {c['failed']} | {per / 1000:,.0f}k | {c['mallocs_per_request']:.0f} |",
             "", "| function (own instructions) | per request | share |", "|---|--:|--:|"]
    for row in c["top"]:
        name = row["function"].replace("|", "\\|")
        if len(name) > 110:
            name = name[:107] + "..."
        share = row["instructions"] / c["instructions"] * 100 if c["instructions"] else 0
        lines.append(f"| `{name}` | {row['instructions'] / max(c['requests'], 1):,.0f} | {share:.1f}% |")
    return "\n".join(lines) + "\n"


# --- the document -----------------------------------------------------------------------

def replace_section(doc_path, kind, body):
    start, end = f"<!-- bench:{kind}:start -->", f"<!-- bench:{kind}:end -->"
    text = open(doc_path).read() if os.path.exists(doc_path) else "# Performance\n"
    block = f"{start}\n{body}{end}"
    if start in text and end in text:
        a = text.index(start)
        b = text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    with open(doc_path, "w") as f:
        f.write(text)


def main(argv):
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    kind, data_path, meta_path = argv[1:4]
    doc = argv[argv.index("--doc") + 1] if "--doc" in argv else None
    data = json.load(open(data_path))
    meta = json.load(open(meta_path))
    docs_dir = os.path.dirname(doc) if doc else None
    if kind == "compare":
        rows = aggregate(data)
        md = compare_md(data, rows, meta, "performance.svg")
        print(md)
        print("The project's goals:")
        for text, value, goal, met in ratios(rows):
            verdict = "not measured" if met is None else ("met" if met else "MISSED")
            print(f"  {text}: {value} (goal {goal}) {verdict}")
        if stack_line(rows):
            print(stack_line(rows))
        if doc:
            with open(os.path.join(docs_dir, "performance.svg"), "w") as f:
                f.write(compare_svg(data, rows, meta))
            replace_section(doc, "compare", md)
    elif kind == "soak":
        md = soak_md(data, meta, "performance-soak.svg")
        print(md)
        if doc:
            with open(os.path.join(docs_dir, "performance-soak.svg"), "w") as f:
                f.write(soak_svg(data, meta))
            replace_section(doc, "soak", md)
    elif kind == "profile":
        perf = argv[argv.index("--perf") + 1] if "--perf" in argv else None
        perf_md = open(perf).read() if perf and os.path.exists(perf) else ""
        flame = argv[argv.index("--flame") + 1] if "--flame" in argv else None
        flame_name = "performance-flame.svg" if flame and doc else None
        md = profile_md(data, aggregate(data), meta, perf_md, flame_name)
        print(md)
        if doc:
            if flame_name:
                shutil.copyfile(flame, os.path.join(docs_dir, flame_name))
            replace_section(doc, "profile", md)
    elif kind == "streams":
        md = streams_md(data, meta)
        print(md)
        if doc:
            replace_section(doc, "streams", md)
    elif kind == "count":
        md = count_md(data, meta)
        print(md)
        if doc:
            replace_section(doc, "count", md)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    if doc:
        print(f"updated {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
