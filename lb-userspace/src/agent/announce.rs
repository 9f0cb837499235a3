//! Route health injection: the agent's side. Each reconcile decides which
//! VIPs this node announces; the route writer makes the table match.

use super::*;
use crate::announce;

impl Agent {
    /// Decides every VIP's announcement from the desired state and hands
    /// the announced ones to the route writer.
    pub(super) fn update_announcements(&mut self) {
        let next = announce::plan(&self.desired, self.attached, self.node);
        for vip in &next {
            let before = self.announcements.iter().find(|a| a.vip == vip.vip);
            if before.is_none_or(|b| b.announced != vip.announced) && self.announcer.is_some() {
                let verb = if vip.announced { "announced" } else { "withdrawn" };
                log::warn!("VIP {} {verb}: {}", vip.vip, vip.reason);
            }
        }
        if let Some(announcer) = self.announcer.as_ref().filter(|_| self.attached) {
            announcer.announce(next.iter().filter(|a| a.announced).map(|a| a.vip).collect());
        }
        self.announcements = next;
    }

    /// `xdplb node drain|enable`.
    pub(super) fn set_node_state(&mut self, node: NodeState) -> Response {
        let Some(announcer) = &self.announcer else {
            return Response::error(
                "this node announces no VIPs ([agent] announce_table is not set): nothing to drain or enable",
            );
        };
        let table = announcer.table();
        if let Err(err) = pins::set_node_state(&self.config.agent.pin_root(), node) {
            return Response::error(format!("recording the node's state: {err:#}"));
        }
        let changed = self.node != node;
        self.node = node;
        self.update_announcements();
        let message = match (node, changed) {
            (NodeState::Drained, true) => format!(
                "node drained: every VIP is withdrawn from table {table}; packets that still arrive are \
                 forwarded, so established flows finish"
            ),
            (NodeState::Active, true) => format!("node enabled: VIPs that qualify are announced in table {table}"),
            (_, false) => format!("the node is already {}", node.name()),
        };
        log::info!("{message}");
        Response::done(message)
    }
}
