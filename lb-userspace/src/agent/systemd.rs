//! Telling systemd (Type=notify) where the agent is: READY=1 only once the
//! program is attached and the maps are programmed, RELOADING=1 around a
//! reload, STOPPING=1 at exit. Without NOTIFY_SOCKET these do nothing.

use sd_notify::NotifyState;

pub(super) fn ready(status: &str) {
    tell(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub(super) fn reloading() {
    tell(&[NotifyState::Reloading, NotifyState::MonotonicUsec(monotonic_usec())]);
}

pub(super) fn stopping() {
    tell(&[NotifyState::Stopping]);
}

fn tell(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(false, states) {
        log::warn!("telling systemd the agent's state: {err}");
    }
}

/// CLOCK_MONOTONIC in µs, which RELOADING=1 carries (systemd ≥ 253).
fn monotonic_usec() -> i128 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| t.tv_sec() as i128 * 1_000_000 + t.tv_nsec() as i128 / 1000)
}
