//! Prometheus metrics: what the agent counts itself (probe latency,
//! transitions, ring rebuilds, map-write errors) plus the data plane's
//! counters read at scrape time, exposed with prometheus-client.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use lb_common::GlobalCounter;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::sync::{mpsc, oneshot};

use crate::control::Status;

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
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs … ~1.6 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 15))
}

/// Metrics the agent accumulates between scrapes.
#[derive(Clone)]
pub struct AgentMetrics {
    pub probe_latency: Family<BackendLabels, Histogram>,
    pub transitions: Family<BackendLabels, Counter>,
    pub map_update_errors: Counter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            probe_latency: Family::new_with_constructor(latency_histogram),
            transitions: Family::default(),
            map_update_errors: Counter::default(),
        }
    }
}

impl AgentMetrics {
    pub fn labels(service: &str, backend: impl ToString) -> BackendLabels {
        BackendLabels { service: service.to_string(), backend: backend.to_string() }
    }
}

/// Everything a scrape shows, read by the agent.
pub struct Snapshot<'a> {
    pub status: &'a Status,
    pub globals: &'a [(GlobalCounter, u64)],
    pub ring_rebuilds: u64,
    pub agent: &'a AgentMetrics,
}

/// The text exposition of one scrape. Per-CPU counters arrive summed.
pub fn render(snapshot: &Snapshot) -> Result<String> {
    let mut registry = Registry::with_prefix("xdplb");

    let service_counter =
        |registry: &mut Registry, name: &str, help: &str, value: fn(&crate::control::ServiceStatus) -> u64| {
            let family = Family::<ServiceLabels, Counter>::default();
            for s in &snapshot.status.services {
                family.get_or_create(&ServiceLabels { service: s.name.clone() }).inc_by(value(s));
            }
            registry.register(name, help, family);
        };
    service_counter(&mut registry, "service_packets", "Packets to the service's VIP", |s| s.packets);
    service_counter(&mut registry, "service_bytes", "Bytes to the service's VIP", |s| s.bytes);
    service_counter(&mut registry, "service_new_flows", "New flows scheduled for the service", |s| s.new_flows);
    let fail_open = Family::<ServiceLabels, Gauge>::default();
    for s in &snapshot.status.services {
        fail_open.get_or_create(&ServiceLabels { service: s.name.clone() }).set(s.fail_open as i64);
    }
    registry.register("service_fail_open", "1 when every backend is down and the service fails open", fail_open);

    type BackendValue = fn(&crate::control::BackendStatus) -> i64;
    let counters: [(&str, &str, BackendValue); 3] = [
        ("backend_packets", "Packets sent to the backend", |b| b.packets as i64),
        ("backend_bytes", "Bytes sent to the backend", |b| b.bytes as i64),
        ("backend_new_flows", "New flows scheduled to the backend", |b| b.new_flows as i64),
    ];
    for (name, help, value) in counters {
        let family = Family::<BackendLabels, Counter>::default();
        each_backend(snapshot.status, |labels, b| {
            family.get_or_create(&labels).inc_by(value(b) as u64);
        });
        registry.register(name, help, family);
    }
    let gauges: [(&str, &str, BackendValue); 4] = [
        ("backend_active_flows", "Connection-table entries seen within the idle timeout and not finished", |b| {
            b.active_flows as i64
        }),
        ("backend_health", "1 when the backend passes its health checks (or is not checked), 0 when down", |b| {
            (b.health != "down") as i64
        }),
        ("backend_weight", "Configured weight", |b| b.weight as i64),
        ("backend_in_ring", "1 when the backend takes new flows", |b| b.in_ring as i64),
    ];
    for (name, help, value) in gauges {
        let family = Family::<BackendLabels, Gauge>::default();
        each_backend(snapshot.status, |labels, b| {
            family.get_or_create(&labels).set(value(b));
        });
        registry.register(name, help, family);
    }
    let admin = Family::<AdminLabels, Gauge>::default();
    each_backend(snapshot.status, |labels, b| {
        for state in ["enabled", "draining", "drained"] {
            let labels =
                AdminLabels { service: labels.service.clone(), backend: labels.backend.clone(), state: state.into() };
            admin.get_or_create(&labels).set((b.admin == state) as i64);
        }
    });
    registry.register("backend_admin_state", "1 for the backend's current admin state", admin);
    registry.register("backend_probe_latency_seconds", "Health probe latency", snapshot.agent.probe_latency.clone());
    registry.register(
        "backend_health_transitions",
        "Health state changes (up→down and down→up)",
        snapshot.agent.transitions.clone(),
    );

    let value = |c: GlobalCounter| snapshot.globals.iter().find(|(g, _)| *g == c).map_or(0, |(_, v)| *v);
    let actions = Family::<ActionLabels, Counter>::default();
    let drops = [
        GlobalCounter::DropFragment,
        GlobalCounter::DropIpv6ExtHeader,
        GlobalCounter::DropNoBackend,
        GlobalCounter::DropNoEgressDevice,
    ];
    for (action, v) in [
        ("tx", value(GlobalCounter::ActionTx)),
        ("redirect", value(GlobalCounter::ActionRedirect)),
        ("pass", value(GlobalCounter::PassNonVip) + value(GlobalCounter::PassUnparsed)),
        ("drop", drops.iter().map(|d| value(*d)).sum()),
    ] {
        actions.get_or_create(&ActionLabels { action: action.into() }).inc_by(v);
    }
    registry.register("xdp_actions", "XDP verdicts of the program", actions);
    let reasons = Family::<ReasonLabels, Counter>::default();
    for d in drops {
        let reason = d.name().trim_start_matches("drop_").to_string();
        reasons.get_or_create(&ReasonLabels { reason }).inc_by(value(d));
    }
    registry.register("drops", "Packets dropped, by reason", reasons);
    let passes = Family::<ReasonLabels, Counter>::default();
    for (reason, c) in [("non_vip", GlobalCounter::PassNonVip), ("unparsed", GlobalCounter::PassUnparsed)] {
        passes.get_or_create(&ReasonLabels { reason: reason.into() }).inc_by(value(c));
    }
    registry.register("passes", "Packets passed to the kernel, by reason", passes);
    for (name, help, c) in [
        ("conntrack_hits", "Packets that found their flow in the connection table", GlobalCounter::ConntrackHit),
        ("conntrack_misses", "Packets scheduled through the ring", GlobalCounter::ConntrackMiss),
        ("conntrack_insert_failures", "Connection-table inserts that failed", GlobalCounter::ConntrackInsertFailed),
    ] {
        let counter = Counter::<u64>::default();
        counter.inc_by(value(c));
        registry.register(name, help, counter);
    }
    let rebuilds = Counter::<u64>::default();
    rebuilds.inc_by(snapshot.ring_rebuilds);
    registry.register("ring_rebuilds", "Maglev ring rewrites applied", rebuilds);
    registry.register("map_update_errors", "Map writes that failed", snapshot.agent.map_update_errors.clone());

    let mut text = String::new();
    encode(&mut text, &registry)?;
    Ok(text)
}

