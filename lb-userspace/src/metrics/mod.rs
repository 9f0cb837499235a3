//! Prometheus metrics through one registry made at start: what the agent
//! counts itself (probe latency, transitions, map-write errors) as metrics it
//! owns, and the data plane's counters and the agent's typed view of services
//! and backends through a collector that encodes the last scrape's reading.

pub mod server;

use std::{
    fmt,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use lb_common::GlobalCounter;
use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};

pub use self::server::{bind, serve};
use crate::{
    announce::{Cause, NodeState},
    control::{Admin, BackendStatus, Health, Status},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub service: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdminLabels {
    service: String,
    backend: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VipLabels {
    vip: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VipReasonLabels {
    vip: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryLabels {
    registry: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    family: &'static str,
}

fn latency_histogram() -> Histogram {
    let (start, factor, count) = lb_common::PROBE_LATENCY_BUCKETS;
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(start, factor, count))
}

/// What one scrape shows of the data plane, read by the agent.
#[derive(Debug, Default)]
pub struct Reading {
    pub status: Option<Status>,
    pub globals: Vec<(GlobalCounter, u64)>,
    pub ring_rebuilds: u64,
}

/// The agent's metrics: one registry for its lifetime.
pub struct Metrics {
    registry: Registry,
    reading: Arc<ReadingCollector>,
    pub probe_latency: Family<BackendLabels, Histogram>,
    pub transitions: Family<BackendLabels, Counter>,
    /// Probes that failed on the LB itself (not counted against backends).
    pub probe_local_errors: Family<BackendLabels, Counter>,
    pub map_update_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("xdplb");
        let probe_latency = Family::<BackendLabels, Histogram>::new_with_constructor(latency_histogram);
        let transitions = Family::<BackendLabels, Counter>::default();
        let map_update_errors = Counter::default();
        let probe_local_errors = Family::<BackendLabels, Counter>::default();
        registry.register(
            "backend_probe_local_errors",
            "Probes that failed on the LB host itself (EMFILE, ENOBUFS, no route); not counted against the backend",
            probe_local_errors.clone(),
        );
        let reading = Arc::new(ReadingCollector::default());
        registry.register("backend_probe_latency_seconds", "Health probe latency", probe_latency.clone());
        registry.register(
            "backend_health_transitions",
            "Health state changes (up→down and down→up)",
            transitions.clone(),
        );
        registry.register(
            "map_update_errors",
            "Map writes the kernel refused (each is retried on the next reconcile)",
            map_update_errors.clone(),
        );
        registry.register_collector(Box::new(reading.clone()));
        Self { registry, reading, probe_latency, transitions, probe_local_errors, map_update_errors }
    }
}

impl Metrics {
    pub fn labels(service: &str, backend: impl ToString) -> BackendLabels {
        BackendLabels { service: service.to_string(), backend: backend.to_string() }
    }

    /// The text exposition of one scrape. Per-CPU counters arrive summed.
    pub fn render(&self, reading: Reading) -> Result<String> {
        *self.reading.latest.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = reading;
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Encodes the latest `Reading` at each scrape.
#[derive(Debug, Default)]
struct ReadingCollector {
    latest: Mutex<Reading>,
}

impl prometheus_client::collector::Collector for ReadingCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let reading = self.latest.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(status) = &reading.status {
            encode_services(&mut encoder, status)?;
            encode_backends(&mut encoder, status)?;
            encode_announcements(&mut encoder, status)?;
            encode_sync(&mut encoder, status)?;
        }
        encode_globals(&mut encoder, &reading.globals)?;
        single(&mut encoder, "ring_rebuilds", "Maglev ring rewrites applied", reading.ring_rebuilds)
    }
}

/// One metric with a row per label set; counters and gauges alike.
fn family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (L, i64)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        let row = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value.max(0) as u64).encode(row)?,
            _ => ConstGauge::new(value).encode(row)?,
        }
    }
    Ok(())
}

