//! Scans of the data plane's large tables (connection, half-open and NAT
//! tables) on a thread of their own. Reading hundreds of thousands of
//! entries takes tens of milliseconds even in batches, and the agent's
//! event loop must never wait for that: it asks for a scan and goes on; the
//! result comes back as an event, and any writes it implies go through the
//! one writer there.
//!
//! The thread reads through handles of its own to the same maps; it never
//! writes. What a scan means (`count_flows`, `nat_upkeep`) is pure.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    os::fd::AsFd as _,
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{Map, MapData};
use lb_common::{
    FINISHED_LINGER_NS, FLOW_F_FINISHED, FLOW_F_HALF_OPEN, FlowKey, FlowState, NAT_FLOW_F_PINNED, NatFlow, PROTO_TCP,
    PROTO_UDP, SYN_RETRANSMIT_WINDOW_NS, map_names,
};
use tokio::sync::mpsc;

use super::{
    Dataplane, batch, monotonic_coarse_ns,
    planner::{
        follow::{RingChecks, pins_following_ring},
        nat::{NatTimeouts, NatUpkeep, nat_upkeep},
    },
};

/// A half-open entry names its backend this long: an ACK arriving later
/// than this after its SYN is scheduled like any other packet, so the
/// backend slot may be reused. Linux gives up on an unanswered SYN-ACK
/// after five retransmissions, about 63 s.
pub const HALF_OPEN_REFERENCE_NS: u64 = 64 * lb_common::NS_PER_SEC;

/// Active flows per backend id, the ids some entry may still send to, and
/// the services whose pins all follow their rings (`planner::follow`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FlowScan {
    pub active: StdHashMap<u32, u64>,
    pub referenced: HashSet<u32>,
    pub follow_ring: Vec<(u32, u64)>,
}

/// Idle timeouts the scan judges flows by, in nanoseconds.
#[derive(Clone, Copy, Debug)]
pub struct FlowTimeouts {
    pub tcp_idle_ns: u64,
    pub udp_idle_ns: u64,
}

/// What the entries of the connection and half-open tables mean at `now`.
/// A flow is active while unfinished and not idle past its timeout; a
/// handshake while its SYN is young enough to be retransmitted (a SYN
/// counts for least_conn at once). A backend is referenced while any entry
/// could still send it a packet.
pub fn count_flows(
    conntrack: impl IntoIterator<Item = (FlowKey, FlowState)>,
    half_open: impl IntoIterator<Item = (FlowKey, FlowState)>,
    now: u64,
    timeouts: FlowTimeouts,
) -> FlowScan {
    let mut scan = FlowScan::default();
    for (key, state) in conntrack {
        let idle = now.saturating_sub(state.last_seen_ns);
        let (timeout, finished) = if key.proto == PROTO_UDP {
            (timeouts.udp_idle_ns, false)
        } else {
            (timeouts.tcp_idle_ns, state.flags & FLOW_F_FINISHED != 0)
        };
        if key.proto == PROTO_UDP && idle > timeout {
            continue; // the data plane schedules it afresh
        }
        if !finished || idle < FINISHED_LINGER_NS {
            scan.referenced.insert(state.backend_id);
        }
        if !finished && idle <= timeout {
            *scan.active.entry(state.backend_id).or_insert(0) += 1;
        }
    }
    for (_, state) in half_open {
        let age = now.saturating_sub(state.last_seen_ns);
        if age <= HALF_OPEN_REFERENCE_NS {
            scan.referenced.insert(state.backend_id);
        }
        if age <= SYN_RETRANSMIT_WINDOW_NS {
            *scan.active.entry(state.backend_id).or_insert(0) += 1;
        }
    }
    scan
}

/// The NAT flows still in their handshake, as half-open entries: a NAT
/// service's SYN is recorded by its translation alone (TCP, not yet pinned
/// by a packet after the handshake, not finished).
pub fn nat_handshakes(flows: &[(FlowKey, NatFlow)]) -> impl Iterator<Item = (FlowKey, FlowState)> + '_ {
    flows
        .iter()
        .filter(|(key, flow)| key.proto == PROTO_TCP && flow.flags & (NAT_FLOW_F_PINNED | FLOW_F_FINISHED) == 0)
        .map(|(key, flow)| {
            (*key, FlowState { backend_id: flow.backend_id, flags: FLOW_F_HALF_OPEN, last_seen_ns: flow.last_seen_ns })
        })
}

