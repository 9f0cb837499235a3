//! Values written as strings in the file and on the command line: a
//! backend's `ADDRESS[:PORT]` and a port range `LOW-HIGH`.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A backend: its address and, for NAT services, the port it listens on
/// (`None`: the VIP's port). Written `198.18.1.11`, `198.18.1.11:8080`,
/// `2001:db8::11` or `[2001:db8::11]:8080`. A service's backends are told
/// apart by both: one host may serve on several ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddress {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl BackendAddress {
    pub fn new(ip: IpAddr) -> Self {
        Self { ip, port: None }
    }

    /// The port it is reached on, given the VIP's port.
    pub fn port_or(&self, vip_port: u16) -> u16 {
        self.port.unwrap_or(vip_port)
    }
}

impl From<IpAddr> for BackendAddress {
    fn from(ip: IpAddr) -> Self {
        Self::new(ip)
    }
}

impl fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ip, self.port) {
            (ip, None) => write!(f, "{ip}"),
            (IpAddr::V4(ip), Some(port)) => write!(f, "{ip}:{port}"),
            (IpAddr::V6(ip), Some(port)) => write!(f, "[{ip}]:{port}"),
        }
    }
}

impl FromStr for BackendAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Self::new(ip));
        }
        match text.parse::<std::net::SocketAddr>() {
            Ok(socket) if socket.port() == 0 => Err(format!("{text:?}: port 0 is not a port")),
            Ok(socket) => Ok(Self { ip: socket.ip(), port: Some(socket.port()) }),
            Err(_) => {
                Err(format!("{text:?} is not a backend address (ADDRESS or ADDRESS:PORT, IPv6 as [ADDRESS]:PORT)"))
            }
        }
    }
}

impl<'de> Deserialize<'de> for BackendAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for BackendAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A range of ports, `LOW-HIGH` inclusive (`nat_source_ports`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    pub fn len(&self) -> u32 {
        self.high as u32 - self.low as u32 + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Default for PortRange {
    fn default() -> Self {
        Self { low: lb_common::DEFAULT_NAT_PORT_LOW, high: lb_common::DEFAULT_NAT_PORT_HIGH }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.low, self.high)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a port range LOW-HIGH (1 ≤ LOW ≤ HIGH ≤ 65535)");
        let (low, high) = text.split_once('-').ok_or_else(bad)?;
        let low: u16 = low.trim().parse().map_err(|_| bad())?;
        let high: u16 = high.trim().parse().map_err(|_| bad())?;
        if low == 0 || low > high {
            return Err(bad());
        }
        Ok(Self { low, high })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_addresses_with_and_without_ports_round_trip() {
        for text in ["198.18.1.11", "198.18.1.11:8080", "2001:db8::11", "[2001:db8::11]:8080"] {
            let address: BackendAddress = text.parse().unwrap();
            assert_eq!(address.to_string(), text);
        }
        let address: BackendAddress = "[2001:db8::11]:8080".parse().unwrap();
        assert_eq!((address.ip, address.port), ("2001:db8::11".parse().unwrap(), Some(8080)));
        assert_eq!(address.port_or(80), 8080);
        assert_eq!("198.18.1.11".parse::<BackendAddress>().unwrap().port_or(80), 80);
        for bad in ["198.18.1.311", "198.18.1.11:0", "198.18.1.11:70000", "2001:db8::11:8080x", "", "host:80"] {
            let err = bad.parse::<BackendAddress>().unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn port_ranges_parse_and_refuse_nonsense() {
        assert_eq!("1024-65535".parse::<PortRange>().unwrap(), PortRange::default());
        let range: PortRange = "40000-40003".parse().unwrap();
        assert_eq!((range.low, range.high, range.len()), (40000, 40003, 4));
        assert_eq!("7-7".parse::<PortRange>().unwrap().len(), 1);
        for bad in ["0-10", "20-10", "1024", "a-b", "1-65536", "-5"] {
            let err = bad.parse::<PortRange>().unwrap_err();
            assert!(err.contains("LOW-HIGH"), "{bad}: {err}");
        }
    }
}
