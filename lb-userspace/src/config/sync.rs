//! `[sync]`: connection-table sync with the other LB nodes.

use std::{net::SocketAddr, ops::Range, path::PathBuf};

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// The UDP address this node receives its peers' flows on (and sends from).
    pub listen: Spanned<SocketAddr>,
    /// The other nodes' `listen` addresses.
    pub peers: Spanned<Vec<SocketAddr>>,
    /// The shared key (the file's contents, trailing newline trimmed; at
    /// least 32 bytes; mode 0600).
    pub key_file: Spanned<PathBuf>,
}

impl SyncConfig {
    pub(super) fn validate(&self) -> Result<(), (Range<usize>, String)> {
        let listen = *self.listen.get_ref();
        if listen.port() == 0 || listen.ip().is_unspecified() {
            return Err((
                self.listen.span(),
                format!("[sync] listen {listen}: give the node's own address and a port"),
            ));
        }
        let peers = self.peers.get_ref();
        if peers.is_empty() {
            return Err((self.peers.span(), "[sync] peers lists no peer".into()));
        }
        for peer in peers {
            let problem = if peer.is_ipv4() != listen.is_ipv4() {
                Some("is not of listen's address family")
            } else if *peer == listen {
                Some("is this node's own listen address")
            } else if peer.port() == 0 || peer.ip().is_unspecified() || peer.ip().is_multicast() {
                Some("is not a unicast address and port")
            } else if peers.iter().filter(|p| *p == peer).count() > 1 {
                Some("is listed twice")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err((self.peers.span(), format!("[sync] peer {peer} {problem}")));
            }
        }
        Ok(())
    }
}
