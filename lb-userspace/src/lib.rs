//! xdplb agent library: configuration, Maglev, reconcile and the kernel edges.
//! The `xdplb` binary is a thin CLI over it; tests use it directly.
pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod netlink;
pub mod pins;
pub mod reconcile;
pub mod scheduling;
pub mod state;
