#!/usr/bin/env bash
# The two-node demo (`cargo xtask demo --nodes 2`), run inside the harness
# with HARNESS_NODES=1 (netns-harness.sh run PREFIX ...), which removes the
# topology afterwards, whatever happens. Two LB nodes announce the VIP by BGP
# (BIRD with config/bird/) to the router, which spreads connections over
# both (ECMP); the nodes sync their connection tables. Long-lived
# connections and a stream of new ones run while node lb2 is killed.
set -euo pipefail
: "${HARNESS_PREFIX:?run me through netns-harness.sh run}" "${XDPLB:?path to the xdplb binary}"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
p=$HARNESS_PREFIX
dir=$(mktemp -d)
birds=() agents=()
cleanup() {
    set +e
    # BIRD stops on SIGTERM; the agents detach on SIGINT (--detach-on-exit).
    for pid in "${birds[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${agents[@]}"; do kill -INT "$pid" 2>/dev/null; done
    for pid in "${birds[@]}" "${agents[@]}"; do wait "$pid" 2>/dev/null; done
    # The killed agent could not detach: removing its pins does.
    rm -rf "/sys/fs/bpf/xdplb-demo-$p-lb2" "/sys/fs/bpf/xdplb-demo-$p-lb" "$dir"
}
trap cleanup EXIT

head -c 32 /dev/urandom | base64 >"$dir/sync.key"
chmod 600 "$dir/sync.key"
node_config() { # node_config NODE ADDRESS PEER_ADDRESS
    cat <<EOF
[agent]
interface = "eth0"
announce_table = 100
control_socket = "$dir/$1.sock"
pin_dir = "/sys/fs/bpf/xdplb-demo-$p-$1"

[sync]
listen = "$2:7600"
peers = ["$3:7600"]
key_file = "$dir/sync.key"

[[service]]
name = "web"
vip = "198.18.0.100:80"
protocol = "tcp"

[service.health]
kind = "tcp"
interval_ms = 200
timeout_ms = 150

[[service.backend]]
address = "198.18.1.11"

[[service.backend]]
address = "198.18.1.12"
EOF
}
node_config lb 198.18.2.3 198.18.2.4 >"$dir/lb.toml"
node_config lb2 198.18.2.4 198.18.2.3 >"$dir/lb2.toml"
sed 's/router id 198.18.2.3;/router id 198.18.2.4;/' "$HERE/../config/bird/lb-node.conf" >"$dir/lb2-bird.conf"

echo "== BIRD in the router (sw) and in both LB nodes; xdplb in lb and lb2"
for spec in "sw:$HERE/../config/bird/router.conf" "lb:$HERE/../config/bird/lb-node.conf" "lb2:$dir/lb2-bird.conf"; do
    node=${spec%%:*} conf=${spec#*:}
    # `ip netns exec` execs bird in place: $! is bird.
    ip netns exec "$p-$node" bird -f -c "$conf" -s "$dir/$node-bird.ctl" >/dev/null 2>&1 &
    birds+=($!)
done
for node in lb lb2; do
    nsenter --net="/run/netns/$p-$node" "$XDPLB" run --detach-on-exit --config "$dir/$node.toml" \
        >/dev/null 2>"$dir/$node.log" &
    agents+=($!)
    eval "agent_$node=$!"
done
for node in lb lb2; do
    for _ in $(seq 100); do grep -q "attached to" "$dir/$node.log" && break; sleep 0.1; done
    grep -q "attached to" "$dir/$node.log" || { cat "$dir/$node.log"; echo "xdplb on $node did not attach" >&2; exit 1; }
done
for _ in $(seq 200); do
    [ "$(ip -n "$p-sw" route show 198.18.0.100 | grep -c nexthop)" = 2 ] && break
    sleep 0.1
done
echo "== the router's route to the VIP (learned by BGP from both nodes):"
ip -n "$p-sw" route show 198.18.0.100
echo
"$XDPLB" --socket "$dir/lb.sock" status | grep -E "^node|VIP|^sync"

echo
echo "== 20 keep-alive connections and a stream of new ones from $p-far; node lb2 is killed after 3 s"
# The client: bounded (20 connections, 8 s of new connections), stops by itself.
nsenter --net="/run/netns/$p-far" python3 - <<'EOF' &
import http.client, socket, time
def name(conn):
    conn.request("GET", "/")
    return conn.getresponse().read().decode().strip()
kept = []
for _ in range(20):
    c = http.client.HTTPConnection("198.18.0.100", 80, timeout=2)
    kept.append((c, name(c)))
ok = failed = 0
start = time.time()
while time.time() - start < 8:
    try:
        c = http.client.HTTPConnection("198.18.0.100", 80, timeout=1)
        name(c); c.close(); ok += 1
    except Exception:
        failed += 1
moved = 0
for c, home in kept:
    try:
        moved += name(c) != home
    except Exception:
        moved += 1
print(f"new connections: {ok} answered, {failed} failed")
print(f"keep-alive connections: {20 - moved} of 20 still on their backend after the kill")
EOF
client=$!
sleep 3
echo "-- killing lb2: its link cut, its BIRD and agent killed"
ip -n "$p-sw" link set lb20 down
kill -KILL "${birds[2]}" "$agent_lb2"
wait "${birds[2]}" "$agent_lb2" 2>/dev/null || true
sleep 1
echo "-- the router's route now:"
ip -n "$p-sw" route show 198.18.0.100
wait "$client"
echo
"$XDPLB" --socket "$dir/lb.sock" status | grep -E "^sync"
echo "(BFD drops a dead node in about 0.3 s; lb carries every flow on, with the backends lb2 had pinned: sync.)"
