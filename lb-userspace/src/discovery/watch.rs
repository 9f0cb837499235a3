//! The agent's watch on the registry prefix: a snapshot, then a watch from
//! the next revision. After a disconnect it resumes from the last revision
//! it saw (nothing is missed, nothing polled); when that revision has been
//! compacted away it lists the prefix again and the agent diffs. Failures
//! are reported as `Event::Down` and retried with back-off; the agent keeps
//! its last known pools meanwhile.

use std::{convert::Infallible, time::Duration};

use anyhow::{Result, anyhow, bail};
use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::{sync::mpsc::UnboundedSender, task::JoinHandle, time::Instant};

use super::{Change, Event, etcd::EtcdSettings, etcd::within};

const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A watch that lived this long was healthy: the next failure starts the
/// back-off from the beginning.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Watches `prefix` until the receiver is dropped. `resume_after` is the
/// revision the agent's view is already at (from its cache), if any.
pub fn spawn(
    settings: EtcdSettings,
    prefix: String,
    resume_after: Option<i64>,
    events: UnboundedSender<Event>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut resume = resume_after;
        let mut backoff = BACKOFF_FIRST;
        loop {
            let started = Instant::now();
            let Err(err) = watch_once(&settings, &prefix, &mut resume, &events).await;
            if events.is_closed() {
                return;
            }
            if started.elapsed() >= HEALTHY_AFTER {
                backoff = BACKOFF_FIRST;
            }
            let _ = events.send(Event::Down { reason: format!("{err:#}; retrying in {backoff:?}") });
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    })
}

/// One connection: list if needed, then watch until something fails.
async fn watch_once(
    settings: &EtcdSettings,
    prefix: &str,
    resume: &mut Option<i64>,
    events: &UnboundedSender<Event>,
) -> Result<Infallible> {
    let mut client = settings.connect().await?;
    let send = |event: Event| events.send(event).map_err(|_| anyhow!("the agent is gone"));
    loop {
        let after = match *resume {
            Some(revision) => revision,
            None => {
                let listing = within("get", client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
                let revision = listing.header().map_or(0, |h| h.revision());
                let entries = listing.kvs().iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec())).collect();
                send(Event::Snapshot { entries, revision })?;
                *resume = Some(revision);
                revision
            }
        };
        let options = WatchOptions::new().with_prefix().with_start_revision(after + 1).with_progress_notify();
        let mut stream = within("watch", client.watch(prefix, Some(options))).await?;
        loop {
            let response = stream.message().await?.ok_or_else(|| anyhow!("etcd ended the watch stream"))?;
            if response.compact_revision() > 0 {
                log::warn!(
                    "discovery: revision {} was compacted (oldest kept {}); listing {prefix} again",
                    after + 1,
                    response.compact_revision()
                );
                *resume = None;
                break;
            }
            if response.canceled() {
                bail!("etcd cancelled the watch: {}", response.cancel_reason());
            }
            if response.created() {
                send(Event::Up)?;
            }
            let mut changes = Vec::new();
            let mut revision = *resume;
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                revision = Some(kv.mod_revision());
                changes.push(match event.event_type() {
                    EventType::Put => Change::Put { key: kv.key().to_vec(), value: kv.value().to_vec() },
                    EventType::Delete => Change::Delete { key: kv.key().to_vec() },
                });
            }
            if let Some(revision) = revision.filter(|_| !changes.is_empty()) {
                *resume = Some(revision);
                send(Event::Changes { changes, revision })?;
            } else if !response.created()
                && let Some(header) = response.header()
            {
                // A progress notification: everything up to it has been sent.
                *resume = Some(resume.unwrap_or(0).max(header.revision()));
            }
        }
    }
}
