#!/usr/bin/env bash
# The gateway benchmark: crisp side by side with nginx, LiteLLM and Portkey on this
# machine, against one upstream that answers OpenAI chat completions at once.
#
#   bench/run.sh            compare every target (writes docs/performance.md and .svg)
#   bench/run.sh soak       crisp's RSS under steady load (BENCH_SOAK_SECONDS, 600)
#   bench/run.sh streams    crisp's peak RSS with BENCH_STREAMS (1000) SSE streams open
#   bench/run.sh profile    where crisp's time goes: perf at 64 connections (shares and a
#                           flame graph, docs/performance-flame.svg), and crisp measured
#                           again with durability "write", on tmpfs and on event loops
#   bench/run.sh count      crisp's user-space instructions and heap allocations per
#                           request, counted under valgrind's callgrind (deterministic)
#   bench/run.sh all        compare, soak, profile and streams in turn
#
# Settings (environment): BENCH_SECONDS (10) per run, BENCH_ROUNDS (3), BENCH_CONCURRENCY
# (1,16,64), BENCH_WARMUP_SECONDS (3), BENCH_TARGETS (names to measure, e.g.
# direct,crisp-x; all by default), BENCH_PORT_BASE (19000), BENCH_CRISP (a crisp binary to
# use instead of building one), BENCH_KEEP=1 keeps the working directory, BENCH_NO_DOCS=1
# prints the results without touching docs/. Soak: BENCH_SOAK_SECONDS (600),
# BENCH_SOAK_CONNECTIONS (64), BENCH_SOAK_INTERVAL (5 s between RSS samples),
# BENCH_SOAK_TARGET (the node soaked: crisp, crisp-w or crisp-p). Streams:
# BENCH_STREAMS (1000), BENCH_STREAM_SECONDS (30), BENCH_SLOW_RATE (100 bytes/s per
# stream from the upstream). Profile: BENCH_PROFILE_SECONDS (10 s under perf),
# BENCH_PROFILE_ROUNDS (3), BENCH_PROFILE_TARGET (the node under perf: crisp, crisp-w,
# crisp-tmpfs, crisp-loops or crisp-p). Target names: direct, nginx, stack (a tokio + hyper
# pass-through, crates/engine/examples/passthrough.rs), litellm, portkey, crisp, crisp-w,
# crisp-p, crisp-x. Count: BENCH_COUNT_SECONDS (8 s counted),
# BENCH_COUNT_CONNECTIONS (4).
# Everything listens on 127.0.0.1 only and every process started here is stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
MODE=${1:-compare}
case $MODE in compare | soak | streams | profile | count | all) ;; *)
    echo "usage: bench/run.sh [compare|soak|streams|profile|count|all]" >&2
    exit 2
    ;;
esac

# Pinned versions of what crisp is compared with.
LITELLM_VERSION=1.106.12
PORTKEY_VERSION=1.15.2
INFERNO_VERSION=0.12.8 # flame graphs in profile mode

CACHE=${BENCH_CACHE:-$HOME/.cache/crisp}
VENV=$CACHE/bench-venv
NPM_DIR=$CACHE/bench-npm
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
CRISP=${BENCH_CRISP:-$CARGO_TARGET_DIR/release/crisp}
PY=${PYTHON:-python3}

BASE=${BENCH_PORT_BASE:-19000}
UP_JSON=$((BASE + 80))   # upstream, JSON answers
UP_SSE=$((BASE + 81))    # upstream, SSE answers
UP_SLOW=$((BASE + 82))   # upstream, SSE trickled for long-lived streams
NGINX_PROXY=$((BASE + 83))
LITELLM_PORT=$((BASE + 84))
PORTKEY_PORT=$((BASE + 85))
CRISP_IN=$((BASE + 86))  # in-region node: client, +100 peer, +200 admin
CRISP_A=$((BASE + 87))   # cross-region, entry node (eu-central-1)
CRISP_B=$((BASE + 88))   # cross-region, serving node (eu-west-1)
CRISP_TMPFS=$((BASE + 89))   # profile mode: audit trail on tmpfs
CRISP_WRITE=$((BASE + 90))   # in-region node with [audit] durability = "write"
CRISP_LOOPS=$((BASE + 91))   # profile mode: "write" node serving clients on one event loop per core
CRISP_POLL=$((BASE + 92))    # "write" node whose client event loops busy-poll (--busy-poll)
STACK_PORT=$((BASE + 93))    # tokio + hyper pass-through: crisp's libraries without crisp's work
BUSY_POLL_US=100             # how long those loops poll after their last read or write

NPROC=$(nproc)
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')
step() { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
    printf '\nerror: %s\n' "$*" >&2
    exit 1
}

# Long-lived streams and 64 connections through several hops need descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# On disk, not tmpfs: the audit trail's fdatasync must reach a real disk.
RUN=$(mktemp -d "${TMPDIR:-/var/tmp}/crisp-bench.XXXXXX")
SHM=""
PIDS=()
OTHERS=() # what only the comparison needs, stopped before the crisp-only modes
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    sleep 1
    for pid in "${PIDS[@]}"; do
        # The whole group: LiteLLM and nginx have worker processes of their own.
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    [[ -z $SHM ]] || rm -rf "$SHM"
    if [[ ${BENCH_KEEP:-} == 1 ]]; then
        echo "working directory kept: $RUN"
    else
        rm -rf "$RUN"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------
