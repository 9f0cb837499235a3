//! Connection-table sync: every node tells its peers the flows it pins
//! (five-tuple → backend address), and adopts theirs, so that a flow that
//! ECMP moves to another node keeps its backend even after the backend set
//! changed (when Maglev alone would move about 1/N of the flows).
//!
//! The data plane reports pinned flows in the `FLOW_EVENTS` ring buffer;
//! `FlowEventReader` drains it; the agent translates backend ids into
//! addresses and `Sync` sends them in authenticated UDP messages
//! (`message`). Received flows go back to the agent, which turns them into
//! map writes for its one writer: nothing here writes a map.

pub mod message;

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{MapData, RingBuf};
use lb_common::FlowEvent;
use serde::{Deserialize, Serialize};
use tokio::{net::UdpSocket, sync::mpsc, task::JoinHandle};

use self::message::{Rejection, ReplayWindow, SyncedFlow};
use crate::config::SyncConfig;

/// How often a rejected message is logged at most (they are all counted).
const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// `[sync]` with its key read and checked.
#[derive(Clone)]
pub struct SyncSettings {
    pub listen: SocketAddr,
    pub peers: Vec<SocketAddr>,
    key: Vec<u8>,
}

impl SyncSettings {
    /// Reads `key_file`: refused when group or others may read it, or when
    /// it holds less than 32 bytes.
    pub fn load(config: &SyncConfig) -> Result<Self> {
        let path = config.key_file.get_ref();
        let metadata = std::fs::metadata(path).with_context(|| format!("[sync] key_file {}", path.display()))?;
        let mode = metadata.permissions().mode();
        if mode & 0o044 != 0 {
            bail!(
                "[sync] key_file {} is readable by group or others (mode {:o}): the key lets anyone who reads it \
                 steer traffic; chmod 600 it",
                path.display(),
                mode & 0o777
            );
        }
        let contents = std::fs::read(path).with_context(|| format!("[sync] key_file {}", path.display()))?;
        let key =
            message::key_from(&contents).map_err(|e| anyhow::anyhow!("[sync] key_file {}: {e}", path.display()))?;
        Ok(Self { listen: *config.listen.get_ref(), peers: config.peers.get_ref().clone(), key })
    }
}

/// What `status` and the metrics show of sync.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub listen: String,
    pub peers: Vec<String>,
    /// Flows sent to the peers (each counted once, however many peers).
    pub sent_flows: u64,
    /// Messages that could not be sent (socket buffer full, no route).
    pub send_errors: u64,
    /// Flows in the peers' authenticated messages.
    pub received_flows: u64,
    /// Of those, flows written to the connection table (none was there).
    pub adopted_flows: u64,
    /// Received flows whose VIP or backend this node does not have.
    pub unknown_flows: u64,
    /// Datagrams dropped: malformed, unauthenticated (wrong key, altered),
    /// replayed, or from an address that is not a peer.
    pub rejected_malformed: u64,
    pub rejected_unauthenticated: u64,
    pub rejected_replayed: u64,
    pub rejected_unknown_peer: u64,
    /// Pinned flows the data plane could not report (its ring was full).
    pub events_lost: u64,
}

#[derive(Default)]
struct Counters {
    received_flows: AtomicU64,
    rejected: [AtomicU64; 3],
    unknown_peer: AtomicU64,
}

/// The node's side of sync: the socket, the sender's sequence, counters.
pub struct Sync {
    settings: SyncSettings,
    socket: Arc<UdpSocket>,
    epoch: u64,
    sequence: u64,
    sent_flows: u64,
    send_errors: u64,
    pub adopted_flows: u64,
    pub unknown_flows: u64,
    counters: Arc<Counters>,
    receiver: JoinHandle<()>,
}

impl Sync {
    /// Binds `listen` and starts receiving: authenticated, fresh flows from
    /// the peers arrive on `received`.
    pub async fn start(settings: SyncSettings, received: mpsc::UnboundedSender<Vec<SyncedFlow>>) -> Result<Self> {
        let socket = UdpSocket::bind(settings.listen)
            .await
            .with_context(|| format!("[sync] listen {}: binding", settings.listen))?;
        let socket = Arc::new(socket);
        let counters = Arc::new(Counters::default());
        // Nanoseconds since 1970 at start: a restarted node's messages are
        // newer than all its earlier ones (with a clock that does not go back).
        let epoch =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
        let receiver = tokio::spawn(receive(socket.clone(), settings.clone(), counters.clone(), received));
        log::info!("connection-table sync on {} with {} peer(s)", settings.listen, settings.peers.len());
        Ok(Self {
            settings,
            socket,
            epoch,
            sequence: 0,
            sent_flows: 0,
            send_errors: 0,
            adopted_flows: 0,
            unknown_flows: 0,
            counters,
            receiver,
        })
    }

