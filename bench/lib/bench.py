#!/usr/bin/env python3
"""Measurement driver of the gateway benchmark (standard library only).

  bench.py compare TARGETS.json OUT.json   side-by-side runs: every target at every
                                            concurrency, interleaved, in rounds
  bench.py soak TARGET.json OUT.json       one target under steady load, RSS sampled
  bench.py streams TARGET.json OUT.json    peak RSS while N SSE streams are open at once
  bench.py load TARGETS.json NAME:CONNS:SECONDS   load only (for a profiler to watch)
  bench.py count TARGET.json OUT.json      user-space instructions and heap allocations per
                                            request of a node running under callgrind

A target is {"name", "label", "url", "headers": [...], "body", "pids": [...]} where pids
are the root processes whose whole process tree is the target (nginx master and workers,
LiteLLM and its workers, node, or both crisp nodes). A target that could not be started
is {"name", "label", "unavailable": "why"} and is reported as such, never dropped.

The load generator is wrk (the same binary, threads and timeout for every target) with
bench/lib/wrk.lua, which prints one JSON line of counts and latency percentiles.
"""

import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WRK_LUA = os.path.join(HERE, "wrk.lua")
TICK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"  {msg}", flush=True)


# --- /proc ------------------------------------------------------------------------------

def _stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    # The command name may contain spaces; the fields after it are split safely.
    return s[s.rindex(")") + 2:].split()


def process_tree(roots):
    """The live processes of the trees rooted at `roots`."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(name)[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    seen, todo = [], [r for r in roots if os.path.exists(f"/proc/{r}")]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(children.get(p, []))
    return seen


def cpu_seconds(pids):
    """utime + stime of each process plus what its reaped children used."""
    total = 0
    for p in pids:
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        # fields (after pid and comm): state=0 ... utime=11 stime=12 cutime=13 cstime=14
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / TICK


def status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss(pids):
    """Resets each process's VmHWM to its current RSS (Linux >= 4.0, needs privileges)."""
    ok = True
    for p in pids:
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


def peak_rss_mib(pids):
    return sum(status_kb(p, "VmHWM") for p in pids) / 1024


def rss_mib(pids):
    return sum(status_kb(p, "VmRSS") for p in pids) / 1024


# --- wrk --------------------------------------------------------------------------------

def wrk(target, connections, seconds, timeout_s=10, threads=None):
    threads = threads or min(connections, max(1, min(2, os.cpu_count() or 1)))
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
           "--timeout", f"{timeout_s}s", "-s", WRK_LUA]
    for h in target.get("headers", []):
        cmd += ["-H", h]
    cmd.append(target["url"])
    env = dict(os.environ, BENCH_BODY=target["body"])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                         timeout=seconds + timeout_s + 60)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"wrk printed no result for {target['name']}:\n{out.stdout}\n{out.stderr}")


def measure(target, connections, seconds):
    """One measured run: wrk against the target, with its process tree's CPU and peak RSS."""
    pids = process_tree(target["pids"])
    hwm_reset = reset_peak_rss(pids)
    cpu0 = cpu_seconds(pids)
    r = wrk(target, connections, seconds)
    pids_after = process_tree(target["pids"])
    cpu1 = cpu_seconds(pids_after)
    # Processes that appeared during the run count from zero.
    e = r["errors"]
    socket_errors = e["connect"] + e["read"] + e["write"] + e["timeout"]
    failed = e["status"] + socket_errors
    duration = r["duration_us"] / 1e6
    ok = max(r["requests"] - e["status"], 0)
    attempts = r["requests"] + e["connect"] + e["timeout"]
    return {
        "target": target["name"],
        "connections": connections,
        "seconds": duration,
        "requests": r["requests"],
        "ok": ok,
        "rps": ok / duration if duration else 0.0,
        "p50_ms": r["latency_us"]["p50"] / 1000,
        "p90_ms": r["latency_us"]["p90"] / 1000,
        "p99_ms": r["latency_us"]["p99"] / 1000,
        "max_ms": r["latency_us"]["max"] / 1000,
        "errors": e,
        "failed": failed,
        "error_rate": failed / attempts if attempts else (1.0 if failed else 0.0),
        "cpu_s": cpu1 - cpu0,
        "cpu_s_per_1k": (cpu1 - cpu0) / r["requests"] * 1000 if r["requests"] else None,
        "peak_rss_mib": peak_rss_mib(pids_after) if hwm_reset else None,
        "processes": len(pids_after),
    }


