//! The sync wire format, its authentication and replay protection: pure
//! functions, no I/O.
//!
//! One UDP datagram is one message:
//!
//! ```text
//! magic "XLBS" | version 1 | flags 0 | count u16 | sender IP (16, v4 mapped) | sender port u16
//! | epoch u64 | sequence u64 | count × entry (56 bytes) | HMAC-SHA-256 (32 bytes)
//! entry: family u8 (4|6) | protocol u8 | 0 u16 | client (16) | VIP (16) | client port u16
//!        | VIP port u16 | backend (16)
//! ```
//!
//! Integers are big-endian, addresses 16 bytes (IPv4 in the first four).
//! The tag covers everything before it, with the key of `[sync] key_file`.
//! A sender's (epoch, sequence) only grows: the epoch is its start time in
//! nanoseconds, the sequence counts its messages since. Receivers accept
//! each (epoch, sequence) once, within a window of the last 64 sequences.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"XLBS";
const VERSION: u8 = 1;
const HEADER_BYTES: usize = 4 + 1 + 1 + 2 + 16 + 2 + 8 + 8;
const ENTRY_BYTES: usize = 1 + 1 + 2 + 16 + 16 + 2 + 2 + 16;
const TAG_BYTES: usize = 32;
/// Entries per datagram: 1,420 bytes, which IPv6 carries in 1,500 bytes.
pub const MAX_ENTRIES: usize = 24;
/// The shortest key `[sync] key_file` may hold.
pub const MIN_KEY_BYTES: usize = 32;
/// How many sequences below the highest seen are still accepted (once).
const REPLAY_WINDOW: u64 = 64;

/// One flow a node pinned: its five-tuple and its backend's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncedFlow {
    pub protocol: u8,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub backend: IpAddr,
}

/// An authenticated message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub sender: SocketAddr,
    pub epoch: u64,
    pub sequence: u64,
    pub flows: Vec<SyncedFlow>,
    /// Entries that were well authenticated but malformed (skipped).
    pub malformed: usize,
}

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Not a sync message of this version, or cut short.
    Malformed,
    /// The tag does not match: a wrong key or altered bytes.
    Unauthenticated,
    /// An (epoch, sequence) seen before, or older than the window.
    Replayed,
}

impl Rejection {
    pub const ALL: [Rejection; 3] = [Rejection::Malformed, Rejection::Unauthenticated, Rejection::Replayed];

    pub fn name(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::Unauthenticated => "unauthenticated",
            Rejection::Replayed => "replayed",
        }
    }
}

/// Encodes and signs one message of at most `MAX_ENTRIES` flows.
pub fn encode(key: &[u8], sender: SocketAddr, epoch: u64, sequence: u64, flows: &[SyncedFlow]) -> Vec<u8> {
    assert!(flows.len() <= MAX_ENTRIES, "at most {MAX_ENTRIES} flows per message");
    let mut out = Vec::with_capacity(HEADER_BYTES + flows.len() * ENTRY_BYTES + TAG_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, 0]);
    out.extend_from_slice(&(flows.len() as u16).to_be_bytes());
    out.extend_from_slice(&address_bytes(sender.ip()));
    out.extend_from_slice(&sender.port().to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&sequence.to_be_bytes());
    for flow in flows {
        out.push(if flow.client.is_ipv4() { 4 } else { 6 });
        out.push(flow.protocol);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&address_bytes(flow.client.ip()));
        out.extend_from_slice(&address_bytes(flow.vip.ip()));
        out.extend_from_slice(&flow.client.port().to_be_bytes());
        out.extend_from_slice(&flow.vip.port().to_be_bytes());
        out.extend_from_slice(&address_bytes(flow.backend));
    }
    let tag = mac(key).chain_update(&out).finalize().into_bytes();
    out.extend_from_slice(&tag);
    out
}

