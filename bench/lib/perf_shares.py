#!/usr/bin/env python3
"""Where crisp's CPU time goes, from `perf script -F comm,period,ip,sym` on stdin.

Each sample is charged to the component of its innermost frame that names one (walking
from the leaf towards the thread's root), so the time spent in malloc, memcpy, serde_json
or the kernel is charged to the component that called it. Prints the shares by component
and the top functions by self time, as Markdown (or JSON with --json). With --folded PATH
it also writes the stacks in the folded format a flame graph is drawn from
(`thread;outermost;...;innermost weight` per line), each frame without its generic
parameters.
"""

import json
import re
import sys

# (component, pattern over one frame's symbol); the first frame matching any wins.
COMPONENTS = [
    # Socket system calls (and the kernel's TCP work under them, which on loopback includes
    # waking the process at the other end) are charged here, not to whoever made the call:
    # every proxy pays them, per read and write.
    ("sockets: kernel TCP send and receive", r"__GI___writev|__libc_recv|__libc_send|__GI___libc_writev|\bwritev\b|__libc_recvfrom|__libc_sendto|\bsendmsg\b|\brecvmsg\b"),
    ("receipt signing (Ed25519)", r"sign_receipt|SignedReceipt>::sign|SignedReceipt::sign"),
    ("audit trail (records, writes, fsync)", r"crisp_audit|crisp_node::audit"),
    ("logs and trace spans", r"tracing_subscriber|tracing_appender|format_event|tracing_core::dispatcher|opentelemetry"),
    ("metrics", r"\bmetrics::|metrics_exporter|metrics_util"),
    ("authorization (key lookup, Cedar)", r"cedar|crisp_policy|crisp_node::access"),
    ("routing", r"crisp_routing|crisp_node::fleet"),
    ("upstream: HTTP client, SSE parsing", r"reqwest|dispatch::Client|role::Client|hyper_util::client|crisp_engine::openai|sse_events"),
    ("client API: HTTP server, request and answer JSON", r"dispatch::Server|role::Server|axum|crisp_node::api|crisp_node::serve"),
    ("pipeline (resolve, fail over, chunks)", r"crisp_node::pipeline|crisp_node::Node|crisp_catalog"),
    ("async runtime (task scheduling, I/O driver)", r"tokio::runtime|mio::"),
]
COMPILED = [(name, re.compile(p)) for name, p in COMPONENTS]


def short(sym):
    """A symbol without generic parameters or closure suffixes, at most 100 characters."""
    sym = sym.removesuffix(" (inlined)")
    prev = None
    while prev != sym:
        # Innermost generic parameters go; `<X as Trait>` (which names the type) stays.
        prev, sym = sym, re.sub(r"<(?![^<>]* as )[^<>]*>", "", sym)
    sym = sym.replace("::{{closure}}", "").strip()
    return sym if len(sym) <= 100 else sym[:99] + "…"


def samples(lines):
    header, frames = None, []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if header is not None:
                yield header, frames
            header, frames = None, []
            continue
        if not line.startswith((" ", "\t")):
            header, frames = line, []
        else:
            parts = line.strip().split(None, 1)
            frames.append((parts[0], parts[1] if len(parts) > 1 else "?"))
    if header is not None:
        yield header, frames


def folded_frames(thread, frames):
    """One sample's stack as folded text: the thread, then its frames outermost first."""
    names = [thread]
    for ip, sym in reversed(frames):
        name = short(sym) if sym != "[unknown]" else f"[unknown {ip}]"
        if ip.startswith("ffffffff"):
            name = f"[kernel] {name}"
        names.append(name.replace(";", ":"))
    return ";".join(names)


def main(argv):
    as_json = "--json" in argv
    folded_path = argv[argv.index("--folded") + 1] if "--folded" in argv else None
    folded = {}
    by_component, by_leaf, total, kernel = {}, {}, 0, 0
    by_thread = {}
    for header, frames in samples(sys.stdin):
        fields = header.split()
        comm = fields[0]
        try:
            period = int(fields[-1])
        except ValueError:
            period = 1
        total += period
        thread = "audit thread" if comm.startswith("audit") else comm
        by_thread[thread] = by_thread.get(thread, 0) + period
        if folded_path is not None:
            stack = folded_frames(thread, frames)
            folded[stack] = folded.get(stack, 0) + period
        component = None
        for _, sym in frames:
            for name, rx in COMPILED:
                if rx.search(sym):
                    component = name
                    break
            if component:
                break
        if component is None:
            component = "audit trail (records, writes, fsync)" if thread == "audit thread" else "other"
        by_component[component] = by_component.get(component, 0) + period
        if frames:
            is_kernel = frames[0][0].startswith("ffffffff")
            kernel += period if is_kernel else 0
            # The innermost real (not inlined) function, without generic parameters.
            sym = next((s for _, s in frames if not s.endswith("(inlined)")), frames[0][1])
            key = ("[kernel] " if is_kernel else "") + short(sym)
            by_leaf[key] = by_leaf.get(key, 0) + period
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    if folded_path is not None:
        with open(folded_path, "w") as f:
            for stack, weight in sorted(folded.items()):
                f.write(f"{stack} {weight}\n")
    comps = sorted(by_component.items(), key=lambda kv: -kv[1])
    leaves = sorted(by_leaf.items(), key=lambda kv: -kv[1])[:15]
    if as_json:
        json.dump({"components": [[k, v / total] for k, v in comps],
                   "leaves": [[k, v / total] for k, v in leaves],
                   "kernel": kernel / total,
                   "threads": {k: v / total for k, v in by_thread.items()}}, sys.stdout, indent=1)
        return 0
    print("| component (with the library, allocator and kernel time it causes) | share of crisp's CPU |")
    print("|---|--:|")
    for k, v in comps:
        print(f"| {k} | {v / total:.1%} |")
    print()
    print(f"In the kernel: {kernel / total:.1%}. Threads: "
          + ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(by_thread.items(), key=lambda kv: -kv[1])))
    print()
    print("| function (self time) | share |")
    print("|---|--:|")
    for k, v in leaves:
        print(f"| `{k}` | {v / total:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