/// The pinned NAT flows, as connection-table entries: a NAT service's flow
/// is pinned by its translation alone.
pub fn nat_pinned(flows: &[(FlowKey, NatFlow)]) -> impl Iterator<Item = (FlowKey, FlowState)> + '_ {
    flows.iter().filter(|(_, flow)| flow.flags & NAT_FLOW_F_PINNED != 0).map(|(key, flow)| {
        let flags = flow.flags & FLOW_F_FINISHED;
        (*key, FlowState { backend_id: flow.backend_id, flags, last_seen_ns: flow.last_seen_ns })
    })
}

/// The connection table's entries, without those of flows a translation
/// pins: an older data plane pinned NAT flows in both tables, and a flow
/// counts once, by the translation its packets still refresh. This data
/// plane never pins a flow in both, so once a scan finds no such entry
/// (`Translated::Gone`) later scans skip the filter and its set of keys.
pub fn without_translated(
    conntrack: Vec<(FlowKey, FlowState)>,
    nat_flows: &[(FlowKey, NatFlow)],
    translated: &mut Translated,
) -> Vec<(FlowKey, FlowState)> {
    if *translated == Translated::Gone || conntrack.is_empty() || nat_flows.is_empty() {
        return conntrack;
    }
    let keys: HashSet<&FlowKey> = nat_flows.iter().map(|(key, _)| key).collect();
    let before = conntrack.len();
    let kept: Vec<_> = conntrack.into_iter().filter(|(key, _)| !keys.contains(key)).collect();
    if kept.len() == before {
        *translated = Translated::Gone;
    }
    kept
}

/// Whether the connection table may still hold flows a translation pins
/// (an older data plane's, from before a hitless upgrade).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translated {
    Possible,
    Gone,
}

/// What the event loop asks for.
#[derive(Clone, Debug)]
pub struct ScanRequest {
    pub flows: FlowTimeouts,
    /// The rings the pins are checked against.
    pub rings: RingChecks,
    /// Also scan the NAT tables (while NAT services exist).
    pub nat: Option<NatTimeouts>,
}

/// What a scan found. Errors are text: they are only logged.
#[derive(Debug)]
pub struct TableScan {
    pub flows: Result<FlowScan, String>,
    pub nat: Option<Result<NatUpkeep, String>>,
    pub took: Duration,
}

/// The scanning thread's handles: its own, to the same maps, each read
/// whole in batches of buckets (`batch::read_hash`).
struct Tables {
    conntrack: MapData,
    half_open: MapData,
    nat_flows: MapData,
    nat_replies: MapData,
    translated: Translated,
}

impl Tables {
    fn open(dataplane: &Dataplane) -> Result<Self> {
        Ok(Tables {
            conntrack: dataplane.reopen(map_names::CONNTRACK)?,
            half_open: dataplane.reopen(map_names::HALF_OPEN)?,
            nat_flows: dataplane.reopen(map_names::NAT_FLOWS)?,
            nat_replies: dataplane.reopen(map_names::NAT_REPLIES)?,
            translated: Translated::Possible,
        })
    }

    fn scan(&mut self, request: ScanRequest) -> TableScan {
        let started = Instant::now();
        // Read once: NAT flows count with the connection table's, their
        // handshakes with the half-open table's.
        let nat_flows = request.nat.map(|_| batch::read_hash(&self.nat_flows, map_names::NAT_FLOWS));
        let handshakes = match &nat_flows {
            Some(Ok(flows)) => flows.as_slice(),
            _ => &[],
        };
        let flows = self.scan_flows(request.flows, &request.rings, handshakes).map_err(|e| format!("{e:#}"));
        let nat = request.nat.zip(nat_flows).map(|(timeouts, flows)| {
            flows.and_then(|flows| self.scan_nat(&flows, &timeouts)).map_err(|e| format!("{e:#}"))
        });
        TableScan { flows, nat, took: started.elapsed() }
    }