/// One counter without labels.
fn single(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    ConstCounter::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn encode_services(encoder: &mut DescriptorEncoder, status: &Status) -> fmt::Result {
    let rows = |value: fn(&crate::control::ServiceStatus) -> i64| {
        status.services.iter().map(move |s| (ServiceLabels { service: s.name.clone() }, value(s)))
    };
    family(
        encoder,
        "service_packets",
        "Packets to the service's VIP",
        MetricType::Counter,
        rows(|s| s.packets as i64),
    )?;
    family(encoder, "service_bytes", "Bytes to the service's VIP", MetricType::Counter, rows(|s| s.bytes as i64))?;
    family(
        encoder,
        "service_new_flows",
        "New flows scheduled for the service",
        MetricType::Counter,
        rows(|s| s.new_flows as i64),
    )?;
    family(
        encoder,
        "service_fail_open",
        "1 when every backend is down and the service fails open",
        MetricType::Gauge,
        rows(|s| s.fail_open as i64),
    )?;
    family(
        encoder,
        "service_backup_active",
        "1 when no primary backend is available and the backups take new flows",
        MetricType::Gauge,
        rows(|s| s.backup_active as i64),
    )?;
    family(
        encoder,
        "service_pins_follow_ring",
        "1 while every flow the service pins is on its ring's pick (last table scan, no ring change since): its \
         SYNs skip the connection-table lookup",
        MetricType::Gauge,
        rows(|s| s.pins_follow_ring as i64),
    )?;
    if let Some(d) = &status.discovery {
        let registry = || RegistryLabels { registry: "etcd" };
        family(
            encoder,
            "discovery_up",
            "1 while the registry watch is established; 0 while the last known pools are kept",
            MetricType::Gauge,
            [(registry(), d.up as i64)],
        )?;
        family(
            encoder,
            "discovery_backends",
            "Backends the registry gives, over all services",
            MetricType::Gauge,
            [(registry(), d.backends as i64)],
        )?;
        family(
            encoder,
            "discovery_skipped_entries",
            "Registry entries left out (bad value, wrong family, listed in the file already)",
            MetricType::Gauge,
            [(registry(), d.skipped.len() as i64)],
        )?;
    }
    let nat = status.services.iter().filter_map(|s| {
        s.nat_port_exhausted.map(|refused| (ServiceLabels { service: s.name.clone() }, refused as i64))
    });
    family(
        encoder,
        "nat_port_exhausted",
        "New flows of NAT services refused: no free source port",
        MetricType::Counter,
        nat,
    )
}

/// Connection-table sync: flows sent, received and adopted; messages dropped.
fn encode_sync(encoder: &mut DescriptorEncoder, status: &Status) -> fmt::Result {
    let Some(sync) = &status.sync else {
        return Ok(());
    };
    for (name, help, value) in [
        ("sync_sent_flows", "Flows sent to the peers (once per flow)", sync.sent_flows),
        ("sync_send_errors", "Sync messages the socket could not send", sync.send_errors),
        ("sync_received_flows", "Flows in the peers' authenticated messages", sync.received_flows),
        ("sync_adopted_flows", "Peers' flows written to the connection table", sync.adopted_flows),
        ("sync_unknown_flows", "Peers' flows whose VIP or backend this node does not have", sync.unknown_flows),
    ] {
        single(encoder, name, help, value)?;
    }
    let rejected = [
        ("malformed", sync.rejected_malformed),
        ("unauthenticated", sync.rejected_unauthenticated),
        ("replayed", sync.rejected_replayed),
        ("unknown_peer", sync.rejected_unknown_peer),
    ]
    .map(|(reason, value)| (ReasonLabels { reason }, value as i64));
    family(encoder, "sync_rejected", "Sync messages dropped, by reason", MetricType::Counter, rejected)
}

/// Route health injection: per VIP, announced or not and why.
fn encode_announcements(encoder: &mut DescriptorEncoder, status: &Status) -> fmt::Result {
    let Some(announce) = &status.announce else {
        return Ok(());
    };
    let drained = (announce.node == NodeState::Drained) as i64;
    let help = "1 while the node is drained (xdplb node drain): no VIP is announced";
    ConstGauge::new(drained).encode(encoder.encode_descriptor("node_drained", help, None, MetricType::Gauge)?)?;
    let vips = || announce.vips.iter();
    family(
        encoder,
        "vip_announced",
        "1 while this node announces the VIP (a route in the announce table)",
        MetricType::Gauge,
        vips().map(|v| (VipLabels { vip: v.vip.to_string() }, v.announced as i64)),
    )?;
    let reasons = vips().flat_map(|v| {
        Cause::ALL
            .map(|cause| (VipReasonLabels { vip: v.vip.to_string(), reason: cause.name() }, (v.cause == cause) as i64))
    });
    family(
        encoder,
        "vip_announce_reason",
        "1 for the reason the VIP is announced or withdrawn",
        MetricType::Gauge,
        reasons,
    )
}

fn encode_backends(encoder: &mut DescriptorEncoder, status: &Status) -> fmt::Result {
    let each = || {
        status.services.iter().flat_map(|s| s.backends.iter().map(move |b| (Metrics::labels(&s.name, b.address), b)))
    };
    type Value = fn(&BackendStatus) -> i64;
    let metrics: [(&str, &str, MetricType, Value); 7] = [
        ("backend_packets", "Packets sent to the backend", MetricType::Counter, |b| b.packets as i64),
        ("backend_bytes", "Bytes sent to the backend", MetricType::Counter, |b| b.bytes as i64),
        ("backend_new_flows", "New flows scheduled to the backend", MetricType::Counter, |b| b.new_flows as i64),
        (
            "backend_active_flows",
            "Connection-table entries seen within the idle timeout and not finished",
            MetricType::Gauge,
            |b| b.active_flows as i64,
        ),
        (
            "backend_health",
            "1 when the backend passes its health checks (or is not checked), 0 when down",
            MetricType::Gauge,
            |b| (b.health != Health::Down) as i64,
        ),
        ("backend_weight", "Configured weight", MetricType::Gauge, |b| b.weight as i64),
        ("backend_in_ring", "1 when the backend takes new flows", MetricType::Gauge, |b| b.in_ring as i64),
    ];
    for (name, help, kind, value) in metrics {
        family(encoder, name, help, kind, each().map(|(labels, b)| (labels, value(b))))?;
    }
    let admin = each().flat_map(|(labels, b)| {
        Admin::ALL.map(|state| {
            let row =
                AdminLabels { service: labels.service.clone(), backend: labels.backend.clone(), state: state.name() };
            (row, (b.admin == state) as i64)
        })
    });
    family(encoder, "backend_admin_state", "1 for the backend's current admin state", MetricType::Gauge, admin)?;
    let nat_flows = each().filter_map(|(labels, b)| b.nat_flows.map(|v| (labels, v as i64)));
    family(
        encoder,
        "backend_nat_flows",
        "NAT translations to the backend (source ports in use)",
        MetricType::Gauge,
        nat_flows,
    )?;
    let free = each().filter_map(|(labels, b)| b.nat_free_ports.map(|v| (labels, v as i64)));
    family(
        encoder,
        "backend_nat_free_ports",
        "NAT source ports still free towards the backend",
        MetricType::Gauge,
        free,
    )
}

const DROPS: [GlobalCounter; 8] = [
    GlobalCounter::DropFragment,
    GlobalCounter::DropIpv6ExtHeader,
    GlobalCounter::DropNoBackend,
    GlobalCounter::DropNoEgressDevice,
    GlobalCounter::DropTooBig,
    GlobalCounter::DropEncapFailed,
    GlobalCounter::DropNatPortExhausted,
    GlobalCounter::DropNatTableFull,
];

fn encode_globals(encoder: &mut DescriptorEncoder, globals: &[(GlobalCounter, u64)]) -> fmt::Result {
    let value = |c: GlobalCounter| globals.iter().find(|(g, _)| *g == c).map_or(0, |(_, v)| *v) as i64;
    let actions = [
        (
            "tx",
            value(GlobalCounter::ActionTx) + value(GlobalCounter::TooBigSentV4) + value(GlobalCounter::TooBigSentV6),
        ),
        ("redirect", value(GlobalCounter::ActionRedirect)),
        (
            "pass",
            value(GlobalCounter::PassNonVip)
                + value(GlobalCounter::PassUnparsed)
                + value(GlobalCounter::NatReplyToKernel),
        ),
        ("drop", DROPS.iter().map(|d| value(*d)).sum()),
    ];
    let actions = actions.map(|(action, v)| (ActionLabels { action }, v));
    family(encoder, "xdp_actions", "XDP verdicts of the program", MetricType::Counter, actions)?;
    let drops = DROPS.map(|d| (ReasonLabels { reason: d.name().trim_start_matches("drop_") }, value(d)));
    family(encoder, "drops", "Packets dropped, by reason", MetricType::Counter, drops)?;
    let passes = [
        ("non_vip", GlobalCounter::PassNonVip),
        ("unparsed", GlobalCounter::PassUnparsed),
        ("nat_reply_without_route", GlobalCounter::NatReplyToKernel),
    ]
    .map(|(reason, c)| (ReasonLabels { reason }, value(c)));
    family(encoder, "passes", "Packets passed to the kernel, by reason", MetricType::Counter, passes)?;
    let forwarded = [
        ("dsr", GlobalCounter::ForwardedDsr),
        ("ipip", GlobalCounter::ForwardedIpip),
        ("gue", GlobalCounter::ForwardedGue),
        ("nat", GlobalCounter::ForwardedNat),
    ]
    .map(|(mode, c)| (ModeLabels { mode }, value(c)));
    family(encoder, "forwarded", "Packets sent to backends, by forwarding mode", MetricType::Counter, forwarded)?;
    single(
        encoder,
        "nat_replies",
        "Backend replies of NAT flows translated back to VIP → client",
        value(GlobalCounter::NatReplies) as u64,
    )?;
    single(
        encoder,
        "nat_icmp_errors",
        "ICMP errors about NAT flows (unreachable, too big, time exceeded) translated back to the client",
        value(GlobalCounter::NatIcmpErrors) as u64,
    )?;
    let too_big = [("ipv4", GlobalCounter::TooBigSentV4), ("ipv6", GlobalCounter::TooBigSentV6)]
        .map(|(family, c)| (FamilyLabels { family }, value(c)));
    family(
        encoder,
        "too_big_sent",
        "ICMP fragmentation-needed / ICMPv6 packet-too-big sent to clients whose packets would not fit the tunnel",
        MetricType::Counter,
        too_big,
    )?;
    for (name, help, c) in [
        (
            "conntrack_hits",
            "Non-SYN packets that found their flow in the connection table",
            GlobalCounter::ConntrackHit,
        ),
        (
            "conntrack_misses",
            "Non-SYN packets that found no usable entry and were scheduled",
            GlobalCounter::ConntrackMiss,
        ),
        ("conntrack_insert_failures", "Connection-table inserts that failed", GlobalCounter::ConntrackInsertFailed),
        ("syn_scheduled", "SYNs scheduled as new connections", GlobalCounter::SynScheduled),
        ("syn_retransmits", "SYN retransmissions sent to the backend of their first SYN", GlobalCounter::SynRetransmit),
        (
            "syn_to_established",
            "SYNs for a live established flow, sent to its backend, the flow left as it was",
            GlobalCounter::SynToEstablished,
        ),
        (
            "syn_flood",
            "SYNs scheduled while their CPU saw more than syn_flood_threshold SYNs per second",
            GlobalCounter::SynFlood,
        ),
        (
            "half_open_promoted",
            "Handshakes completed on their SYN's backend (half-open entry moved to the connection table)",
            GlobalCounter::HalfOpenPromoted,
        ),
        ("affinity_hits", "New flows that followed their client's affinity", GlobalCounter::AffinityHit),
        (
            "sync_events_lost",
            "Pinned flows the data plane could not report for sync (its event ring was full)",
            GlobalCounter::SyncEventLost,
        ),
    ] {
        single(encoder, name, help, value(c) as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_conventional_names_and_summed_values() {
        let mut status = crate::control::protocol::sample_status(10, 1000);
        status.services[0].new_flows = 2;
        let backend = &mut status.services[0].backends[0];
        (backend.health, backend.admin, backend.in_ring) = (Health::Down, Admin::Draining, false);
        (backend.active_flows, backend.packets, backend.bytes, backend.new_flows) = (3, 7, 700, 1);
        let metrics = Metrics::default();
        metrics.probe_latency.get_or_create(&Metrics::labels("web", "198.18.1.11")).observe(0.002);
        let globals = [
            (GlobalCounter::ActionTx, 4),
            (GlobalCounter::DropFragment, 2),
            (GlobalCounter::DropNoBackend, 1),
            (GlobalCounter::ForwardedGue, 9),
            (GlobalCounter::TooBigSentV6, 1),
        ];
        let reading = Reading { status: Some(status), globals: globals.to_vec(), ring_rebuilds: 5 };
        let text = metrics.render(reading).unwrap();
        for line in [
            "xdplb_backend_packets_total{service=\"web\",backend=\"198.18.1.11\"} 7",
            "xdplb_backend_health{service=\"web\",backend=\"198.18.1.11\"} 0",
            "xdplb_backend_active_flows{service=\"web\",backend=\"198.18.1.11\"} 3",
            "xdplb_backend_admin_state{service=\"web\",backend=\"198.18.1.11\",state=\"draining\"} 1",
            "xdplb_backend_admin_state{service=\"web\",backend=\"198.18.1.11\",state=\"enabled\"} 0",
            "xdplb_service_packets_total{service=\"web\"} 10",
            "xdplb_xdp_actions_total{action=\"drop\"} 3",
            "xdplb_drops_total{reason=\"fragment\"} 2",
            "xdplb_ring_rebuilds_total 5",
            "xdplb_forwarded_total{mode=\"gue\"} 9",
            "xdplb_too_big_sent_total{family=\"ipv6\"} 1",
            "xdplb_xdp_actions_total{action=\"tx\"} 5",
            "xdplb_conntrack_misses_total 0",
            "# HELP xdplb_syn_retransmits SYN retransmissions",
            "xdplb_backend_probe_latency_seconds_count{service=\"web\",backend=\"198.18.1.11\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Route health injection, when configured: per VIP and per reason.
        let mut status = crate::control::protocol::sample_status(1, 1);
        let vip = |vip: &str, cause| crate::announce::VipAnnouncement {
            vip: vip.parse().unwrap(),
            announced: cause == Cause::Healthy,
            cause,
            reason: String::new(),
        };
        status.sync = Some(crate::sync::SyncStatus { adopted_flows: 3, rejected_replayed: 2, ..Default::default() });
        status.announce = Some(crate::control::AnnounceStatus {
            table: 100,
            node: NodeState::Active,
            vips: vec![vip("198.18.0.100", Cause::Healthy), vip("2001:db8::100", Cause::TooFewHealthy)],
            error: None,
        });
        let text = metrics.render(Reading { status: Some(status), ..Default::default() }).unwrap();
        for line in [
            "xdplb_node_drained 0",
            "xdplb_vip_announced{vip=\"198.18.0.100\"} 1",
            "xdplb_vip_announced{vip=\"2001:db8::100\"} 0",
            "xdplb_vip_announce_reason{vip=\"2001:db8::100\",reason=\"too_few_healthy\"} 1",
            "xdplb_vip_announce_reason{vip=\"2001:db8::100\",reason=\"healthy\"} 0",
            "xdplb_sync_adopted_flows_total 3",
            "xdplb_sync_rejected_total{reason=\"replayed\"} 2",
            "xdplb_sync_rejected_total{reason=\"unauthenticated\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // The same registry serves the next scrape with the new reading.
        let text = metrics.render(Reading { ring_rebuilds: 6, ..Default::default() }).unwrap();
        assert!(text.contains("xdplb_ring_rebuilds_total 6"), "{text}");
        assert!(
            text.contains("xdplb_backend_probe_latency_seconds_count{service=\"web\",backend=\"198.18.1.11\"} 1"),
            "{text}"
        );
    }
}