/// Checks and decodes one datagram (the replay check is the receiver's).
pub fn decode(key: &[u8], datagram: &[u8]) -> Result<Message, Rejection> {
    if datagram.len() < HEADER_BYTES + TAG_BYTES || &datagram[..4] != MAGIC || datagram[4] != VERSION {
        return Err(Rejection::Malformed);
    }
    let count = u16::from_be_bytes([datagram[6], datagram[7]]) as usize;
    if count > MAX_ENTRIES || datagram.len() != HEADER_BYTES + count * ENTRY_BYTES + TAG_BYTES {
        return Err(Rejection::Malformed);
    }
    let (signed, tag) = datagram.split_at(datagram.len() - TAG_BYTES);
    // Constant time: a forger learns nothing from how fast it is refused.
    mac(key).chain_update(signed).verify_slice(tag).map_err(|_| Rejection::Unauthenticated)?;
    let sender_ip = bytes_address(&signed[8..24], is_v4_mapped(&signed[8..24]));
    let sender = SocketAddr::new(sender_ip, u16::from_be_bytes([signed[24], signed[25]]));
    let epoch = u64::from_be_bytes(signed[26..34].try_into().expect("8 bytes"));
    let sequence = u64::from_be_bytes(signed[34..42].try_into().expect("8 bytes"));
    let mut flows = Vec::with_capacity(count);
    let mut malformed = 0;
    for entry in signed[HEADER_BYTES..].chunks_exact(ENTRY_BYTES) {
        match decode_entry(entry) {
            Some(flow) => flows.push(flow),
            None => malformed += 1,
        }
    }
    Ok(Message { sender, epoch, sequence, flows, malformed })
}

