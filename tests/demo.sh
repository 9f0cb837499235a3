#!/usr/bin/env bash
# The demo's body, run inside the harness (netns-harness.sh run PREFIX ...),
# which has built the topology and removes it afterwards, whatever happens.
set -euo pipefail
: "${HARNESS_PREFIX:?run me through netns-harness.sh run}" "${XDPLB:?path to the xdplb binary}"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REQUESTS=${DEMO_REQUESTS:-300}
lb="$HARNESS_PREFIX-lb" client="$HARNESS_PREFIX-client"
log=$(mktemp) summary=$(mktemp)
trap 'kill -INT $agent 2>/dev/null || true; rm -f "$log" "$summary"' EXIT

echo "== xdplb run in namespace $lb (config/harness.toml)"
# --detach-on-exit: the demo leaves no program or pinned maps behind.
nsenter --net="/run/netns/$lb" "$XDPLB" run --detach-on-exit --config "$HERE/../config/harness.toml" >"$summary" 2>"$log" &
agent=$!
for _ in $(seq 100); do grep -q "attached to" "$log" && break; sleep 0.1; done
grep -q "attached to" "$log" || { cat "$log"; echo "xdplb did not attach" >&2; exit 1; }
cat "$log"

count() { # count VIP_URL: one request per new connection, bounded by count and time
    for _ in $(seq "$REQUESTS"); do
        nsenter --net="/run/netns/$client" curl -s --max-time 2 "$1" || echo "FAILED"
    done | sort | uniq -c | awk '{print $2, $1}'
}
echo "== $REQUESTS HTTP requests on new connections from $client to each VIP"
v4=$(count "http://198.18.0.100/")
v6=$(count "http://[2001:db8::100]/")
printf '\n%-8s %8s %8s\n' backend IPv4 IPv6
for b in b1 b2 b3 FAILED; do
    n4=$(awk -v b=$b '$1==b {print $2}' <<<"$v4") n6=$(awk -v b=$b '$1==b {print $2}' <<<"$v6")
    [ "$b" = FAILED ] && [ -z "$n4$n6" ] && continue
    printf '%-8s %8s %8s\n' "$b" "${n4:-0}" "${n6:-0}"
done
echo
kill -INT $agent; wait $agent
cat "$summary"
echo "(b1, b2 sit behind the LB's eth1: XDP_REDIRECT; b3 shares the client's segment: XDP_TX."
echo " Replies go from the backends straight to the client: the LB counts only client→VIP packets.)"
