//! Backends from a registry: etcd's v3 API, under `[discovery] prefix`.
//!
//! A backend of service SERVICE registers as the key PREFIX/SERVICE/ADDRESS
//! (ADDRESS as in the config: `198.18.1.11`, `198.18.1.11:8080`,
//! `[2001:db8::11]:8080`) whose value is JSON: `{"weight": 1, "backup":
//! false}` (both optional; `{}` is weight 1, primary). `xdplb register` writes
//! it with a lease and keeps the lease alive; `etcdctl put` works as well.
//!
//! This module is pure: the entries' schema, the agent's copy of the
//! prefix, and how registered backends join the configured ones. The watch
//! is in `watch`, the registration sidecar in `register`, the client in
//! `etcd`.

pub mod etcd;
pub mod register;
pub mod watch;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{BackendAddress, BackendConfig, Config, MAX_BACKENDS_PER_SERVICE, MAX_WEIGHT, Origin, Weight};

/// A key's value: what the backend asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub backup: bool,
}

fn default_weight() -> u32 {
    1
}

/// One change the watch saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

/// What the watch tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Everything under the prefix at `revision`: on the first connection,
    /// and again when the revision to resume from was compacted away.
    Snapshot { entries: Vec<(Vec<u8>, Vec<u8>)>, revision: i64 },
    /// Changes up to `revision`, in order.
    Changes { changes: Vec<Change>, revision: i64 },
    /// The watch is established (again).
    Up,
    /// The registry cannot be reached or the watch broke; the last known
    /// pools stay, the watch retries with back-off.
    Down { reason: String },
}

/// The agent's copy of the registry prefix; saved to the cache file so a
/// restarted agent starts from it even while the registry is down.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryView {
    pub revision: i64,
    entries: BTreeMap<String, String>,
}

impl RegistryView {
    /// Applies a snapshot or changes; returns whether any entry changed.
    pub fn apply(&mut self, event: &Event) -> bool {
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        match event {
            Event::Snapshot { entries, revision } => {
                let entries: BTreeMap<String, String> = entries.iter().map(|(k, v)| (text(k), text(v))).collect();
                self.revision = *revision;
                let changed = entries != self.entries;
                self.entries = entries;
                changed
            }
            Event::Changes { changes, revision } => {
                self.revision = *revision;
                let mut changed = false;
                for change in changes {
                    changed |= match change {
                        Change::Put { key, value } => {
                            self.entries.insert(text(key), text(value)).as_deref() != Some(&text(value))
                        }
                        Change::Delete { key } => self.entries.remove(&text(key)).is_some(),
                    };
                }
                changed
            }
            Event::Up | Event::Down { .. } => false,
        }
    }

    /// The registered backends per service, and the keys left out with why.
    pub fn pools(&self, prefix: &str) -> Pools {
        let mut pools = Pools::default();
        for (key, value) in &self.entries {
            match parse_entry(prefix, key, value) {
                Ok((service, address, registration)) => {
                    pools.backends.entry(service).or_default().push((key.clone(), address, registration))
                }
                Err(reason) => {
                    pools.skipped.insert(key.clone(), reason);
                }
            }
        }
        pools
    }
}

/// Registered backends by service: (key, address, registration).
#[derive(Debug, Default)]
pub struct Pools {
    pub backends: BTreeMap<String, Vec<(String, BackendAddress, Registration)>>,
    /// key → why it was left out.
    pub skipped: BTreeMap<String, String>,
}

/// PREFIX/SERVICE/ADDRESS with its JSON value → (service, address, registration).
pub fn parse_entry(prefix: &str, key: &str, value: &str) -> Result<(String, BackendAddress, Registration), String> {
    let rest = key.strip_prefix(prefix).ok_or_else(|| format!("not under the prefix {prefix:?}"))?;
    let (service, address) = rest
        .split_once('/')
        .filter(|(service, address)| !service.is_empty() && !address.is_empty() && !address.contains('/'))
        .ok_or_else(|| format!("the key is not {prefix}SERVICE/ADDRESS"))?;
    let address: BackendAddress = address.parse()?;
    let registration: Registration =
        serde_json::from_str(value).map_err(|e| format!("the value {value:?} is not the JSON of a backend: {e}"))?;
    if registration.weight > MAX_WEIGHT {
        return Err(format!("weight {} is out of range 0..={MAX_WEIGHT}", registration.weight));
    }
    Ok((service.to_string(), address, registration))
}