    fn scan_flows(
        &mut self,
        timeouts: FlowTimeouts,
        rings: &RingChecks,
        nat_flows: &[(FlowKey, NatFlow)],
    ) -> Result<FlowScan> {
        // The half-open table first (see `pins_following_ring`).
        let half_open = batch::read_hash(&self.half_open, map_names::HALF_OPEN)?;
        let conntrack = batch::read_hash(&self.conntrack, map_names::CONNTRACK)?;
        let now = monotonic_coarse_ns();
        let follow_ring = pins_following_ring(&half_open, &conntrack, rings, now);
        let conntrack =
            without_translated(conntrack, nat_flows, &mut self.translated).into_iter().chain(nat_pinned(nat_flows));
        let half_open = half_open.into_iter().chain(nat_handshakes(nat_flows));
        Ok(FlowScan { follow_ring, ..count_flows(conntrack, half_open, now, timeouts) })
    }

    fn scan_nat(&self, flows: &[(FlowKey, NatFlow)], timeouts: &NatTimeouts) -> Result<NatUpkeep> {
        let replies = batch::read_hash(&self.nat_replies, map_names::NAT_REPLIES)?;
        Ok(nat_upkeep(flows, &replies, monotonic_coarse_ns(), timeouts))
    }
}

/// The event loop's end of the scanning thread.
pub struct Scanner {
    jobs: std_mpsc::Sender<Job>,
    in_flight: bool,
    /// The data plane's program (`Dataplane::swaps`) whose maps the
    /// thread's handles are to.
    opened_at: u64,
}

/// What the scanning thread is sent.
enum Job {
    Scan(ScanRequest),
    /// Handles to the maps of a program swapped in since (its tables may
    /// have grown): scanning the old ones would read tables the data plane
    /// left.
    Reopened(Box<Tables>),
}

impl Scanner {
    /// Starts the thread; its results arrive on `results`.
    pub fn start(dataplane: &Dataplane, results: mpsc::UnboundedSender<TableScan>) -> Result<Self> {
        let mut tables = Tables::open(dataplane)?;
        let (jobs, incoming) = std_mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("xdplb-scan".into())
            .spawn(move || {
                // Ends when the agent drops its Scanner.
                while let Ok(job) = incoming.recv() {
                    match job {
                        Job::Scan(request) => {
                            if results.send(tables.scan(request)).is_err() {
                                break;
                            }
                        }
                        Job::Reopened(reopened) => tables = *reopened,
                    }
                }
            })
            .context("starting the table-scan thread")?;
        Ok(Scanner { jobs, in_flight: false, opened_at: dataplane.swaps() })
    }

    /// Asks for a scan of `dataplane`'s tables unless one is still running
    /// (then its result is the next one anyway); whether one was asked
    /// for. After a program swap the thread first opens the new program's
    /// maps.
    pub fn request(&mut self, dataplane: &Dataplane, request: ScanRequest) -> bool {
        if self.in_flight {
            return false;
        }
        if self.opened_at != dataplane.swaps() {
            match Tables::open(dataplane) {
                Ok(tables) => {
                    self.opened_at = dataplane.swaps();
                    let _ = self.jobs.send(Job::Reopened(Box::new(tables)));
                }
                Err(err) => log::error!("the table scans go on reading the replaced tables: {err:#}"),
            }
        }
        self.in_flight = self.jobs.send(Job::Scan(request)).is_ok();
        self.in_flight
    }

    /// A scan's result arrived.
    pub fn finished(&mut self) {
        self.in_flight = false;
    }
}

impl Dataplane {
    /// `pins_following_ring` over this data plane's tables, read here (the
    /// agent's scans run on their thread; the benchmark calls this).
    pub fn pins_following_ring(&self, rings: &RingChecks) -> Result<Vec<(u32, u64)>> {
        let half_open = batch::read_hash(self.hash_map(map_names::HALF_OPEN)?, map_names::HALF_OPEN)?;
        let conntrack = batch::read_hash(self.hash_map(map_names::CONNTRACK)?, map_names::CONNTRACK)?;
        Ok(pins_following_ring(&half_open, &conntrack, rings, monotonic_coarse_ns()))
    }