fn decode_entry(entry: &[u8]) -> Option<SyncedFlow> {
    let v4 = match entry[0] {
        4 => true,
        6 => false,
        _ => return None,
    };
    let protocol = entry[1];
    if protocol != lb_common::PROTO_TCP && protocol != lb_common::PROTO_UDP {
        return None;
    }
    let port = |at: usize| u16::from_be_bytes([entry[at], entry[at + 1]]);
    let client = SocketAddr::new(bytes_address(&entry[4..20], v4), port(36));
    let vip = SocketAddr::new(bytes_address(&entry[20..36], v4), port(38));
    let backend_bytes = &entry[40..56];
    // A backend may be of the other family (a tunnel service's 4in6, 6in4).
    let backend = bytes_address(backend_bytes, is_v4_mapped(backend_bytes));
    if client.port() == 0 || vip.ip().is_unspecified() || backend.is_unspecified() {
        return None;
    }
    Some(SyncedFlow { protocol, client, vip, backend })
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// IPv4 as `::ffff:a.b.c.d` (so that a sender or backend of either family
/// fits one field), IPv6 as is.
fn address_bytes(address: IpAddr) -> [u8; 16] {
    match address {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn is_v4_mapped(bytes: &[u8]) -> bool {
    bytes[..10].iter().all(|b| *b == 0) && bytes[10] == 0xff && bytes[11] == 0xff
}

fn bytes_address(bytes: &[u8], v4: bool) -> IpAddr {
    let octets: [u8; 16] = bytes.try_into().expect("16 bytes");
    if v4 {
        IpAddr::V4(Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(octets))
    }
}

/// Replay protection for one sender: its newest epoch, the highest
/// sequence seen in it, and which of the 64 below were seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    epoch: u64,
    highest: u64,
    /// Bit i: sequence `highest - i` was seen.
    seen: u64,
}

impl ReplayWindow {
    /// Accepts (and records) an (epoch, sequence) not seen before.
    pub fn accept(&mut self, epoch: u64, sequence: u64) -> bool {
        if epoch < self.epoch {
            return false;
        }
        if epoch > self.epoch || self.seen == 0 {
            *self = ReplayWindow { epoch, highest: sequence, seen: 1 };
            return true;
        }
        if sequence > self.highest {
            let shift = sequence - self.highest;
            self.seen = if shift >= REPLAY_WINDOW { 1 } else { (self.seen << shift) | 1 };
            self.highest = sequence;
            return true;
        }
        let age = self.highest - sequence;
        if age >= REPLAY_WINDOW || self.seen & (1 << age) != 0 {
            return false;
        }
        self.seen |= 1 << age;
        true
    }
}

/// The shared key from the contents of `[sync] key_file` (trailing newline
/// trimmed), or why it cannot be one.
pub fn key_from(contents: &[u8]) -> Result<Vec<u8>, String> {
    let key = contents.strip_suffix(b"\n").unwrap_or(contents);
    let key = key.strip_suffix(b"\r").unwrap_or(key);
    if key.len() < MIN_KEY_BYTES {
        return Err(format!("holds {} bytes; the key must have at least {MIN_KEY_BYTES}", key.len()));
    }
    Ok(key.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn flow(n: u16) -> SyncedFlow {
        SyncedFlow {
            protocol: lb_common::PROTO_TCP,
            client: format!("198.18.5.2:{}", 40000 + n).parse().unwrap(),
            vip: "198.18.0.100:80".parse().unwrap(),
            backend: "198.18.1.11".parse().unwrap(),
        }
    }

    fn sender() -> SocketAddr {
        "198.18.2.4:7600".parse().unwrap()
    }

    #[test]
    fn a_message_round_trips_with_both_families() {
        let v6 = SyncedFlow {
            protocol: lb_common::PROTO_UDP,
            client: "[2001:db8:5::2]:5353".parse().unwrap(),
            vip: "[2001:db8::100]:53".parse().unwrap(),
            backend: "198.18.3.21".parse().unwrap(),
        };
        let flows = [flow(1), v6, flow(2)];
        let bytes = encode(KEY, sender(), 7, 42, &flows);
        assert_eq!(bytes.len(), HEADER_BYTES + 3 * ENTRY_BYTES + TAG_BYTES);
        let message = decode(KEY, &bytes).unwrap();
        assert_eq!((message.sender, message.epoch, message.sequence), (sender(), 7, 42));
        assert_eq!(message.flows, flows);
        assert_eq!(message.malformed, 0);
        let full: Vec<_> = (0..MAX_ENTRIES as u16).map(flow).collect();
        let bytes = encode(KEY, "[2001:db8:2::4]:7600".parse().unwrap(), 1, 1, &full);
        assert!(bytes.len() + 48 <= 1500, "{} bytes do not fit an IPv6 datagram", bytes.len());
        assert_eq!(decode(KEY, &bytes).unwrap().flows.len(), MAX_ENTRIES);
    }

    #[test]
    fn a_wrong_key_or_any_altered_byte_is_unauthenticated() {
        let bytes = encode(KEY, sender(), 1, 1, &[flow(1)]);
        assert_eq!(decode(b"another key of thirty-two bytes!", &bytes), Err(Rejection::Unauthenticated));
        for at in 8..bytes.len() {
            let mut altered = bytes.clone();
            altered[at] ^= 0x01;
            assert_eq!(decode(KEY, &altered), Err(Rejection::Unauthenticated), "byte {at} altered");
        }
    }

    #[test]
    fn anything_else_is_malformed() {
        let bytes = encode(KEY, sender(), 1, 1, &[flow(1)]);
        for cut in [0, 10, HEADER_BYTES + TAG_BYTES - 1, bytes.len() - 1] {
            assert_eq!(decode(KEY, &bytes[..cut]), Err(Rejection::Malformed), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(KEY, &longer), Err(Rejection::Malformed));
        let mut wrong_magic = bytes.clone();
        wrong_magic[0] = b'Y';
        assert_eq!(decode(KEY, &wrong_magic), Err(Rejection::Malformed));
        let mut wrong_version = bytes;
        wrong_version[4] = 2;
        assert_eq!(decode(KEY, &wrong_version), Err(Rejection::Malformed));
    }

    #[test]
    fn authenticated_but_malformed_entries_are_skipped_and_counted() {
        let mut bad = flow(2);
        bad.protocol = 1; // ICMP has no flows to sync
        let bytes = encode(KEY, sender(), 1, 1, &[flow(1), bad]);
        let message = decode(KEY, &bytes).unwrap();
        assert_eq!((message.flows, message.malformed), (vec![flow(1)], 1));
    }

    #[test]
    fn the_replay_window_accepts_each_sequence_once_and_reorders_within_64() {
        let mut window = ReplayWindow::default();
        assert!(window.accept(5, 10));
        assert!(!window.accept(5, 10), "the same message twice");
        assert!(window.accept(5, 12));
        assert!(window.accept(5, 11), "late but within the window");
        assert!(!window.accept(5, 11));
        assert!(window.accept(5, 100));
        assert!(!window.accept(5, 12), "older than the window");
        assert!(window.accept(5, 40));
        assert!(!window.accept(4, 1000), "an older epoch (a replay of the sender's previous run)");
        assert!(window.accept(6, 1), "a restarted sender starts a new epoch");
        assert!(!window.accept(5, 101));
    }

    #[test]
    fn keys_are_trimmed_of_one_newline_and_must_be_32_bytes() {
        assert_eq!(key_from(b"0123456789abcdef0123456789abcdef\n").unwrap(), KEY);
        assert_eq!(key_from(KEY).unwrap(), KEY);
        let err = key_from(b"short\n").unwrap_err();
        assert!(err.contains("holds 5 bytes") && err.contains("at least 32"), "{err}");
    }
}
