#!/usr/bin/env bash
# Network-namespace harness for xdplb: a client, a load balancer and three
# backends, wired through a switch/router namespace. Only 198.18.0.0/15 and
# 2001:db8::/32 are used. Needs root.
#
#   netns-harness.sh up PREFIX          create the topology, start the backends' HTTP servers
#   netns-harness.sh down PREFIX        remove everything PREFIX created
#   netns-harness.sh run PREFIX CMD...  up, run CMD (with HARNESS_PREFIX set), then down,
#                                       also on failure or Ctrl-C
#   netns-harness.sh names PREFIX       print the namespace names
#
# Topology (namespaces are PREFIX-NAME):
#
#   client 198.18.2.2        --+                  +-- b1 198.18.1.11 (VIP on lo)
#          2001:db8:2::2       |-- br0  sw  br1 --|-- b2 198.18.1.12 (VIP on lo)
#   b3     198.18.2.13 (VIP) --|   (router)       |-- b4 198.18.1.14 (VIP on lo; spare)
#   lb eth0 198.18.2.3       --+                  +-- lb eth1 198.18.1.3
#
#   VIPs 198.18.0.100 and 2001:db8::100: the client routes them to lb eth0.
#   b3 shares the client's segment, so xdplb reaches it with XDP_TX; b1 and b2
#   sit behind lb eth1, reached with XDP_REDIRECT. Backends answer the client
#   directly (through sw), never through lb: direct server return.
#
# With HARNESS_ROUTED=1, also a subnet two routers away from lb, for tunnels:
#
#   sw tr0 198.18.4.1 ---- rt tr0 198.18.4.2 (router) br3 198.18.3.1 --+-- t1 198.18.3.21
#          2001:db8:4::1      2001:db8:4::2            2001:db8:3::1   +-- t2 198.18.3.22
#                                                                      +-- t3 198.18.3.23
#
#   t1..t3 hold the VIPs on lo like b1..b3 but share no segment with lb:
#   xdplb reaches them only through tunnels, which they open with
#   `xdplb decap` (the tests run it).
#
# With HARNESS_NODES=1, also a second LB node and a client behind sw, for
# several active nodes behind ECMP (the tests start BIRD in sw, lb, lb2):
#
#   far eth0 198.18.5.2 ---- sw far 198.18.5.1     lb2 eth0 198.18.2.4 (br0)
#            2001:db8:5::2      2001:db8:5::1          eth1 198.18.1.4 (br1)
#
#   far has no route to the VIPs but its default route: sw forwards them to
#   whichever LB nodes BGP announces them from, spread by an L4 hash.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VIP4=198.18.0.100
VIP6=2001:db8::100
HTTP_PORT=80
# UDP services: the backends answer datagrams to VIP:UDP_PORT with their name.
UDP_PORT=53

die() { echo "netns-harness: $*" >&2; exit 1; }

ns() { echo "$1-$2"; }
in_ns() { local n=$1; shift; ip netns exec "$n" "$@"; }

names() {
    local p=$1
    for n in sw client lb b1 b2 b3 b4 rt t1 t2 t3 lb2 far; do ns "$p" "$n"; done
}

routed() { [ "${HARNESS_ROUTED:-0}" = 1 ]; }
nodes() { [ "${HARNESS_NODES:-0}" = 1 ]; }

veth() { # veth NS_A IF_A NS_B IF_B
    ip link add "$2" netns "$1" type veth peer name "$4" netns "$3"
}

p2p() { # p2p NS_A IF_A NS_B IF_B N: a link, A 198.18.N.1 and B 198.18.N.2 (2001:db8:N::1, ::2)
    veth "$1" "$2" "$3" "$4"
    in_ns "$1" ip link set "$2" up
    in_ns "$3" ip link set "$4" up
    in_ns "$1" ip addr add "198.18.$5.1/24" dev "$2"
    in_ns "$1" ip addr add "2001:db8:$5::1/64" dev "$2" nodad
    in_ns "$3" ip addr add "198.18.$5.2/24" dev "$4"
    in_ns "$3" ip addr add "2001:db8:$5::2/64" dev "$4" nodad
}