    /// A second handle to the hash map `name`, independent of this one (for
    /// another thread): a duplicate of its descriptor (opening it by id would
    /// need CAP_SYS_ADMIN, which the agent does not have).
    pub fn reopen(&self, name: &str) -> Result<MapData> {
        let data = self.hash_map(name)?;
        let fd = data.fd().as_fd().try_clone_to_owned().with_context(|| format!("duplicating map {name}"))?;
        MapData::from_fd(fd).with_context(|| format!("opening map {name} again"))
    }

    /// The hash map (plain or LRU) `name`.
    pub(super) fn hash_map(&self, name: &str) -> Result<&MapData> {
        match self.ebpf.map(name) {
            Some(Map::HashMap(data) | Map::LruHashMap(data)) => Ok(data),
            Some(_) => Err(anyhow!("map {name} is not a hash map")),
            None => Err(anyhow!("map {name} missing from object")),
        }
    }
}

#[cfg(test)]
mod tests {
    use lb_common::NS_PER_SEC;

    use super::*;

    fn key(port: u16, proto: u8) -> FlowKey {
        FlowKey { sport: port.to_be(), dport: 80u16.to_be(), proto, family: 4, ..Default::default() }
    }

    fn entry(backend_id: u32, flags: u32, last_seen_ns: u64) -> FlowState {
        FlowState { backend_id, flags, last_seen_ns }
    }

    const NOW: u64 = 10_000 * NS_PER_SEC;
    const TIMEOUTS: FlowTimeouts = FlowTimeouts { tcp_idle_ns: 900 * NS_PER_SEC, udp_idle_ns: 30 * NS_PER_SEC };

    #[test]
    fn flows_count_while_live_and_backends_stay_referenced_while_reachable() {
        let conntrack = [
            (key(1, PROTO_TCP), entry(1, 0, NOW - NS_PER_SEC)),
            // Finished: referenced during the linger only, never active.
            (key(2, PROTO_TCP), entry(2, FLOW_F_FINISHED, NOW - NS_PER_SEC)),
            (key(3, PROTO_TCP), entry(3, FLOW_F_FINISHED, NOW - FINISHED_LINGER_NS - 1)),
            // Idle TCP: still referenced (its next packet goes there), not active.
            (key(4, PROTO_TCP), entry(4, 0, NOW - 901 * NS_PER_SEC)),
            // Idle UDP: rescheduled by the data plane, neither.
            (key(5, PROTO_UDP), entry(5, 0, NOW - 31 * NS_PER_SEC)),
            (key(6, PROTO_UDP), entry(6, 0, NOW - 29 * NS_PER_SEC)),
        ];
        let scan = count_flows(conntrack, [], NOW, TIMEOUTS);
        assert_eq!(scan.active, [(1, 1), (6, 1)].into_iter().collect());
        assert_eq!(scan.referenced, [1, 2, 4, 6].into_iter().collect());
    }

    #[test]
    fn handshakes_count_while_their_syn_may_be_retransmitted_and_reference_until_abandoned() {
        let half_open = [
            (key(1, PROTO_TCP), entry(7, FLOW_F_HALF_OPEN, NOW - NS_PER_SEC)),
            (key(2, PROTO_TCP), entry(7, FLOW_F_HALF_OPEN, NOW - SYN_RETRANSMIT_WINDOW_NS)),
            (key(3, PROTO_TCP), entry(8, FLOW_F_HALF_OPEN, NOW - SYN_RETRANSMIT_WINDOW_NS - 1)),
            (key(4, PROTO_TCP), entry(9, FLOW_F_HALF_OPEN, NOW - HALF_OPEN_REFERENCE_NS - 1)),
        ];
        let scan = count_flows([(key(5, PROTO_TCP), entry(7, 0, NOW))], half_open, NOW, TIMEOUTS);
        assert_eq!(scan.active, [(7, 3)].into_iter().collect());
        assert_eq!(scan.referenced, [7, 8].into_iter().collect());
    }