step "Installing what the benchmark needs (cached in $CACHE)"
need_apt=()
command -v nginx >/dev/null || need_apt+=(nginx)
command -v wrk >/dev/null || need_apt+=(wrk)
command -v ss >/dev/null || need_apt+=(iproute2)
command -v curl >/dev/null || need_apt+=(curl)
command -v node >/dev/null || need_apt+=(nodejs npm)
"$PY" -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [[ $MODE == profile || $MODE == all ]] && ! command -v perf >/dev/null; then
    need_apt+=(linux-perf)
fi
if [[ $MODE == count ]] && ! command -v callgrind_control >/dev/null; then
    need_apt+=(valgrind)
fi
if ((${#need_apt[@]})); then
    note "apt-get install ${need_apt[*]}"
    SUDO=""
    [[ $(id -u) == 0 ]] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
mkdir -p "$CACHE"
if [[ $MODE == compare || $MODE == all ]]; then
    if [[ $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null) != "$LITELLM_VERSION" ]]; then
        note "LiteLLM $LITELLM_VERSION into $VENV (a few minutes, once)"
        "$PY" -m venv "$VENV"
        "$VENV/bin/pip" install -q --upgrade pip
        "$VENV/bin/pip" install -q "litellm[proxy]==$LITELLM_VERSION"
    fi
    PORTKEY_JS=$NPM_DIR/node_modules/@portkey-ai/gateway/build/start-server.js
    if [[ $(node -p "require('$NPM_DIR/node_modules/@portkey-ai/gateway/package.json').version" 2>/dev/null) != "$PORTKEY_VERSION" ]]; then
        note "Portkey gateway $PORTKEY_VERSION into $NPM_DIR"
        mkdir -p "$NPM_DIR"
        (cd "$NPM_DIR" && { [[ -f package.json ]] || echo '{"private": true}' >package.json; } &&
            npm install --no-audit --no-fund --silent "@portkey-ai/gateway@$PORTKEY_VERSION")
    fi
fi
FLAMEGRAPH=$CACHE/inferno-$INFERNO_VERSION/bin/inferno-flamegraph
if [[ $MODE == profile || $MODE == all ]] && [[ ! -x $FLAMEGRAPH ]]; then
    note "inferno $INFERNO_VERSION (flame graphs) into $CACHE/inferno-$INFERNO_VERSION"
    cargo install -q --locked --no-default-features --features cli --version "$INFERNO_VERSION" \
        --root "$CACHE/inferno-$INFERNO_VERSION" inferno 2>&1 | tail -n 2
fi
if [[ -z ${BENCH_CRISP:-} ]]; then
    step "Building crisp (cargo build --release -p crisp)"
    (cd "$ROOT" && cargo build --release -p crisp 2>&1 | tail -n 2)
fi
[[ -x $CRISP ]] || die "no binary at $CRISP"
PASSTHROUGH=$CARGO_TARGET_DIR/release/examples/passthrough
if [[ $MODE == compare || $MODE == all ]]; then
    step "Building the tokio + hyper pass-through (cargo build --release --example passthrough)"
    (cd "$ROOT" && cargo build --release -p crisp-engine --example passthrough 2>&1 | tail -n 2)
fi

# ---------------------------------------------------------------------------------------
# render TEMPLATE OUT KEY=VALUE...: replaces @KEY@ placeholders.
render() {
    local src=$1 out=$2 kv
    shift 2
    local args=()
    for kv in "$@"; do
        args+=(-e "s|@${kv%%=*}@|${kv#*=}|g")
    done
    sed "${args[@]}" "$src" >"$out"
    if grep -q '@[A-Z_]*@' "$out"; then die "unrendered placeholder in $out"; fi
}

port_free() { ! ss -Htln "( sport = :$1 )" | grep -q .; }
wait_port() { # port seconds what
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        if ! port_free "$1"; then return 0; fi
        sleep 0.1
    done
    return 1
}

# start NAME DIR CMD...: runs CMD in its own process group, output to DIR/NAME.log.
start() {
    local name=$1 dir=$2
    shift 2
    (cd "$dir" && exec setsid "$@" >"$RUN/$name.log" 2>&1) &
    PIDS+=($!)
    LAST_PID=$!
}

for p in $UP_JSON $UP_SSE $UP_SLOW $NGINX_PROXY $LITELLM_PORT $PORTKEY_PORT \
    $CRISP_IN $((CRISP_IN + 100)) $((CRISP_IN + 200)) $CRISP_A $((CRISP_A + 100)) \
    $((CRISP_A + 200)) $CRISP_B $((CRISP_B + 100)) $((CRISP_B + 200)) \
    $CRISP_TMPFS $((CRISP_TMPFS + 100)) $((CRISP_TMPFS + 200)) \
    $CRISP_WRITE $((CRISP_WRITE + 100)) $((CRISP_WRITE + 200)) \
    $CRISP_LOOPS $((CRISP_LOOPS + 100)) $((CRISP_LOOPS + 200)) \
    $CRISP_POLL $((CRISP_POLL + 100)) $((CRISP_POLL + 200)) $STACK_PORT; do
    port_free "$p" || die "port $p is in use; move every port with BENCH_PORT_BASE=N (now $BASE)"
done

BODY='{"model":"MODEL","max_tokens":16,"messages":[{"role":"user","content":"Say hello to the benchmark."}]}'
body_for() { echo "${BODY/MODEL/$1}"; }
STREAM_BODY='{"model":"bench","stream":true,"max_tokens":16,"messages":[{"role":"user","content":"Say hello to the benchmark."}]}'

# The targets file the driver reads: one JSON object per line, joined at the end.
TARGETS=$RUN/targets.jsonl
: >"$TARGETS"
add_target() { # name label url body pids headers...
    "$PY" - "$@" >>"$TARGETS" <<'EOF'
import json, sys
name, label, url, body, pids, *headers = sys.argv[1:]
print(json.dumps({"name": name, "label": label, "url": url, "body": body,
                  "pids": [int(p) for p in pids.split()], "headers": headers}))
EOF
}
unavailable() { # name label why
    "$PY" -c 'import json,sys; print(json.dumps({"name":sys.argv[1],"label":sys.argv[2],"unavailable":sys.argv[3]}))' \
        "$1" "$2" "$3" >>"$TARGETS"
    note "! $2 will be reported as not measured: $3"
}

# check URL BODY WANT HEADERS...: one request must answer 200 with WANT in its body.
CHECK_ERR=""
check() {
    local url=$1 body=$2 want=$3 out code
    shift 3
    local hdr=(-H 'content-type: application/json')
    local h
    for h in "$@"; do hdr+=(-H "$h"); done
    out=$(curl -s -m 30 -D "$RUN/check.headers" -o "$RUN/check.body" -w '%{http_code}' "${hdr[@]}" -d "$body" "$url") || true
    code=${out:-000}
    if [[ $code == 200 ]] && grep -q "$want" "$RUN/check.body"; then
        return 0
    fi
    CHECK_ERR="HTTP $code: $(head -c 300 "$RUN/check.body" 2>/dev/null | tr '\n' ' ')"
    return 1
}
retry_check() { # seconds url body want headers...
    local deadline=$((SECONDS + $1))
    shift
    until check "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

start_upstream() {
    step "Starting the upstream (nginx answering at once on :$UP_JSON JSON, :$UP_SSE SSE, :$UP_SLOW slow SSE)"
    mkdir -p "$RUN/upstream"
    render "$BENCH/conf/nginx-upstream.conf" "$RUN/upstream/nginx.conf" DIR="$RUN/upstream" \
        WORKERS=auto JSON_PORT=$UP_JSON SSE_PORT=$UP_SSE SLOW_PORT=$UP_SLOW \
        SLOW_RATE="${BENCH_SLOW_RATE:-100}"
    start upstream "$RUN/upstream" nginx -p "$RUN/upstream" -c "$RUN/upstream/nginx.conf"
    UPSTREAM_PID=$LAST_PID
    wait_port $UP_JSON 10 && wait_port $UP_SLOW 10 || die "the upstream nginx did not start: $(cat "$RUN/upstream.log")"
    check "http://127.0.0.1:$UP_JSON/v1/chat/completions" "$(body_for bench)" '"chat.completion"' ||
        die "upstream: $CHECK_ERR"
    check "http://127.0.0.1:$UP_SSE/v1/chat/completions" "$STREAM_BODY" 'data: \[DONE\]' ||
        die "upstream SSE: $CHECK_ERR"
}

# crisp_dir DIR: access files, a key, certificates for the regions given.
crisp_files() { # dir config-template regions... (the key is left in DIR/api-key)
    local dir=$1
    shift
    local region
    mkdir -p "$dir"
    cp "$BENCH/conf/principals.toml" "$BENCH/conf/policies.cedar" "$dir/"
    "$CRISP" certs init --deployment bench --dir "$dir/certs" >/dev/null
    for region in "$@"; do
        "$CRISP" certs issue --deployment bench --region "$region" --dir "$dir/certs" >/dev/null
    done
    "$CRISP" keys create --config "$dir/crisp.toml" --principal bench >"$dir/api-key"
    "$CRISP" check --config "$dir/crisp.toml" >/dev/null
    "$CRISP" profiles lock --config "$dir/crisp.toml" >/dev/null
}

# What crisp runs under (count mode: valgrind), and how long it may take to listen.
CRISP_WRAP=()
CRISP_START_SECONDS=20
AUDIT_EXTRA="" # more [audit] settings for the in-region node
start_crisp_in_region() { # upstream-port max-concurrency [client-port name audit-dir durability client-threads busy-poll-us]
    local port=${3:-$CRISP_IN} name=${4:-crisp-in} audit=${5:-audit/{region\}} durability=${6:-fsync}
    local threads=()
    [[ -z ${7:-} ]] || threads=(--client-threads "$7")
    [[ -z ${8:-} ]] || threads+=(--busy-poll "$8")
    step "Starting $name: crisp in one region (API key, Cedar policy, audit trail in $audit with durability $durability; backend :$1)"
    local dir=$RUN/$name
    # A fresh node each time (a mode run after another may reuse the name).
    rm -rf "$dir"
    mkdir -p "$dir"
    render "$BENCH/conf/crisp-in-region.toml" "$dir/crisp.toml" CLIENT_PORT="$port" \
        PEER_PORT=$((port + 100)) ADMIN_PORT=$((port + 200)) UPSTREAM_PORT="$1" \
        MAX_CONCURRENCY="$2" AUDIT_DIR="$audit" DURABILITY="$durability" AUDIT_EXTRA="$AUDIT_EXTRA"
    crisp_files "$dir" eu-central-1
    start "$name" "$dir" "${CRISP_WRAP[@]}" "$CRISP" serve --config crisp.toml --region eu-central-1 "${threads[@]}"
    CRISP_IN_PID=$LAST_PID
    CRISP_KEY=$(cat "$dir/api-key")
    wait_port "$port" "$CRISP_START_SECONDS" || die "crisp did not start: $(tail -n 20 "$RUN/$name.log")"
}

start_crisp_cross_region() {
    step "Starting crisp in two regions over the mutual-TLS backbone (enter eu-central-1, run in eu-west-1)"
    local dir=$RUN/crisp-x
    mkdir -p "$dir"
    render "$BENCH/conf/crisp-cross-region.toml" "$dir/crisp.toml" \
        A_CLIENT_PORT=$CRISP_A A_PEER_PORT=$((CRISP_A + 100)) A_ADMIN_PORT=$((CRISP_A + 200)) \
        B_CLIENT_PORT=$CRISP_B B_PEER_PORT=$((CRISP_B + 100)) B_ADMIN_PORT=$((CRISP_B + 200)) \
        UPSTREAM_PORT=$UP_SSE MAX_CONCURRENCY=256
    crisp_files "$dir" eu-central-1 eu-west-1
    start crisp-a "$dir" "$CRISP" serve --config crisp.toml --region eu-central-1
    CRISP_A_PID=$LAST_PID
    start crisp-b "$dir" "$CRISP" serve --config crisp.toml --region eu-west-1
    CRISP_B_PID=$LAST_PID
    OTHERS+=("$CRISP_A_PID" "$CRISP_B_PID")
    CRISP_X_KEY=$(cat "$dir/api-key")
    wait_port $CRISP_A 20 && wait_port $CRISP_B 20 ||
        die "crisp did not start: $(tail -n 20 "$RUN/crisp-a.log" "$RUN/crisp-b.log")"
}

versions() {
    "$PY" - "$RUN/meta.json" <<EOF
import json, os, platform, re, subprocess, sys
def sh(*a):
    try:
        r = subprocess.run(a, capture_output=True, text=True, timeout=20)
        return (r.stdout + r.stderr).strip()
    except Exception as e:
        return f"unknown ({e})"
def dpkg(p):
    v = sh("dpkg-query", "-W", "-f", "\${Version}", p)
    return v if v and "no packages" not in v else None
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
nginx = sh("nginx", "-v").replace("nginx version: ", "")
wrk = sh("wrk", "-v").splitlines()[0] if sh("wrk", "-v") else "wrk"
meta = {
    "date": "$STARTED",
    "nproc": os.cpu_count(), "cpu": cpu, "mem_gib": round(mem / 1024 / 1024, 1),
    "kernel": platform.release(),
    "os": next((l.split("=", 1)[1].strip().strip('"') for l in open("/etc/os-release") if l.startswith("PRETTY_NAME=")), "unknown"),
    "nginx": nginx + (f" (Debian {dpkg('nginx')})" if dpkg("nginx") else ""),
    "wrk": re.sub(r"\s+Copyright.*", "", wrk) + (f" (Debian {dpkg('wrk')})" if dpkg("wrk") else ""),
    "litellm": "$LITELLM_VERSION", "portkey": "$PORTKEY_VERSION",
    "python": sh("$VENV/bin/python", "--version").replace("Python ", "") if os.path.exists("$VENV/bin/python") else None,
    "node": sh("node", "--version"),
    "crisp": sh("git", "-C", "$ROOT", "rev-parse", "--short=12", "HEAD")
             + (" (with uncommitted changes)" if sh("git", "-C", "$ROOT", "status", "--porcelain", "--untracked-files=no") else ""),
    "rustc": sh("rustc", "--version"),
    "seconds": int(os.environ.get("BENCH_SECONDS") or 10),
    "rounds": int(os.environ.get("BENCH_ROUNDS") or 3),
    "nginx_workers": $NPROC, "litellm_workers": $NPROC,
}
json.dump(meta, open(sys.argv[1], "w"), indent=1)
EOF
}

report() { # kind result-file [extra args]
    local docs=(--doc "$ROOT/docs/performance.md")
    [[ ${BENCH_NO_DOCS:-} == 1 ]] && docs=()
    "$PY" "$BENCH/lib/report.py" "$1" "$2" "$RUN/meta.json" "${docs[@]}" "${@:3}"
}

# start_write_node crisp-w|crisp-p: starts that in-region node with [audit] durability =
# "write" (crisp-p: client connections on busy-polling event loops), checks that it
# answers and adds it as a target; its PID and label in WRITE_NODE_PID and
# WRITE_NODE_LABEL. CRISP_IN_PID and CRISP_KEY keep naming the default node.
WRITE_NODE_PID="" WRITE_NODE_LABEL=""
start_write_node() {
    local name=$1 port in_pid=${CRISP_IN_PID:-} in_key=${CRISP_KEY:-}
    case $name in
    crisp-w)
        port=$CRISP_WRITE WRITE_NODE_LABEL="crisp, in-region, durability write"
        start_crisp_in_region $UP_SSE 256 $port crisp-w audit/{region} write
        ;;
    crisp-p)
        port=$CRISP_POLL
        WRITE_NODE_LABEL="crisp, in-region, durability write, busy-polling client threads"
        start_crisp_in_region $UP_SSE 256 $port crisp-p audit/{region} write "$NPROC" $BUSY_POLL_US
        ;;
    *) die "$name: not one of crisp, crisp-w, crisp-p" ;;
    esac
    WRITE_NODE_PID=$CRISP_IN_PID
    retry_check 20 "http://127.0.0.1:$port/v1/chat/completions" "$(body_for bench)" \
        'Hello from the bench' "authorization: Bearer $CRISP_KEY" || die "$name: $CHECK_ERR"
    add_target "$name" "$WRITE_NODE_LABEL" "http://127.0.0.1:$port/v1/chat/completions" \
        "$(body_for bench)" "$WRITE_NODE_PID" "authorization: Bearer $CRISP_KEY"
    CRISP_IN_PID=$in_pid CRISP_KEY=$in_key
}