    /// Sends `flows` to every peer, `MAX_ENTRIES` per message. Never blocks:
    /// a message the socket cannot take now is counted and dropped.
    pub fn send(&mut self, flows: &[SyncedFlow]) {
        for chunk in flows.chunks(message::MAX_ENTRIES) {
            self.sequence += 1;
            let bytes = message::encode(&self.settings.key, self.settings.listen, self.epoch, self.sequence, chunk);
            for peer in &self.settings.peers {
                if let Err(err) = self.socket.try_send_to(&bytes, *peer) {
                    self.send_errors += 1;
                    log::debug!("[sync] sending to {peer}: {err}");
                }
            }
        }
        self.sent_flows += flows.len() as u64;
    }

    pub fn status(&self, events_lost: u64) -> SyncStatus {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SyncStatus {
            listen: self.settings.listen.to_string(),
            peers: self.settings.peers.iter().map(|p| p.to_string()).collect(),
            sent_flows: self.sent_flows,
            send_errors: self.send_errors,
            received_flows: load(&self.counters.received_flows),
            adopted_flows: self.adopted_flows,
            unknown_flows: self.unknown_flows,
            rejected_malformed: load(&self.counters.rejected[0]),
            rejected_unauthenticated: load(&self.counters.rejected[1]),
            rejected_replayed: load(&self.counters.rejected[2]),
            rejected_unknown_peer: load(&self.counters.unknown_peer),
            events_lost,
        }
    }
}

impl Drop for Sync {
    fn drop(&mut self) {
        self.receiver.abort();
    }
}

/// The receive loop: drops (and counts) whatever is not an authenticated,
/// fresh message from a configured peer; hands the rest to the agent.
async fn receive(
    socket: Arc<UdpSocket>,
    settings: SyncSettings,
    counters: Arc<Counters>,
    received: mpsc::UnboundedSender<Vec<SyncedFlow>>,
) {
    let mut windows: HashMap<SocketAddr, ReplayWindow> = HashMap::new();
    let mut buffer = vec![0u8; 2048];
    let mut last_logged: Option<Instant> = None;
    let mut log_rejection = |from: SocketAddr, why: &str| {
        if last_logged.is_none_or(|t| t.elapsed() >= REJECTION_LOG_INTERVAL) {
            last_logged = Some(Instant::now());
            log::warn!("[sync] dropped a message from {from}: {why} (further ones are counted, logged every 10 s)");
        }
    };
    loop {
        let (length, from) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(err) => {
                log::warn!("[sync] receiving: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !settings.peers.iter().any(|p| p.ip() == from.ip()) {
            counters.unknown_peer.fetch_add(1, Ordering::Relaxed);
            log_rejection(from, "not a configured peer");
            continue;
        }
        let message = match message::decode(&settings.key, &buffer[..length]) {
            Ok(message) if settings.peers.contains(&message.sender) => message,
            Ok(message) => {
                counters.unknown_peer.fetch_add(1, Ordering::Relaxed);
                log_rejection(from, &format!("its sender {} is not a configured peer", message.sender));
                continue;
            }
            Err(rejection) => {
                counters.rejected[rejection_slot(rejection)].fetch_add(1, Ordering::Relaxed);
                log_rejection(from, rejection.name());
                continue;
            }
        };
        if !windows.entry(message.sender).or_default().accept(message.epoch, message.sequence) {
            counters.rejected[rejection_slot(Rejection::Replayed)].fetch_add(1, Ordering::Relaxed);
            log_rejection(from, "replayed");
            continue;
        }
        if message.malformed > 0 {
            counters.rejected[rejection_slot(Rejection::Malformed)].fetch_add(1, Ordering::Relaxed);
        }
        counters.received_flows.fetch_add(message.flows.len() as u64, Ordering::Relaxed);
        if received.send(message.flows).is_err() {
            return;
        }
    }
}

fn rejection_slot(rejection: Rejection) -> usize {
    Rejection::ALL.iter().position(|r| *r == rejection).expect("listed")
}

/// Drains the data plane's `FLOW_EVENTS` ring every `FLOW_EVENTS_POLL_MS`
/// (the program submits without waking readers: cheaper per flow), in
/// batches.
pub fn read_flow_events(mut ring: RingBuf<MapData>, events: mpsc::UnboundedSender<Vec<FlowEvent>>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut poll = tokio::time::interval(Duration::from_millis(lb_common::FLOW_EVENTS_POLL_MS));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            poll.tick().await;
            let mut batch = Vec::new();
            while let Some(record) = ring.next() {
                if record.len() >= std::mem::size_of::<FlowEvent>() {
                    // SAFETY: the record holds a FlowEvent, written by the
                    // program with this layout; read unaligned from bytes.
                    batch.push(unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<FlowEvent>()) });
                }
            }
            if !batch.is_empty() && events.send(batch).is_err() {
                return;
            }
        }
    })
}
