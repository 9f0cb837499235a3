//! What the CLI prints: the `status` table and the `top` view.

use super::protocol::Status;

pub fn top_view(previous: &(std::time::Instant, Status), current: &(std::time::Instant, Status)) -> String {
    let seconds = current.0.duration_since(previous.0).as_secs_f64().max(1e-3);
    let rate = |now: u64, before: Option<u64>| now.saturating_sub(before.unwrap_or(now)) as f64 / seconds;
    let mut rows = vec![
        ["SERVICE / BACKEND", "PKT/S", "BIT/S", "NEW FLOWS/S", "ACTIVE", "HEALTH", "ADMIN"].map(String::from).to_vec(),
    ];
    for s in &current.1.services {
        let old = previous.1.services.iter().find(|o| o.name == s.name);
        let active: u64 = s.backends.iter().map(|b| b.active_flows).sum();
        rows.push(vec![
            format!("{} {} {}", s.name, s.protocol, s.vip),
            human(rate(s.packets, old.map(|o| o.packets))),
            human(8.0 * rate(s.bytes, old.map(|o| o.bytes))),
            human(rate(s.new_flows, old.map(|o| o.new_flows))),
            active.to_string(),
            if s.fail_open { "FAIL-OPEN".into() } else { String::new() },
            String::new(),
        ]);
        for b in &s.backends {
            let old = old.and_then(|o| o.backends.iter().find(|ob| ob.address == b.address));
            rows.push(vec![
                format!("  {}", b.address),
                human(rate(b.packets, old.map(|o| o.packets))),
                human(8.0 * rate(b.bytes, old.map(|o| o.bytes))),
                human(rate(b.new_flows, old.map(|o| o.new_flows))),
                b.active_flows.to_string(),
                b.health.name().into(),
                b.admin.name().into(),
            ]);
        }
    }
    format!("xdplb top: {} (rates over {seconds:.1}s)\n{}", current.1.interface, aligned(&rows, ""))
}