fn each_backend(status: &Status, mut f: impl FnMut(BackendLabels, &crate::control::BackendStatus)) {
    for s in &status.services {
        for b in &s.backends {
            f(AgentMetrics::labels(&s.name, &b.address), b);
        }
    }
}

/// Binds the metrics listener (at start, so a taken port fails the start).
pub async fn bind(address: SocketAddr) -> Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("metrics_listen {address}"))?;
    log::info!("metrics at http://{address}/metrics");
    Ok(listener)
}

/// Serves GET /metrics; every scrape asks the agent for the text.
pub async fn serve(listener: tokio::net::TcpListener, scrapes: mpsc::Sender<oneshot::Sender<String>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let scrapes = scrapes.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(request, scrapes).await) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    scrapes: mpsc::Sender<oneshot::Sender<String>>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    if request.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "see /metrics\n".into());
    }
    let (tx, rx) = oneshot::channel();
    if scrapes.send(tx).await.is_err() {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "the agent is shutting down\n".into());
    }
    match rx.await {
        Ok(text) => reply(StatusCode::OK, text),
        Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, "no answer from the agent\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{BackendStatus, ServiceStatus};

    #[test]
    fn exposition_has_conventional_names_and_summed_values() {
        let status = Status {
            outstanding_map_write: None,
            interface: "eth0".into(),
            services: vec![ServiceStatus {
                name: "web".into(),
                vip: "198.18.0.100:80".into(),
                protocol: "tcp".into(),
                forwarding: "dsr".into(),
                scheduler: "maglev".into(),
                persistence_timeout_s: 0,
                fail_open: false,
                packets: 10,
                bytes: 1000,
                new_flows: 2,
                backends: vec![BackendStatus {
                    address: "198.18.1.11".into(),
                    weight: 1,
                    effective_weight: 1,
                    least_conn_active: None,
                    health: "down".into(),
                    last_probe: None,
                    admin: "draining".into(),
                    in_ring: false,
                    resolved: true,
                    active_flows: 3,
                    packets: 7,
                    bytes: 700,
                    new_flows: 1,
                }],
            }],
        };
        let agent = AgentMetrics::default();
        agent.probe_latency.get_or_create(&AgentMetrics::labels("web", "198.18.1.11")).observe(0.002);
        let globals =
            [(GlobalCounter::ActionTx, 4), (GlobalCounter::DropFragment, 2), (GlobalCounter::DropNoBackend, 1)];
        let text = render(&Snapshot { status: &status, globals: &globals, ring_rebuilds: 5, agent: &agent }).unwrap();
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
            "xdplb_backend_probe_latency_seconds_count{service=\"web\",backend=\"198.18.1.11\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