# The XDP_PASS object built with xdplb (lb-ebpf's xdp-pass binary).
find_xdp_pass() {
    if [ -z "${XDP_PASS_OBJ:-}" ]; then
        XDP_PASS_OBJ=$(ls -t "$HERE"/../target/*/build/lb-userspace-*/out/xdp-pass 2>/dev/null | head -n 1 || true)
    fi
    [ -f "$XDP_PASS_OBJ" ] || die "no xdp-pass object: build xdplb first (cargo build) or set XDP_PASS_OBJ"
}

up() {
    local p=$1 sw client lb
    find_xdp_pass
    sw=$(ns "$p" sw) client=$(ns "$p" client) lb=$(ns "$p" lb)
    for n in $(names "$p"); do
        case "${n##*-}" in rt|t1|t2|t3) routed || continue ;; lb2|far) nodes || continue ;; esac
        ip netns add "$n"
        in_ns "$n" ip link set lo up
    done

    # Switch/router: br0 = client segment, br1 = backend segment.
    in_ns "$sw" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
    for br in br0 br1; do
        # No multicast snooping: ND must not depend on MLD state in a fresh topology.
        in_ns "$sw" ip link add "$br" type bridge mcast_snooping 0
        in_ns "$sw" ip link set "$br" up
    done
    in_ns "$sw" ip addr add 198.18.2.1/24 dev br0
    in_ns "$sw" ip addr add 2001:db8:2::1/64 dev br0 nodad
    in_ns "$sw" ip addr add 198.18.1.1/24 dev br1
    in_ns "$sw" ip addr add 2001:db8:1::1/64 dev br1 nodad

    attach() { # attach NS IF SW_PORT BRIDGE
        veth "$1" "$2" "$sw" "$3"
        in_ns "$sw" ip link set "$3" master "$4" up
        # Frames that xdplb sends with XDP_TX or XDP_REDIRECT land on the veth
        # peer's XDP ring, which the kernel only drains when the peer runs an
        # XDP program: without one they vanish.
        in_ns "$sw" ip link set dev "$3" xdp obj "$XDP_PASS_OBJ" sec xdp
        in_ns "$1" ip link set "$2" up
    }

    attach "$client" eth0 client br0 
    in_ns "$client" ip addr add 198.18.2.2/24 dev eth0
    in_ns "$client" ip addr add 2001:db8:2::2/64 dev eth0 nodad
    in_ns "$client" ip route add default via 198.18.2.1
    in_ns "$client" ip -6 route add default via 2001:db8:2::1
    in_ns "$client" ip route add "$VIP4/32" via 198.18.2.3
    in_ns "$client" ip -6 route add "$VIP6/128" via 2001:db8:2::3
    # The LB rewrites the client's packets without fixing checksums: the
    # veth must not leave them partial.
    in_ns "$client" ethtool -K eth0 tx off >/dev/null

    lb_node() { # lb_node NS SW_PORT_PREFIX HOST: eth0 on br0, eth1 on br1
        attach "$1" eth0 "${2}0" br0
        attach "$1" eth1 "${2}1" br1
        in_ns "$1" ip addr add "198.18.2.$3/24" dev eth0
        in_ns "$1" ip addr add "2001:db8:2::$3/64" dev eth0 nodad
        in_ns "$1" ip addr add "198.18.1.$3/24" dev eth1
        in_ns "$1" ip addr add "2001:db8:1::$3/64" dev eth1 nodad
        in_ns "$1" ip route add default via 198.18.2.1
        in_ns "$1" ip -6 route add default via 2001:db8:2::1
    }
    lb_node "$lb" lb 3

    if nodes; then
        local far
        far=$(ns "$p" far)
        lb_node "$(ns "$p" lb2)" lb2 4
        p2p "$sw" far "$far" eth0 5
        in_ns "$far" ip route add default via 198.18.5.1
        in_ns "$far" ip -6 route add default via 2001:db8:5::1
        in_ns "$far" ethtool -K eth0 tx off >/dev/null
        # ECMP spreads flows by their five-tuple (policy 1), and sw must not
        # send far ICMP redirects to one LB node (they share br0).
        in_ns "$sw" sysctl -qw net.ipv4.fib_multipath_hash_policy=1 net.ipv6.fib_multipath_hash_policy=1 \
            net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.br0.send_redirects=0
    fi

    backend() { # backend NAME SEGMENT(1|2|3) HOST
        local b; b=$(ns "$p" "$1")
        if [ "$2" = 3 ]; then
            veth "$b" eth0 "$(ns "$p" rt)" "$1"
            in_ns "$(ns "$p" rt)" ip link set "$1" master br3 up
            in_ns "$b" ip link set eth0 up
        else
            attach "$b" eth0 "$1" "br$(( $2 == 2 ? 0 : 1 ))"
        fi
        in_ns "$b" ip addr add "198.18.$2.$3/24" dev eth0
        in_ns "$b" ip addr add "2001:db8:$2::$3/64" dev eth0 nodad
        in_ns "$b" ip route add default via "198.18.$2.1"
        in_ns "$b" ip -6 route add default via "2001:db8:$2::1"
        # The VIP lives on lo; never answer ARP for it nor use it as ARP source.
        in_ns "$b" ip addr add "$VIP4/32" dev lo
        in_ns "$b" ip addr add "$VIP6/128" dev lo nodad
        in_ns "$b" sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 \
            net.ipv4.conf.eth0.arp_ignore=1 net.ipv4.conf.eth0.arp_announce=2
        # setsid: the server outlives this script and is ended by `down`.
        in_ns "$b" setsid python3 "$HERE/backend_server.py" --name "$1" --port "$HTTP_PORT" \
            --udp-port "$UDP_PORT" --udp-address "$VIP4" --udp-address "$VIP6" \
            </dev/null >/dev/null 2>&1 &
    }
    backend b1 1 11
    backend b2 1 12
    backend b3 2 13
    # Not in the default configs: the discovery tests register it at run time.
    backend b4 1 14
    local specs="b1:198.18.1.11 b2:198.18.1.12 b3:198.18.2.13 b4:198.18.1.14 \
        b1:[2001:db8:1::11] b2:[2001:db8:1::12] b3:[2001:db8:2::13]"

    if routed; then
        local rt; rt=$(ns "$p" rt)
        p2p "$sw" tr0 "$rt" tr0 4
        in_ns "$sw" ip route add 198.18.3.0/24 via 198.18.4.2
        in_ns "$sw" ip -6 route add 2001:db8:3::/64 via 2001:db8:4::2
        in_ns "$rt" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
        in_ns "$rt" ip link add br3 type bridge mcast_snooping 0
        in_ns "$rt" ip link set br3 up
        in_ns "$rt" ip addr add 198.18.3.1/24 dev br3
        in_ns "$rt" ip addr add 2001:db8:3::1/64 dev br3 nodad
        in_ns "$rt" ip route add default via 198.18.4.1
        in_ns "$rt" ip -6 route add default via 2001:db8:4::1
        backend t1 3 21
        backend t2 3 22
        backend t3 3 23
        specs="$specs t1:198.18.3.21 t2:198.18.3.22 t3:198.18.3.23 \
            t1:[2001:db8:3::21] t2:[2001:db8:3::22] t3:[2001:db8:3::23]"
    fi

    # Wait until every backend answers on its own addresses, IPv4 and IPv6.
    local deadline=$((SECONDS + 10))
    for spec in $specs; do
        local name=${spec%%:*} addr=${spec#*:}
        until in_ns "$client" curl -sf --max-time 1 "http://$addr:$HTTP_PORT/" 2>/dev/null | grep -qx "$name"; do
            (( SECONDS < deadline )) || die "backend $name at $addr did not come up"
            sleep 0.1
        done
    done
}

down() {
    local p=$1
    for n in $(names "$p"); do
        if ip netns list | awk '{print $1}' | grep -qx "$n"; then
            local pids; pids=$(ip netns pids "$n" 2>/dev/null || true)
            [ -n "$pids" ] && kill $pids 2>/dev/null || true
            ip netns del "$n" 2>/dev/null || true
        fi
    done
}

cmd=${1:-}; prefix=${2:-}
[ -n "$cmd" ] && [ -n "$prefix" ] || die "usage: $0 up|down|names PREFIX | run PREFIX CMD..."
[[ "$prefix" =~ ^[a-z0-9]{2,12}$ ]] || die "PREFIX must be 2-12 lowercase letters or digits"
case "$cmd" in
    up)
        trap 'down "$prefix"' ERR INT TERM
        up "$prefix"
        ;;
    down) down "$prefix" ;;
    names) names "$prefix" ;;
    run)
        shift 2
        [ $# -gt 0 ] || die "run needs a command"
        trap 'down "$prefix"' EXIT
        up "$prefix"
        HARNESS_PREFIX=$prefix "$@"
        ;;
    *) die "unknown command $cmd" ;;
esac
