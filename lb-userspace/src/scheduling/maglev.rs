//! Weighted Maglev lookup table (Eisenbud et al., NSDI 2016, §3.4), with the
//! weighted fill used by Katran: in each round every backend earns its weight
//! in credit and claims one slot of its preference list per `max_weight` of
//! credit, so slot shares follow weights while each backend still fills its
//! own preference order (which is what keeps disruption low).
//!
//! Backends are identified by a stable hash of their address, never by their
//! position or id, so every LB node computes the same table from the same
//! backend set, in any order.

use lb_common::NO_BACKEND;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Value written into the table (the backend's slot id).
    pub id: u32,
    /// Stable identity, e.g. `stable_hash(address bytes)`.
    pub identity: u64,
    pub weight: u32,
}

/// Builds the table of `size` slots (a prime). Backends with weight 0 get no
/// slot; with no weighted backend every slot is `NO_BACKEND`.
pub fn build_table(backends: &[MaglevBackend], size: u32) -> Vec<u32> {
    let mut active: Vec<MaglevBackend> = backends.iter().copied().filter(|b| b.weight > 0).collect();
    let mut table = vec![NO_BACKEND; size as usize];
    if active.is_empty() {
        return table;
    }
    active.sort_by_key(|b| (b.identity, b.id));
    let m = size as u64;
    let prefs: Vec<(u64, u64)> = active
        .iter()
        .map(|b| {
            let offset = splitmix64(b.identity ^ 0x6f66_6673_6574) % m;
            let skip = splitmix64(b.identity ^ 0x736b_6970) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_weight = active.iter().map(|b| b.weight).max().unwrap_or(1) as u64;
    let mut next = vec![0u64; active.len()];
    let mut credit = vec![0u64; active.len()];
    let mut taken = vec![false; size as usize];
    let mut filled = 0u64;
    loop {
        for (i, backend) in active.iter().enumerate() {
            credit[i] += backend.weight as u64;
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            let (offset, skip) = prefs[i];
            let slot = loop {
                let candidate = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if !taken[candidate] {
                    break candidate;
                }
            };
            taken[slot] = true;
            table[slot] = backend.id;
            filled += 1;
            if filled == m {
                return table;
            }
        }
    }
}

/// A hash of bytes that is the same on every machine and Rust version
/// (FNV-1a folded through splitmix64).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(h)
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::Ipv4Addr};

    use super::*;

    const SIZE: u32 = 65537;

    fn backends(n: u32, weight: impl Fn(u32) -> u32) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| {
                let addr = Ipv4Addr::from(0xc612_0000 + i);
                MaglevBackend { id: i + 1, identity: stable_hash(&addr.octets()), weight: weight(i) }
            })
            .collect()
    }

    fn shares(table: &[u32]) -> HashMap<u32, u64> {
        let mut counts = HashMap::new();
        for id in table {
            *counts.entry(*id).or_insert(0) += 1;
        }
        counts
    }

    /// Each backend's slot count is within 1% of its weighted share, or one
    /// slot where 1% is less than a slot (shares are whole slots).
    fn assert_shares_follow_weights(set: &[MaglevBackend]) {
        let table = build_table(set, SIZE);
        assert!(!table.contains(&NO_BACKEND));
        let counts = shares(&table);
        let total_weight: u64 = set.iter().map(|b| b.weight as u64).sum();
        for b in set {
            let expected = SIZE as f64 * b.weight as f64 / total_weight as f64;
            let got = *counts.get(&b.id).unwrap_or(&0) as f64;
            let tolerance = (expected * 0.01).max(1.0);
            assert!(
                (got - expected).abs() <= tolerance,
                "n={} backend {} weight {}: {got} slots, expected {expected:.1} ± {tolerance:.1}",
                set.len(),
                b.id,
                b.weight
            );
        }
    }

    #[test]
    fn equal_weights_share_equally() {
        for n in [3, 10, 100, 1000] {
            assert_shares_follow_weights(&backends(n, |_| 1));
        }
    }

    #[test]
    fn unequal_weights_share_by_weight() {
        for n in [3, 10, 100, 1000] {
            assert_shares_follow_weights(&backends(n, |i| 1 + i % 3));
        }
    }

    #[test]
    fn removing_one_backend_moves_few_other_slots() {
        for n in [3, 10, 100, 1000] {
            let set = backends(n, |_| 1);
            let before = build_table(&set, SIZE);
            let removed = set[n as usize / 2].id;
            let rest: Vec<_> = set.iter().copied().filter(|b| b.id != removed).collect();
            let after = build_table(&rest, SIZE);
            let moved = before.iter().zip(&after).filter(|(b, a)| **b != removed && b != a).count() as f64;
            let limit = SIZE as f64 * (1.0 / n as f64 + 0.01);
            assert!(moved <= limit, "n={n}: {moved} of the others' slots moved, limit {limit:.0}");
        }
    }

    #[test]
    fn table_is_independent_of_backend_order() {
        let set = backends(100, |i| 1 + i % 4);
        let mut reversed = set.clone();
        reversed.reverse();
        let mut shuffled = set.clone();
        shuffled.rotate_left(37);
        let table = build_table(&set, SIZE);
        assert_eq!(table, build_table(&reversed, SIZE));
        assert_eq!(table, build_table(&shuffled, SIZE));
    }

    #[test]
    fn zero_weight_and_empty_sets() {
        assert!(build_table(&[], 251).iter().all(|id| *id == NO_BACKEND));
        let set = backends(3, |i| if i == 0 { 0 } else { 1 });
        let table = build_table(&set, 251);
        assert!(!table.contains(&set[0].id));
        assert!(!table.contains(&NO_BACKEND));
    }

    #[test]
    fn stable_hash_is_stable() {
        // Pinned values (computed independently): the table must be the same
        // on every node and every build, so this hash may never change.
        assert_eq!(stable_hash(b""), 0xc381_7c01_6ba4_ff30);
        assert_eq!(stable_hash(&[198, 18, 1, 11]), 0xd897_3b0b_e09b_3ad9);
        assert_ne!(stable_hash(&[198, 18, 1, 11]), stable_hash(&[198, 18, 1, 12]));
    }
}