/// Puts the registered backends into the services with `discover = true`,
/// in place of those of the previous merge. Returns the entries left out,
/// key → why (wrong family for the service, listed in the file already,
/// service full).
pub fn merge(config: &mut Config, pools: &Pools) -> BTreeMap<String, String> {
    let mut skipped = BTreeMap::new();
    let vips: BTreeMap<std::net::IpAddr, String> =
        config.services.iter().map(|s| (s.vip.get_ref().ip(), s.name.get_ref().clone())).collect();
    for service in &mut config.services {
        service.backends.retain(|b| b.origin != Origin::Etcd);
        if !service.discovers() {
            continue;
        }
        let name = service.name.get_ref().clone();
        let limit = match service.scheduler {
            crate::config::Scheduler::LeastConn => lb_common::MAX_LEAST_CONN_CANDIDATES as usize,
            _ => MAX_BACKENDS_PER_SERVICE,
        };
        for (key, address, registration) in pools.backends.get(&name).into_iter().flatten() {
            let refusal = if let Err(err) = service.admits(*address) {
                Some(format!("service {name:?}: {err}"))
            } else if let Some(owner) = vips.get(&address.ip) {
                Some(format!("backend {address} is the VIP of service {owner:?}"))
            } else if let Some(existing) = service.backends.iter().find(|b| b.address.get_ref() == address) {
                Some(format!(
                    "service {name:?} lists backend {address} already (from the {}); that entry applies",
                    existing.origin.name()
                ))
            } else if service.backends.len() >= limit {
                Some(format!("service {name:?} has {limit} backends already, its maximum"))
            } else {
                None
            };
            match refusal {
                Some(reason) => {
                    skipped.insert(key.clone(), reason);
                }
                None => service.backends.push(BackendConfig::new(
                    *address,
                    Weight(registration.weight),
                    registration.backup,
                    Origin::Etcd,
                )),
            }
        }
    }
    skipped
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const PREFIX: &str = "/xdplb/services/";

    fn config() -> Config {
        let text = "[agent]\ninterface = \"eth0\"\n\n[discovery]\netcd = [\"http://198.18.0.2:2379\"]\n\n\
                    [[service]]\nname = \"web\"\nvip = \"198.18.0.100:80\"\nprotocol = \"tcp\"\ndiscover = true\n\n\
                    [[service.backend]]\naddress = \"198.18.1.11\"\n\n\
                    [[service]]\nname = \"static\"\nvip = \"198.18.0.101:80\"\nprotocol = \"tcp\"\n";
        Config::parse(text, Path::new("t.toml")).unwrap()
    }

    fn put(key: &str, value: &str) -> Change {
        Change::Put { key: key.as_bytes().to_vec(), value: value.as_bytes().to_vec() }
    }

    #[test]
    fn entries_follow_the_documented_schema() {
        let (service, address, registration) =
            parse_entry(PREFIX, "/xdplb/services/web/198.18.1.12", r#"{"weight": 3, "backup": true}"#).unwrap();
        assert_eq!((service.as_str(), address.to_string().as_str()), ("web", "198.18.1.12"));
        assert_eq!(registration, Registration { weight: 3, backup: true });
        let (_, address, registration) = parse_entry(PREFIX, "/xdplb/services/web/[2001:db8::11]:8080", "{}").unwrap();
        assert_eq!(
            (address.to_string(), registration),
            ("[2001:db8::11]:8080".into(), Registration { weight: 1, backup: false })
        );
        for (key, value, why) in [
            ("/xdplb/services/web/198.18.1.12", "weight=3", "is not the JSON of a backend"),
            ("/xdplb/services/web/198.18.1.12", r#"{"weight": 1001}"#, "weight 1001 is out of range 0..=1000"),
            ("/xdplb/services/web/198.18.1.12", r#"{"weigth": 2}"#, "unknown field `weigth`"),
            ("/xdplb/services/web/198.18.1.12", r#"{"weight": -1}"#, "is not the JSON of a backend"),
            ("/xdplb/services/web/host.example", "{}", "is not a backend address"),
            ("/xdplb/services/web", "{}", "is not /xdplb/services/SERVICE/ADDRESS"),
            ("/xdplb/services/web/a/b", "{}", "is not /xdplb/services/SERVICE/ADDRESS"),
            ("/other/web/198.18.1.12", "{}", "not under the prefix"),
        ] {
            let err = parse_entry(PREFIX, key, value).unwrap_err();
            assert!(err.contains(why), "{key} {value}: {err}");
        }
    }

    #[test]
    fn the_view_follows_snapshots_and_changes() {
        let mut view = RegistryView::default();
        let snapshot = Event::Snapshot {
            entries: vec![(b"/xdplb/services/web/198.18.1.12".to_vec(), b"{}".to_vec())],
            revision: 7,
        };
        assert!(view.apply(&snapshot));
        assert!(!view.apply(&snapshot), "the same snapshot again changes nothing");
        let changes = vec![
            put("/xdplb/services/web/198.18.1.13", r#"{"weight":2}"#),
            Change::Delete { key: b"/xdplb/services/web/198.18.1.12".to_vec() },
        ];
        assert!(view.apply(&Event::Changes { changes, revision: 9 }));
        assert_eq!(view.revision, 9);
        let pools = view.pools(PREFIX);
        let web = &pools.backends["web"];
        assert_eq!(web.len(), 1);
        assert_eq!((web[0].1.to_string(), web[0].2.weight), ("198.18.1.13".into(), 2));
        // A put of the same value (a lease refresh re-put) is no change.
        let again = vec![put("/xdplb/services/web/198.18.1.13", r#"{"weight":2}"#)];
        assert!(!view.apply(&Event::Changes { changes: again, revision: 10 }));
        assert!(!view.apply(&Event::Down { reason: "gone".into() }));
        assert_eq!(view.pools(PREFIX).backends["web"].len(), 1, "down keeps the pool");
    }

    #[test]
    fn registered_backends_join_the_configured_ones_and_bad_ones_are_left_out() {
        let mut view = RegistryView::default();
        view.apply(&Event::Snapshot {
            entries: [
                ("/xdplb/services/web/198.18.1.12", r#"{"weight":2}"#),
                ("/xdplb/services/web/198.18.1.13", r#"{"backup":true}"#),
                ("/xdplb/services/web/198.18.1.11", "{}"),
                ("/xdplb/services/web/2001:db8::14", "{}"),
                ("/xdplb/services/web/198.18.1.15", "not json"),
                ("/xdplb/services/static/198.18.1.16", "{}"),
                ("/xdplb/services/other/198.18.1.17", "{}"),
            ]
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect(),
            revision: 3,
        });
        let mut config = config();
        let pools = view.pools(PREFIX);
        let mut skipped = merge(&mut config, &pools);
        skipped.extend(pools.skipped);
        config.check().unwrap();
        let web: Vec<(String, u32, bool, Origin)> = config.services[0]
            .backends
            .iter()
            .map(|b| (b.address.get_ref().to_string(), b.weight.0, b.backup, b.origin))
            .collect();
        assert_eq!(
            web,
            [
                ("198.18.1.11".into(), 1, false, Origin::File),
                ("198.18.1.12".into(), 2, false, Origin::Etcd),
                ("198.18.1.13".into(), 1, true, Origin::Etcd),
            ]
        );
        assert!(config.services[1].backends.is_empty(), "a service without discover = true takes none");
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(skipped["/xdplb/services/web/198.18.1.11"].contains("already (from the file)"));
        assert!(skipped["/xdplb/services/web/2001:db8::14"].contains("not of the same IP family"));
        assert!(skipped["/xdplb/services/web/198.18.1.15"].contains("not the JSON"));
        // Merging again replaces, never duplicates; a key gone is a backend gone.
        view.apply(&Event::Changes {
            changes: vec![Change::Delete { key: b"/xdplb/services/web/198.18.1.12".to_vec() }],
            revision: 4,
        });
        merge(&mut config, &view.pools(PREFIX));
        assert_eq!(config.services[0].backends.len(), 2);
        config.check().unwrap();
    }
}
