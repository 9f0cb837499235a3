//! xdplb agent library. Data flows one way: `config` (and the CLI through
//! `control`, and health results) change the desired state in `state`; the
//! planner in `dataplane` turns it into map writes; the writer applies them;
//! `announce` turns it into the routes a BGP speaker exports.
//! The `xdplb` binary is a thin CLI over it; tests use it directly.
pub mod agent;
pub mod announce;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod decap;
pub mod discovery;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod netlink;
pub mod scheduling;
pub mod state;
pub mod sync;
