#!/usr/bin/env bash
# Runs a local cluster from the configs in a directory such as deploy/local-3
# or deploy/local-5 (one node-<id>.toml per replica, with paths relative to
# that directory):
#
#   deploy/local.sh start  [DIR]   certificates (first time), then every replica
#   deploy/local.sh stop   [DIR]   SIGTERM to every replica, waiting for each
#   deploy/local.sh status [DIR]   `synod status` against the cluster
#
# DIR defaults to deploy/local-3. The binaries come from $SYNOD_BIN_DIR, else
# target/release (built with cargo when missing). A replica whose data
# directory holds no database is started with --bootstrap: right for the
# founding start of a new cluster, never for a member that lost its disk
# (start that one by hand with --join). Logs go to DIR/data/node-<id>.log.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
command="${1:-}"
dir="$(cd "${2:-$root/deploy/local-3}" && pwd)"
bin="${SYNOD_BIN_DIR:-$root/target/release}"
wait_secs="${SYNOD_WAIT_SECS:-30}"

configs=("$dir"/node-*.toml)
if [ ! -f "${configs[0]}" ]; then
    echo "local.sh: $dir holds no node-<id>.toml" >&2
    exit 2
fi
ids=()
for config in "${configs[@]}"; do
    name="$(basename "$config" .toml)"
    ids+=("${name#node-}")
done

# The value of `key = "..."` in a config's [[members]] entry for `id`.
member_field() {
    awk -v id="$2" -v key="$3" '
        /^\[\[members\]\]/ { in_member = 1; this = ""; next }
        /^\[/ { in_member = 0 }
        in_member && $1 == "id" { this = $3 }
        in_member && this == id && $1 == key { gsub(/"/, "", $3); print $3; exit }
    ' "$1"
}

endpoints() {
    local list=()
    for id in "${ids[@]}"; do
        list+=("$(member_field "$dir/node-$id.toml" "$id" client_address)")
    done
    (IFS=,; echo "${list[*]}")
}

ensure_binaries() {
    if [ ! -x "$bin/synod-server" ] || [ ! -x "$bin/synod" ]; then
        echo "building synod-server and synod into $bin"
        (cd "$root" && cargo build --release -p synod-server -p synod-shell)
    fi
}

write_client_config() {
    local list
    list="$(endpoints | sed 's/\([^,]*\)/"\1"/g; s/,/, /g')"
    cat > "$dir/client.toml" <<TOML
endpoints = [$list]
ca = "certs/ca.pem"
cert = "certs/local.pem"
key = "certs/local-key.pem"
TOML
}

running() {
    local pid_file="$dir/data/node-$1.pid"
    [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

start() {
    ensure_binaries
    mkdir -p "$dir/data"
    if [ ! -f "$dir/certs/ca.pem" ]; then
        local nodes=()
        for id in "${ids[@]}"; do
            nodes+=(--node "$id=localhost,127.0.0.1")
        done
        "$bin/synod" certs --dir "$dir/certs" "${nodes[@]}" --client local
    fi
    write_client_config
    for id in "${ids[@]}"; do
        if running "$id"; then
            echo "replica $id already runs (pid $(cat "$dir/data/node-$id.pid"))"
            continue
        fi
        local flags=()
        if [ ! -f "$dir/data/node-$id/synod.redb" ]; then
            flags+=(--bootstrap)
        fi
        (cd "$dir" && exec "$bin/synod-server" --config "node-$id.toml" "${flags[@]}" \
            >> "data/node-$id.log" 2>&1) &
        echo $! > "$dir/data/node-$id.pid"
        echo "started replica $id (pid $!, log $dir/data/node-$id.log)"
    done
    local deadline=$((SECONDS + wait_secs))
    until (cd "$dir" && "$bin/synod" --config client.toml status >/dev/null 2>&1); do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "local.sh: the cluster did not become ready within ${wait_secs} s; see the logs" >&2
            exit 1
        fi
        sleep 0.2
    done
    echo "ready: synod --config $dir/client.toml"
}

stop() {
    for id in "${ids[@]}"; do
        local pid_file="$dir/data/node-$id.pid"
        [ -f "$pid_file" ] || continue
        local pid
        pid="$(cat "$pid_file")"
        if kill -TERM "$pid" 2>/dev/null; then
            local deadline=$((SECONDS + wait_secs))
            while kill -0 "$pid" 2>/dev/null; do
                if [ "$SECONDS" -ge "$deadline" ]; then
                    echo "local.sh: replica $id (pid $pid) did not stop; killing it" >&2
                    kill -KILL "$pid" 2>/dev/null || true
                    break
                fi
                sleep 0.1
            done
            echo "stopped replica $id"
        fi
        rm -f "$pid_file"
    done
}

case "$command" in
    start) start ;;
    stop) stop ;;
    status) cd "$dir" && exec "$bin/synod" --config client.toml status ;;
    *)
        echo "usage: deploy/local.sh start|stop|status [DIR]" >&2
        exit 2
        ;;
esac