def env_int(name, default):
    v = os.environ.get(name, "")
    return int(v) if v.strip() else default


# --- modes ------------------------------------------------------------------------------

def compare(targets_path, out_path):
    with open(targets_path) as f:
        targets = json.load(f)
    seconds = env_int("BENCH_SECONDS", 10)
    rounds = env_int("BENCH_ROUNDS", 3)
    warmup = env_int("BENCH_WARMUP_SECONDS", 3)
    concurrency = [int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,16,64").split(",")]
    only = [n for n in os.environ.get("BENCH_TARGETS", "").split(",") if n]
    live = [t for t in targets if not t.get("unavailable") and (not only or t["name"] in only)]
    for t in targets:
        if t.get("unavailable"):
            log(f"! {t['label']}: not measured: {t['unavailable']}")
    total = len(live) * len(concurrency) * rounds
    log(f"{len(live)} targets x concurrency {concurrency} x {rounds} rounds x {seconds} s "
        f"= {total} runs, about {total * (seconds + 1) // 60 + 1} min")
    if warmup:
        for t in live:
            log(f"warm-up {t['label']} ({warmup} s at 16 connections)")
            measure(t, 16, warmup)
    runs = []
    n = 0
    for rnd in range(rounds):
        for c in concurrency:
            # Rotate the order every round so that no target always runs first or last.
            order = live[rnd % len(live):] + live[:rnd % len(live)] if live else []
            for t in order:
                n += 1
                m = measure(t, c, seconds)
                m["round"] = rnd + 1
                runs.append(m)
                flag = f"  ERRORS {m['failed']} ({m['error_rate']:.1%})" if m["failed"] else ""
                log(f"[{n}/{total}] round {rnd + 1} c={c:<3} {t['label']:<28} "
                    f"{m['rps']:>9.0f} req/s  p50 {m['p50_ms']:7.3f} ms  p99 {m['p99_ms']:7.3f} ms{flag}")
                time.sleep(1)
                with open(out_path, "w") as f:
                    json.dump({"targets": targets, "seconds": seconds, "rounds": rounds,
                               "concurrency": concurrency, "runs": runs}, f, indent=1)
    return 0


def soak(target_path, out_path):
    with open(target_path) as f:
        target = json.load(f)
    seconds = env_int("BENCH_SOAK_SECONDS", 600)
    interval = env_int("BENCH_SOAK_INTERVAL", 5)
    connections = env_int("BENCH_SOAK_CONNECTIONS", 64)
    pids = process_tree(target["pids"])
    samples = [{"t": 0.0, "rss_mib": rss_mib(pids)}]
    log(f"soak: {target['label']} at {connections} connections for {seconds} s, "
        f"RSS every {interval} s (idle RSS {samples[0]['rss_mib']:.1f} MiB)")
    cpu0 = cpu_seconds(pids)
    env = dict(os.environ, BENCH_BODY=target["body"])
    cmd = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s",
           "-s", WRK_LUA]
    for h in target.get("headers", []):
        cmd += ["-H", h]
    cmd.append(target["url"])
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    next_at = start + interval
    while proc.poll() is None:
        time.sleep(max(0.0, min(next_at, start + seconds + 30) - time.time()))
        if proc.poll() is not None:
            break
        now = time.time()
        if now >= next_at:
            s = {"t": round(now - start, 1), "rss_mib": rss_mib(process_tree(target["pids"]))}
            samples.append(s)
            next_at += interval
            if len(samples) % max(1, 60 // interval) == 0:
                log(f"{s['t']:6.0f} s  RSS {s['rss_mib']:.1f} MiB")
    stdout, stderr = proc.communicate()
    cpu1 = cpu_seconds(process_tree(target["pids"]))
    result = None
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            break
    if result is None:
        raise RuntimeError(f"wrk printed no result:\n{stdout}\n{stderr}")
    samples.append({"t": round(time.time() - start, 1),
                    "rss_mib": rss_mib(process_tree(target["pids"]))})
    e = result["errors"]
    failed = e["status"] + e["connect"] + e["read"] + e["write"] + e["timeout"]
    out = {"target": target, "seconds": seconds, "interval": interval,
           "connections": connections, "samples": samples, "requests": result["requests"],
           "failed": failed, "errors": e, "rps": result["requests"] / (result["duration_us"] / 1e6),
           "p50_ms": result["latency_us"]["p50"] / 1000, "p99_ms": result["latency_us"]["p99"] / 1000,
           "cpu_s": cpu1 - cpu0}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    log(f"soak done: {result['requests']} requests, {failed} failed, RSS "
        f"{samples[0]['rss_mib']:.1f} -> {samples[-1]['rss_mib']:.1f} MiB "
        f"(max {max(s['rss_mib'] for s in samples):.1f})")
    return 0


def count_established(port, local=True):
    """Established TCP connections whose local (or remote) port is `port`."""
    side = "sport" if local else "dport"
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( {side} = :{port} )"],
                         capture_output=True, text=True)
    return len([line for line in out.stdout.splitlines() if line.strip()])