/// 1234567.0 → "1.23M"
fn human(value: f64) -> String {
    match value {
        v if v >= 1e9 => format!("{:.2}G", v / 1e9),
        v if v >= 1e6 => format!("{:.2}M", v / 1e6),
        v if v >= 1e3 => format!("{:.2}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

/// `xdplb status` for people: one block per service, aligned columns.
pub fn status_table(status: &Status) -> String {
    let mut out = format!("interface {}\n", status.interface);
    if let Some(write) = &status.outstanding_map_write {
        out += &format!("WARNING: a map write was refused and is being retried: {write}\n");
    }
    if let Some(d) = &status.discovery {
        out += &format!(
            "discovery etcd {} {}: {} ({}), revision {}, {} registered backend(s)\n",
            d.endpoints.join(","),
            d.prefix,
            if d.up { "up" } else { "DOWN, keeping the last known pools" },
            d.detail,
            d.revision,
            d.backends
        );
        for skipped in &d.skipped {
            out += &format!("  skipped {skipped}\n");
        }
    }
    if let Some(s) = &status.sync {
        out += &format!(
            "sync {} ↔ {}: sent {} flow(s), received {} (adopted {}, unknown here {}); dropped: {} malformed, \
             {} unauthenticated, {} replayed, {} not from a peer; {} send error(s), {} event(s) lost\n",
            s.listen,
            s.peers.join(", "),
            s.sent_flows,
            s.received_flows,
            s.adopted_flows,
            s.unknown_flows,
            s.rejected_malformed,
            s.rejected_unauthenticated,
            s.rejected_replayed,
            s.rejected_unknown_peer,
            s.send_errors,
            s.events_lost
        );
    }
    if let Some(a) = &status.announce {
        out += &format!("node {}, announcing in table {}\n", a.node.name().to_uppercase(), a.table);
        if let Some(error) = &a.error {
            out += &format!("WARNING: the announce table cannot be written: {error}\n");
        }
        for vip in &a.vips {
            let state = if vip.announced { "announced" } else { "WITHDRAWN" };
            out += &format!("  VIP {} {state}: {}\n", vip.vip, vip.reason);
        }
    }
    for s in &status.services {
        out += &format!(
            "\nservice {}  {} {}  {}/{}{}{}  packets {}  bytes {}  new flows {}\n",
            s.name,
            s.protocol,
            s.vip,
            s.forwarding,
            s.scheduler,
            if s.persistence_timeout_s > 0 {
                format!(" persistence {}s", s.persistence_timeout_s)
            } else {
                String::new()
            },
            if s.fail_open { "  FAIL-OPEN (every backend down)" } else { "" },
            s.packets,
            s.bytes,
            s.new_flows
        );
        if s.backup_active {
            out += "  BACKUPS ACTIVE: no primary backend is available\n";
        }
        if let Some(refused) = s.nat_port_exhausted.filter(|r| *r > 0) {
            out += &format!("  NAT: {refused} new flow(s) refused, no free source port\n");
        }
        let nat = s.backends.iter().any(|b| b.nat_flows.is_some());
        let mut header = [
            "BACKEND",
            "ORIGIN",
            "WEIGHT",
            "HEALTH",
            "LAST PROBE",
            "LATENCY",
            "ADMIN",
            "IN RING",
            "ACTIVE",
            "PACKETS",
            "BYTES",
        ]
        .map(String::from)
        .to_vec();
        if nat {
            header.extend(["NAT FLOWS", "FREE PORTS"].map(String::from));
        }
        let mut rows = vec![header];
        for b in &s.backends {
            let (probe, latency) = match &b.last_probe {
                Some(p) => {
                    (format!("{} ({:.1}s ago)", p.detail, p.age_ms as f64 / 1000.0), format!("{:.1}ms", p.latency_ms))
                }
                None => ("-".into(), "-".into()),
            };
            let ring = if !b.resolved {
                "unresolved"
            } else if b.in_ring {
                "yes"
            } else {
                "no"
            };
            let active = match b.least_conn_active {
                Some(live) => format!("{} (lc {live})", b.active_flows),
                None => b.active_flows.to_string(),
            };
            let weight = if b.effective_weight != b.weight && b.in_ring {
                format!("{} (now {})", b.weight, b.effective_weight)
            } else {
                b.weight.to_string()
            };
            let origin = format!("{}{}", b.origin.name(), if b.backup { " backup" } else { "" });
            let mut row = vec![
                b.address.to_string(),
                origin,
                weight,
                b.health.name().into(),
                probe,
                latency,
                b.admin.name().into(),
                ring.into(),
                active,
                b.packets.to_string(),
                b.bytes.to_string(),
            ];
            if nat {
                let figure = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
                row.extend([figure(b.nat_flows), figure(b.nat_free_ports)]);
            }
            rows.push(row);
        }
        out += &aligned(&rows, "  ");
    }
    out
}

/// Rows as columns separated by two spaces, left-aligned, each line
/// indented by `indent` (comfy-table without borders).
fn aligned(rows: &[Vec<String>], indent: &str) -> String {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING).set_content_arrangement(comfy_table::ContentArrangement::Disabled);
    for row in rows {
        table.add_row(row);
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table.lines().map(|line| format!("{indent}{}\n", line.trim_end())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_computes_rates_between_samples() {
        let status = crate::control::protocol::sample_status;
        let t0 = std::time::Instant::now();
        let view =
            top_view(&(t0, status(1000, 100_000)), &(t0 + std::time::Duration::from_secs(2), status(5000, 350_000)));
        // 4000 packets and 250 kB in 2 s: 2000 pkt/s, 1 Mbit/s, 200 new flows/s.
        assert!(view.contains("  198.18.1.11            2.00k  1.00M  200          4       up      enabled"), "{view}");
    }

    #[test]
    fn table_columns_line_up() {
        let rows = vec![vec!["A".into(), "BB".into()], vec!["CCC".into(), "D".into()]];
        assert_eq!(aligned(&rows, "  "), "  A    BB\n  CCC  D\n");
    }
}