# ---------------------------------------------------------------------------------------
run_compare() {
    start_upstream
    add_target direct "direct (nginx upstream)" "http://127.0.0.1:$UP_JSON/v1/chat/completions" \
        "$(body_for bench)" "$UPSTREAM_PID"

    step "Starting nginx as a reverse proxy (:$NGINX_PROXY, upstream keep-alive)"
    mkdir -p "$RUN/proxy"
    render "$BENCH/conf/nginx-proxy.conf" "$RUN/proxy/nginx.conf" DIR="$RUN/proxy" WORKERS=auto \
        JSON_PORT=$UP_JSON PROXY_PORT=$NGINX_PROXY
    start nginx-proxy "$RUN/proxy" nginx -p "$RUN/proxy" -c "$RUN/proxy/nginx.conf"
    local proxy_pid=$LAST_PID
    OTHERS+=("$proxy_pid")
    wait_port $NGINX_PROXY 10 || die "nginx proxy did not start: $(cat "$RUN/nginx-proxy.log")"
    check "http://127.0.0.1:$NGINX_PROXY/v1/chat/completions" "$(body_for bench)" '"chat.completion"' ||
        die "nginx proxy: $CHECK_ERR"
    add_target nginx "nginx proxy_pass" "http://127.0.0.1:$NGINX_PROXY/v1/chat/completions" \
        "$(body_for bench)" "$proxy_pid"

    step "Starting the tokio + hyper pass-through (:$STACK_PORT): crisp's libraries, none of its work"
    start stack "$RUN" "$PASSTHROUGH" "127.0.0.1:$STACK_PORT" "127.0.0.1:$UP_JSON" "$NPROC"
    local stack_pid=$LAST_PID
    OTHERS+=("$stack_pid")
    wait_port $STACK_PORT 10 || die "the pass-through did not start: $(cat "$RUN/stack.log")"
    check "http://127.0.0.1:$STACK_PORT/v1/chat/completions" "$(body_for bench)" '"chat.completion"' ||
        die "pass-through: $CHECK_ERR"
    add_target stack "tokio + hyper pass-through, one event loop per core" "http://127.0.0.1:$STACK_PORT/v1/chat/completions" \
        "$(body_for bench)" "$stack_pid"

    step "Starting LiteLLM proxy $LITELLM_VERSION (:$LITELLM_PORT, $NPROC workers)"
    mkdir -p "$RUN/litellm"
    render "$BENCH/conf/litellm.yaml" "$RUN/litellm/config.yaml" JSON_PORT=$UP_JSON
    LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR start litellm "$RUN/litellm" \
        "$VENV/bin/litellm" --config "$RUN/litellm/config.yaml" --host 127.0.0.1 \
        --port $LITELLM_PORT --num_workers "$NPROC"
    local litellm_pid=$LAST_PID
    OTHERS+=("$litellm_pid")
    local litellm_auth='authorization: Bearer sk-bench-master'
    if ! wait_port $LITELLM_PORT 120; then
        unavailable litellm "LiteLLM $LITELLM_VERSION" "did not listen within 120 s: $(tail -n 5 "$RUN/litellm.log" | tr '\n' ' ')"
    elif ! retry_check 60 "http://127.0.0.1:$LITELLM_PORT/v1/chat/completions" "$(body_for bench)" \
        'Hello from the bench' "$litellm_auth"; then
        unavailable litellm "LiteLLM $LITELLM_VERSION" "$CHECK_ERR"
    else
        add_target litellm "LiteLLM $LITELLM_VERSION" "http://127.0.0.1:$LITELLM_PORT/v1/chat/completions" \
            "$(body_for bench)" "$litellm_pid" "$litellm_auth"
    fi

    step "Starting Portkey gateway $PORTKEY_VERSION (:$PORTKEY_PORT, node $(node --version))"
    mkdir -p "$RUN/portkey"
    NODE_ENV=production start portkey "$RUN/portkey" node "$PORTKEY_JS" --port=$PORTKEY_PORT --headless
    local portkey_pid=$LAST_PID
    OTHERS+=("$portkey_pid")
    local portkey_hdr=("x-portkey-provider: openai"
        "x-portkey-custom-host: http://127.0.0.1:$UP_JSON/v1"
        "authorization: Bearer sk-bench-upstream")
    if ! wait_port $PORTKEY_PORT 60; then
        unavailable portkey "Portkey $PORTKEY_VERSION" "did not listen within 60 s: $(tail -n 5 "$RUN/portkey.log" | tr '\n' ' ')"
    elif ! retry_check 30 "http://127.0.0.1:$PORTKEY_PORT/v1/chat/completions" "$(body_for bench)" \
        'Hello from the bench' "${portkey_hdr[@]}"; then
        unavailable portkey "Portkey $PORTKEY_VERSION" "$CHECK_ERR"
    else
        add_target portkey "Portkey $PORTKEY_VERSION" "http://127.0.0.1:$PORTKEY_PORT/v1/chat/completions" \
            "$(body_for bench)" "$portkey_pid" "${portkey_hdr[@]}"
    fi

    start_crisp_in_region $UP_SSE 256
    retry_check 20 "http://127.0.0.1:$CRISP_IN/v1/chat/completions" "$(body_for bench)" \
        'Hello from the bench' "authorization: Bearer $CRISP_KEY" || die "crisp in-region: $CHECK_ERR"
    check "http://127.0.0.1:$CRISP_IN/v1/chat/completions" "$(body_for bench)" 'Hello' \
        "authorization: Bearer wrong-key" && die "crisp answered a request with a wrong key"
    add_target crisp "crisp, in-region" "http://127.0.0.1:$CRISP_IN/v1/chat/completions" \
        "$(body_for bench)" "$CRISP_IN_PID" "authorization: Bearer $CRISP_KEY"
    start_write_node crisp-w
    OTHERS+=("$WRITE_NODE_PID")
    start_write_node crisp-p
    OTHERS+=("$WRITE_NODE_PID")

    start_crisp_cross_region
    retry_check 30 "http://127.0.0.1:$CRISP_A/v1/chat/completions" "$(body_for global.bench)" \
        'Hello from the bench' "authorization: Bearer $CRISP_X_KEY" || die "crisp cross-region: $CHECK_ERR"
    grep -qi '^x-crisp-inference-region: eu-west-1' "$RUN/check.headers" ||
        die "crisp cross-region: the request did not run in eu-west-1: $(cat "$RUN/check.headers")"
    add_target crisp-x "crisp, cross-region" "http://127.0.0.1:$CRISP_A/v1/chat/completions" \
        "$(body_for global.bench)" "$CRISP_A_PID $CRISP_B_PID" "authorization: Bearer $CRISP_X_KEY"

    "$PY" -c 'import json,sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1])]))' \
        "$TARGETS" >"$RUN/targets.json"
    step "Measuring (wrk, ${BENCH_SECONDS:-10} s per run, ${BENCH_ROUNDS:-3} rounds, targets interleaved)"
    "$PY" "$BENCH/lib/bench.py" compare "$RUN/targets.json" "$RUN/results.json"
    # Every answer crisp gave was audited: the trail must hold them.
    local events
    events=$(find "$RUN/crisp-in/audit" -type f | wc -l)
    note "crisp in-region audit directory holds $events files"
    step "Results"
    versions
    report compare "$RUN/results.json"
    if ((${#OTHERS[@]})); then
        local pid
        for pid in "${OTHERS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        for pid in "${OTHERS[@]}"; do
            wait "$pid" 2>/dev/null || true
            kill -KILL -- "-$pid" 2>/dev/null || true
        done
        OTHERS=()
    fi
}

run_soak() {
    [[ -n ${UPSTREAM_PID:-} ]] || start_upstream
    local name=${BENCH_SOAK_TARGET:-crisp} label
    : >"$TARGETS"
    if [[ $name == crisp ]]; then
        [[ -n ${CRISP_IN_PID:-} ]] || start_crisp_in_region $UP_SSE 256
        retry_check 20 "http://127.0.0.1:$CRISP_IN/v1/chat/completions" "$(body_for bench)" \
            'Hello from the bench' "authorization: Bearer $CRISP_KEY" || die "crisp: $CHECK_ERR"
        label="crisp, in-region"
        add_target crisp "$label" "http://127.0.0.1:$CRISP_IN/v1/chat/completions" \
            "$(body_for bench)" "$CRISP_IN_PID" "authorization: Bearer $CRISP_KEY"
    else
        start_write_node "$name"
        label=$WRITE_NODE_LABEL
    fi
    step "Soak: $label under load for ${BENCH_SOAK_SECONDS:-600} s, RSS sampled"
    "$PY" "$BENCH/lib/bench.py" soak "$TARGETS" "$RUN/soak.json"
    [[ -f $RUN/meta.json ]] || versions
    report soak "$RUN/soak.json"
}

run_streams() {
    [[ -n ${UPSTREAM_PID:-} ]] || start_upstream
    # A node of its own, pointed at the slow upstream, with room for every stream.
    if [[ -n ${CRISP_IN_PID:-} ]]; then
        kill -TERM "$CRISP_IN_PID"
        wait "$CRISP_IN_PID" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do port_free $CRISP_IN && break; sleep 0.2; done
        rm -rf "$RUN/crisp-in"
    fi
    local n=${BENCH_STREAMS:-1000}
    start_crisp_in_region $UP_SLOW $((n * 2))
    retry_check 60 "http://127.0.0.1:$CRISP_IN/v1/chat/completions" "$STREAM_BODY" \
        'data: \[DONE\]' "authorization: Bearer $CRISP_KEY" || die "crisp streams: $CHECK_ERR"
    "$PY" - "$RUN/stream-target.json" <<EOF
import json, sys
json.dump({"name": "crisp", "label": "crisp, in-region", "url": "http://127.0.0.1:$CRISP_IN/v1/chat/completions",
           "body": '$STREAM_BODY', "pids": [$CRISP_IN_PID], "upstream_port": $UP_SLOW,
           "headers": ["authorization: Bearer $CRISP_KEY"], "slow_rate": ${BENCH_SLOW_RATE:-100}},
          open(sys.argv[1], "w"))
EOF
    step "Streams: $n SSE streams open at once against crisp"
    "$PY" "$BENCH/lib/bench.py" streams "$RUN/stream-target.json" "$RUN/streams.json"
    [[ -f $RUN/meta.json ]] || versions
    report streams "$RUN/streams.json"
}

run_profile() {
    [[ -n ${UPSTREAM_PID:-} ]] || start_upstream
    # Five crisp nodes, each with the API key, the Cedar policy and the audit trail: as
    # benchmarked (answers wait for the fdatasync); with [audit] durability = "write"
    # (answers wait for the write, flushes batched); with the trail on tmpfs (its
    # fdatasync returns at once, a diagnostic, not a setting to run with); "write"
    # with client connections on one event loop per core (--client-threads N) instead of
    # the shared work-stealing runtime; and those loops busy-polling (--busy-poll).
    SHM=$(mktemp -d /dev/shm/crisp-bench.XXXXXX)
    : >"$TARGETS"
    add_target direct "direct (nginx upstream)" "http://127.0.0.1:$UP_JSON/v1/chat/completions" \
        "$(body_for bench)" "$UPSTREAM_PID"
    local variants=("$CRISP_IN crisp-in audit/{region} fsync crisp"
        "$CRISP_WRITE crisp-w audit/{region} write crisp-w"
        "$CRISP_TMPFS crisp-tmpfs $SHM/tmpfs/{region} fsync crisp-tmpfs"
        "$CRISP_LOOPS crisp-loops audit/{region} write crisp-loops $NPROC"
        "$CRISP_POLL crisp-p audit/{region} write crisp-p $NPROC $BUSY_POLL_US")
    local v port name audit durability key threads busy label in_pid="" profiled_pid=""
    local profiled=${BENCH_PROFILE_TARGET:-crisp}
    for v in "${variants[@]}"; do
        threads="" busy=""
        read -r port name audit durability key threads busy <<<"$v"
        if [[ $name == crisp-in && -n ${CRISP_IN_PID:-} ]]; then
            note "reusing the running crisp-in"
        else
            start_crisp_in_region $UP_SSE 256 "$port" "$name" "$audit" "$durability" "$threads" "$busy"
        fi
        retry_check 20 "http://127.0.0.1:$port/v1/chat/completions" "$(body_for bench)" \
            'Hello from the bench' "authorization: Bearer $(cat "$RUN/$name/api-key")" ||
            die "$name: $CHECK_ERR"
        case $name in
        crisp-in) label="crisp, as benchmarked" in_pid=$CRISP_IN_PID ;;
        crisp-w) label="crisp, durability write" ;;
        crisp-loops) label="crisp, durability write, one event loop per core" ;;
        crisp-p) label="crisp, durability write, one event loop per core, busy-polling ${BUSY_POLL_US} µs" ;;
        *) label="crisp, audit trail on tmpfs" ;;
        esac
        [[ $key == "$profiled" ]] && profiled_pid=$CRISP_IN_PID
        add_target "$key" "$label" "http://127.0.0.1:$port/v1/chat/completions" \
            "$(body_for bench)" "$CRISP_IN_PID" "authorization: Bearer $(cat "$RUN/$name/api-key")"
    done
    CRISP_IN_PID=$in_pid
    CRISP_KEY=$(cat "$RUN/crisp-in/api-key")
    [[ -n $profiled_pid ]] || die "BENCH_PROFILE_TARGET=$profiled: not one of crisp, crisp-w, crisp-tmpfs, crisp-loops, crisp-p"
    "$PY" -c 'import json,sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1])]))' \
        "$TARGETS" >"$RUN/profile-targets.json"
    local seconds=${BENCH_PROFILE_SECONDS:-10}
    : >"$RUN/perf-shares.md"
    if perf stat -e instructions true >/dev/null 2>&1; then
        step "perf: $profiled at 64 connections for $seconds s (call graphs by DWARF unwinding)"
        "$PY" "$BENCH/lib/bench.py" load "$RUN/profile-targets.json" "$profiled:64:$((seconds + 2))" &
        local load=$!
        sleep 1
        perf record -q -F 499 -g --call-graph dwarf,16384 -p "$profiled_pid" -o "$RUN/perf.data" \
            -- sleep "$seconds" >/dev/null 2>&1 || note "perf record failed"
        wait "$load"
        perf script -i "$RUN/perf.data" -F comm,period,ip,sym 2>/dev/null |
            "$PY" "$BENCH/lib/perf_shares.py" --folded "$RUN/perf.folded" >"$RUN/perf-shares.md" || true
        cat "$RUN/perf-shares.md"
        if [[ -s $RUN/perf.folded && -x $FLAMEGRAPH ]]; then
            # Samples are weighted by their period, in the unit of the event perf used
            # (cycles where the machine counts them, nanoseconds of cpu-clock where not).
            local event
            event=$(perf evlist -i "$RUN/perf.data" 2>/dev/null | head -n 1)
            [[ $event == cpu-clock* ]] && event="ns of CPU"
            "$FLAMEGRAPH" --title "crisp in-region ($profiled) at 64 connections" \
                --subtitle "perf record, DWARF call graphs; width is CPU time, frames below 0.2% left out" \
                --countname "${event:-samples}" --minwidth 0.2 --width 1400 --deterministic \
                "$RUN/perf.folded" >"$RUN/flame.svg" || rm -f "$RUN/flame.svg"
        fi
    else
        note "perf cannot count here (perf stat -e instructions true fails): no call-graph profile"
    fi
    step "What durability and threading cost: crisp as benchmarked, durability write, on tmpfs, on one event loop per core"
    BENCH_CONCURRENCY=1,64 BENCH_ROUNDS=${BENCH_PROFILE_ROUNDS:-3} BENCH_WARMUP_SECONDS=2 \
        "$PY" "$BENCH/lib/bench.py" compare "$RUN/profile-targets.json" "$RUN/profile.json"
    [[ -f $RUN/meta.json ]] || versions
    local flame=()
    [[ -s $RUN/flame.svg ]] && flame=(--flame "$RUN/flame.svg")
    report profile "$RUN/profile.json" --perf "$RUN/perf-shares.md" "${flame[@]}"
}