    #[test]
    fn nat_translations_in_their_handshake_count_as_half_open_and_no_others() {
        let translation =
            |backend_id, flags, last_seen_ns| NatFlow { backend_id, flags, last_seen_ns, ..Default::default() };
        let flows = [
            (key(1, PROTO_TCP), translation(7, 0, NOW - NS_PER_SEC)),
            (key(2, PROTO_TCP), translation(8, 0, NOW - SYN_RETRANSMIT_WINDOW_NS - 1)),
            // Pinned (past the handshake), finished, or UDP: no handshake.
            (key(3, PROTO_TCP), translation(9, NAT_FLOW_F_PINNED, NOW)),
            (key(4, PROTO_TCP), translation(10, FLOW_F_FINISHED, NOW)),
            (key(5, PROTO_UDP), translation(11, 0, NOW)),
        ];
        let handshakes: Vec<_> = nat_handshakes(&flows).collect();
        assert_eq!(
            handshakes,
            [
                (key(1, PROTO_TCP), entry(7, FLOW_F_HALF_OPEN, NOW - NS_PER_SEC)),
                (key(2, PROTO_TCP), entry(8, FLOW_F_HALF_OPEN, NOW - SYN_RETRANSMIT_WINDOW_NS - 1)),
            ]
        );
        let scan = count_flows([], handshakes, NOW, TIMEOUTS);
        assert_eq!(scan.active, [(7, 1)].into_iter().collect());
        assert_eq!(scan.referenced, [7, 8].into_iter().collect());
    }

    #[test]
    fn pinned_nat_translations_count_as_connection_table_entries_and_once() {
        let translation =
            |backend_id, flags, last_seen_ns| NatFlow { backend_id, flags, last_seen_ns, ..Default::default() };
        let flows = [
            (key(1, PROTO_TCP), translation(7, NAT_FLOW_F_PINNED, NOW - NS_PER_SEC)),
            // Finished: referenced during its linger, not active.
            (key(2, PROTO_TCP), translation(8, NAT_FLOW_F_PINNED | FLOW_F_FINISHED, NOW - NS_PER_SEC)),
            (key(3, PROTO_UDP), translation(9, NAT_FLOW_F_PINNED, NOW - 31 * NS_PER_SEC)),
            // A handshake: not a connection-table entry.
            (key(4, PROTO_TCP), translation(10, 0, NOW)),
        ];
        let pinned: Vec<_> = nat_pinned(&flows).collect();
        assert_eq!(
            pinned,
            [
                (key(1, PROTO_TCP), entry(7, 0, NOW - NS_PER_SEC)),
                (key(2, PROTO_TCP), entry(8, FLOW_F_FINISHED, NOW - NS_PER_SEC)),
                (key(3, PROTO_UDP), entry(9, 0, NOW - 31 * NS_PER_SEC)),
            ]
        );
        // An older data plane's connection-table entry of the first flow
        // (not refreshed since the upgrade) is dropped; other flows stay.
        let conntrack =
            vec![(key(1, PROTO_TCP), entry(7, 0, NOW - 100 * NS_PER_SEC)), (key(5, PROTO_TCP), entry(11, 0, NOW))];
        let mut translated = Translated::Possible;
        let kept = without_translated(conntrack.clone(), &flows, &mut translated);
        assert_eq!(kept, conntrack[1..]);
        assert_eq!(translated, Translated::Possible);
        assert_eq!(without_translated(conntrack.clone(), &[], &mut translated), conntrack);
        assert_eq!(translated, Translated::Possible, "no translation read: nothing learnt");
        // A scan that finds none: the filter is skipped from then on.
        assert_eq!(without_translated(kept.clone(), &flows, &mut translated), kept);
        assert_eq!(translated, Translated::Gone);
        assert_eq!(without_translated(conntrack.clone(), &flows, &mut translated), conntrack);
        let scan = count_flows(kept.into_iter().chain(pinned), [], NOW, TIMEOUTS);
        assert_eq!(scan.active, [(7, 1), (11, 1)].into_iter().collect());
        assert_eq!(scan.referenced, [7, 8, 11].into_iter().collect());
    }
}