def streams(target_path, out_path):
    with open(target_path) as f:
        target = json.load(f)
    n = env_int("BENCH_STREAMS", 1000)
    seconds = env_int("BENCH_STREAM_SECONDS", 30)
    client_port = int(target["url"].split(":")[2].split("/")[0])
    upstream_port = target["upstream_port"]
    pids = process_tree(target["pids"])
    idle = rss_mib(pids)
    reset_ok = reset_peak_rss(pids)
    log(f"streams: {n} concurrent SSE streams against {target['label']} for {seconds} s "
        f"(idle RSS {idle:.1f} MiB)")
    env = dict(os.environ, BENCH_BODY=target["body"])
    cmd = ["wrk", "-t", "2", "-c", str(n), "-d", f"{seconds}s", "--timeout", "120s", "-s", WRK_LUA]
    for h in target.get("headers", []):
        cmd += ["-H", h]
    cmd.append(target["url"])
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = []
    while proc.poll() is None:
        time.sleep(1)
        p = process_tree(target["pids"])
        samples.append({"t": round(time.time() - start, 1), "rss_mib": rss_mib(p),
                        "client_conns": count_established(client_port),
                        "upstream_conns": count_established(upstream_port, local=False)})
    stdout, stderr = proc.communicate()
    result = None
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            break
    if result is None:
        raise RuntimeError(f"wrk printed no result:\n{stdout}\n{stderr}")
    pids = process_tree(target["pids"])
    peak = peak_rss_mib(pids) if reset_ok else max(s["rss_mib"] for s in samples)
    e = result["errors"]
    failed = e["status"] + e["connect"] + e["read"] + e["write"] + e["timeout"]
    out = {"target": target, "streams": n, "seconds": seconds, "idle_rss_mib": idle,
           "peak_rss_mib": peak, "peak_is_vmhwm": reset_ok,
           "max_client_conns": max((s["client_conns"] for s in samples), default=0),
           "max_upstream_conns": max((s["upstream_conns"] for s in samples), default=0),
           "completed": result["requests"], "failed": failed, "errors": e,
           "p50_ms": result["latency_us"]["p50"] / 1000, "samples": samples}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    log(f"streams done: peak RSS {peak:.1f} MiB (idle {idle:.1f}), up to "
        f"{out['max_client_conns']} client and {out['max_upstream_conns']} upstream connections "
        f"open at once, {result['requests']} streams completed, {failed} failed")
    return 0


def load(targets_path, spec):
    name, connections, seconds = spec.split(":")
    with open(targets_path) as f:
        target = next(t for t in json.load(f) if t["name"] == name)
    r = wrk(target, int(connections), int(seconds))
    log(f"load: {r['requests']} requests in {r['duration_us'] / 1e6:.1f} s")
    return 0