run_count() {
    start_upstream
    # One client event loop: every request's work on one thread, the node's own threads
    # (the audit log's, the log writer's) counted too.
    CRISP_WRAP=(valgrind --tool=callgrind --instr-atstart=no
        "--callgrind-out-file=$RUN/callgrind.out")
    CRISP_START_SECONDS=120
    # No seal while counting: a seal (every 8 MiB of events by default) reads the file
    # back and hashes it once, on a thread of its own; whether one falls in the counted
    # seconds or not would move the count by more than most changes to the request path.
    AUDIT_EXTRA="seal_bytes = 1073741824"
    start_crisp_in_region $UP_SSE 256 $CRISP_WRITE crisp-w audit/{region} write 1
    CRISP_WRAP=()
    AUDIT_EXTRA=""
    retry_check 60 "http://127.0.0.1:$CRISP_WRITE/v1/chat/completions" "$(body_for bench)" \
        'Hello from the bench' "authorization: Bearer $CRISP_KEY" || die "crisp under callgrind: $CHECK_ERR"
    "$PY" - "$RUN/count-target.json" "$CRISP_WRITE" "$(body_for bench)" "$CRISP_IN_PID" \
        "authorization: Bearer $CRISP_KEY" "$RUN/callgrind.out" <<'EOF'
import json, sys
port, body, pid, auth, out = sys.argv[2:]
json.dump({"name": "crisp-w",
           "label": 'crisp in-region (API key, Cedar policy, audit trail with durability "write", '
                    '`--client-threads 1`)',
           "url": f"http://127.0.0.1:{port}/v1/chat/completions", "body": body,
           "pids": [int(pid)], "headers": [auth], "callgrind_out": out}, open(sys.argv[1], "w"))
EOF
    step "Counting: crisp under callgrind, ${BENCH_COUNT_CONNECTIONS:-4} connections for ${BENCH_COUNT_SECONDS:-8} s"
    "$PY" "$BENCH/lib/bench.py" count "$RUN/count-target.json" "$RUN/count.json"
    [[ -f $RUN/meta.json ]] || versions
    report count "$RUN/count.json"
}

case $MODE in
compare) run_compare ;;
count) run_count ;;
soak) run_soak ;;
streams) run_streams ;;
profile) run_profile ;;
all)
    run_compare
    run_soak
    run_profile
    run_streams
    ;;
esac