def malloc_calls(path):
    """Calls to malloc in a callgrind dump, by every caller. Function names are compressed
    in the format (`(id) name` the first time, `(id)` after), so the names are collected
    as they are defined."""
    names, mallocs, callee = {}, 0, None
    with open(path) as f:
        for line in f:
            if line.startswith(("fn=", "cfn=")):
                ref = line.split("=", 1)[1].strip()
                num, _, name = ref.partition(" ")
                if name:
                    names[num] = name
                if line.startswith("cfn="):
                    callee = names.get(num)
            elif line.startswith("calls=") and callee == "malloc":
                mallocs += int(line.split("=", 1)[1].split()[0])
    return mallocs


def self_costs(path, top):
    """All instructions, and the functions with the most of their own, from
    callgrind_annotate."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", "--auto=no", path],
                         capture_output=True, text=True, timeout=300).stdout
    # One function's instructions are listed per source file they come from (its own and
    # what was inlined into it): summed by function.
    costs, total = {}, 0
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*)$", line)
        if m and "PROGRAM TOTALS" in line:
            total = int(m.group(1).replace(",", ""))
        if not m or "PROGRAM TOTALS" in line:
            continue
        # "file:function [object]": the function, without its file and object.
        where = re.sub(r"\s+\[[^\]]*\]$", "", m.group(2))
        func = re.sub(r"^(?:\S*?\.(?:rs|c|S|h)|\?\?\?):", "", where)
        costs[func] = costs.get(func, 0) + int(m.group(1).replace(",", ""))
    return total, sorted(((n, f) for f, n in costs.items()), reverse=True)[:top]


def count(target_path, out_path):
    """Instructions and allocations per request of the node in TARGET.json, which runs under
    `valgrind --tool=callgrind --instr-atstart=no`: instrumented only while wrk measures
    (after a warm-up), so start-up and warm-up do not count. Deterministic where wall-clock
    runs on a shared machine move by 10-30%."""
    with open(target_path) as f:
        target = json.load(f)
    pid, dump = target["pids"][0], target["callgrind_out"]
    seconds = int(os.environ.get("BENCH_COUNT_SECONDS") or 8)
    connections = int(os.environ.get("BENCH_COUNT_CONNECTIONS") or 4)
    log(f"warm-up: {connections} connections for 3 s (not counted)")
    wrk(target, connections, 3, threads=1)

    def control(*args):
        subprocess.run(["callgrind_control", *args, str(pid)], check=True,
                       capture_output=True, timeout=120)

    control("-i", "on")
    r = wrk(target, connections, seconds, threads=1)
    control("-i", "off")
    control("-d")
    dumps = sorted((p for p in os.listdir(os.path.dirname(dump))
                    if p.startswith(os.path.basename(dump) + ".")),
                   key=lambda p: int(p.rsplit(".", 1)[1]))
    if not dumps:
        raise RuntimeError("callgrind wrote no dump")
    path = os.path.join(os.path.dirname(dump), dumps[-1])
    mallocs = malloc_calls(path)
    total, top = self_costs(path, 15)
    e = r["errors"]
    failed = e["status"] + e["connect"] + e["read"] + e["write"] + e["timeout"]
    requests = r["requests"]
    result = {
        "target": target["name"], "label": target["label"], "connections": connections,
        "seconds": r["duration_us"] / 1e6, "requests": requests, "failed": failed,
        "instructions": total, "mallocs": mallocs,
        "instructions_per_request": total / requests if requests else 0,
        "mallocs_per_request": mallocs / requests if requests else 0,
        "top": [{"instructions": n, "function": fn} for n, fn in top],
    }
    log(f"count: {requests} requests, {result['instructions_per_request']:,.0f} instructions "
        f"and {result['mallocs_per_request']:.1f} allocations per request")
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if requests and not failed else 1


def main(argv):
    modes = {"compare": compare, "soak": soak, "streams": streams, "load": load, "count": count}
    if len(argv) != 4 or argv[1] not in modes:
        print(__doc__, file=sys.stderr)
        return 2
    return modes[argv[1]](argv[2], argv[3])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
