//! What each scheduler needs computed in userspace (pure, unit-tested):
//! the smooth weighted slot sequence of (weighted) round robin, the
//! candidate list of least_conn, and least_response_time's latency-derived
//! weights.

pub mod maglev;

use lb_common::{
    EWMA_ALPHA, LATENCY_DAMPING as DAMPING, LATENCY_DEAD_BAND as DEAD_BAND, LATENCY_FLOOR_MS, LeastConnCandidates,
    MAX_WEIGHT,
};

/// Smooth weighted round robin (nginx's algorithm): every step each backend
/// gains its weight, the richest is picked and pays the total. Each backend
/// appears exactly `weight` times per cycle, spread as evenly as possible,
/// never in long runs. Weights are divided by their gcd, and scaled down
/// (ratios kept as far as integers allow) if a cycle would exceed `max_len`.
/// Input order does not matter: backends are ordered by `identity`.
pub fn smooth_sequence(backends: &[(u32, u64, u32)], max_len: usize) -> Vec<u32> {
    let mut members: Vec<(u32, u64, u64)> =
        backends.iter().filter(|(_, _, w)| *w > 0).map(|(id, identity, w)| (*id, *identity, *w as u64)).collect();
    if members.is_empty() {
        return Vec::new();
    }
    members.sort_by_key(|(id, identity, _)| (*identity, *id));
    let divisor = members.iter().fold(0, |g, (_, _, w)| gcd(g, *w));
    for m in &mut members {
        m.2 /= divisor;
    }
    let total: u64 = members.iter().map(|m| m.2).sum();
    if total > max_len as u64 {
        for m in &mut members {
            m.2 = ((m.2 * max_len as u64) / total).max(1);
        }
    }
    let total: i64 = members.iter().map(|m| m.2 as i64).sum();
    let mut current = vec![0i64; members.len()];
    let mut sequence = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, m) in current.iter_mut().zip(&members) {
            *c += m.2 as i64;
        }
        let (best, _) =
            current.iter().enumerate().max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i))).expect("non-empty");
        current[best] -= total;
        sequence.push(members[best].0);
    }
    sequence
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// least_conn's candidates: every weighted backend as (id, weight), in a
/// stable order (the data plane breaks ties by rotating where its scan
/// starts).
pub fn least_conn_candidates(backends: &[(u32, u64, u32)]) -> Vec<(u32, u32)> {
    let mut members: Vec<_> = backends.iter().filter(|(_, _, w)| *w > 0).collect();
    members.sort_by_key(|(id, identity, _)| (*identity, *id));
    members.into_iter().map(|(id, _, weight)| (*id, *weight)).collect()
}

/// The `LEAST_CONN_CANDIDATES` entry of a least_conn service: its first
/// `MAX_LEAST_CONN_CANDIDATES` candidates (`least_conn_candidates`), each
/// with its weight (capped at `u16::MAX`, as `BACKENDS` holds it).
pub fn least_conn_block(candidates: &[(u32, u32)]) -> LeastConnCandidates {
    let mut block = LeastConnCandidates::default();
    for (i, (id, weight)) in candidates.iter().take(block.ids.len()).enumerate() {
        block.ids[i] = u16::try_from(*id).unwrap_or(0);
        block.weights[i] = if block.ids[i] == 0 { 0 } else { (*weight).min(u16::MAX as u32) as u16 };
    }
    block
}

pub fn identity(address: std::net::IpAddr) -> u64 {
    match address {
        std::net::IpAddr::V4(a) => maglev::stable_hash(&a.octets()),
        std::net::IpAddr::V6(a) => maglev::stable_hash(&a.octets()),
    }
}

/// Exponentially weighted mean of a backend's response time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Ewma {
    pub mean: Option<f64>,
}

impl Ewma {
    pub fn observe(&mut self, sample: f64) {
        self.mean = Some(match self.mean {
            None => sample,
            Some(mean) => mean + EWMA_ALPHA * (sample - mean),
        });
    }
}

/// least_response_time: the weights to use now, from the configured weights
/// and each backend's mean response time. A backend's target is its
/// configured weight scaled by (fastest mean / its mean), so a backend twice
/// as slow as the fastest gets half its configured share; `previous` moves
/// toward the target with damping. Backends without a measurement keep
/// their configured weight.
pub fn response_time_weights(configured: &[u32], mean_ms: &[Option<f64>], previous: &[u32]) -> Vec<u32> {
    let floor = |m: f64| m.max(LATENCY_FLOOR_MS);
    let fastest = mean_ms.iter().flatten().map(|m| floor(*m)).fold(f64::INFINITY, f64::min);
    let max_configured = configured.iter().copied().max().unwrap_or(1).max(1) as f64;
    configured
        .iter()
        .zip(mean_ms)
        .zip(previous)
        .map(|((&weight, mean), &prev)| {
            if weight == 0 {
                return 0;
            }
            // Scale so that the fastest backend has up to LATENCY_WEIGHT_SCALE×
            // its configured weight (room for fine ratios) while every weight
            // stays ≤ MAX_WEIGHT.
            let unit = (MAX_WEIGHT as f64 / max_configured).min(lb_common::LATENCY_WEIGHT_SCALE);
            let target = match mean {
                Some(m) if fastest.is_finite() => weight as f64 * unit * fastest / floor(*m),
                _ => weight as f64 * unit,
            };
            let prev = if prev == 0 { target } else { prev as f64 };
            let next = if (target - prev).abs() <= DEAD_BAND * prev { prev } else { prev + DAMPING * (target - prev) };
            (next.round() as u32).clamp(1, MAX_WEIGHT)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(weights: &[u32]) -> Vec<(u32, u64, u32)> {
        weights.iter().enumerate().map(|(i, w)| (i as u32 + 1, 1000 + i as u64, *w)).collect()
    }

    fn count(seq: &[u32], id: u32) -> usize {
        seq.iter().filter(|x| **x == id).count()
    }

    #[test]
    fn sequence_has_exact_ratios_per_cycle() {
        let seq = smooth_sequence(&members(&[1, 2, 3]), 65537);
        assert_eq!(seq.len(), 6);
        assert_eq!([count(&seq, 1), count(&seq, 2), count(&seq, 3)], [1, 2, 3]);
        // gcd reduction: 10:20:30 is the same cycle.
        assert_eq!(smooth_sequence(&members(&[10, 20, 30]), 65537), seq);
        // Plain round robin: each once.
        let rr = smooth_sequence(&members(&[1, 1, 1]), 65537);
        assert_eq!(rr, [1, 2, 3]);
    }

    /// Smoothness, as measured for nginx's algorithm over thousands of
    /// random weight sets (2 to 8 backends): every prefix of the sequence is
    /// within 1.05 picks of each backend's ideal share, and a backend holding
    /// at most half the total weight never gets more than 2 picks in a row.
    #[test]
    fn sequence_is_smooth() {
        let sets: [&[u32]; 6] =
            [&[1, 2, 3], &[5, 1, 1], &[7, 3], &[1, 1, 1, 1, 9], &[97, 89, 13], &[243, 298, 34, 7, 241, 133]];
        for weights in sets {
            let seq = smooth_sequence(&members(weights), 65537);
            let total: u32 = weights.iter().sum();
            for (i, &w) in weights.iter().enumerate() {
                let id = i as u32 + 1;
                let mut seen = 0.0;
                for (k, x) in seq.iter().enumerate() {
                    if *x == id {
                        seen += 1.0;
                    }
                    let ideal = (k + 1) as f64 * w as f64 / total as f64;
                    assert!(
                        (seen - ideal).abs() <= 1.1,
                        "{weights:?}: backend {id} after {} picks: {seen} vs {ideal:.2}",
                        k + 1
                    );
                }
                if 2 * w <= total {
                    // Cyclic: the sequence repeats, so runs may wrap around.
                    let twice = [seq.clone(), seq.clone()].concat();
                    let longest =
                        twice.chunk_by(|a, b| a == b).filter(|run| run[0] == id).map(<[u32]>::len).max().unwrap_or(0);
                    assert!(longest <= 2, "{weights:?}: run of {longest} for backend {id}");
                }
            }
        }
    }

    #[test]
    fn sequence_is_capped_and_ignores_zero_weights() {
        let seq = smooth_sequence(&members(&[1000, 999, 0]), 100);
        assert!(seq.len() <= 100 && !seq.contains(&3));
        assert!(count(&seq, 1) >= count(&seq, 2));
        assert!(smooth_sequence(&members(&[0, 0]), 100).is_empty());
        // Order of input does not matter.
        let mut reversed = members(&[1, 2, 3]);
        reversed.reverse();
        assert_eq!(smooth_sequence(&reversed, 100), smooth_sequence(&members(&[1, 2, 3]), 100));
    }

    #[test]
    fn least_conn_candidates_are_weighted_backends_in_stable_order() {
        let mut m = members(&[1, 0, 3]);
        m.reverse();
        assert_eq!(least_conn_candidates(&m), [(1, 1), (3, 3)]);
    }

    #[test]
    fn the_least_conn_block_pairs_each_candidate_with_its_weight() {
        let block = least_conn_block(&[(7, 70), (3, 30), (9, 70_000)]);
        assert_eq!(block.ids[..4], [7, 3, 9, 0]);
        // Capped as `BACKENDS` holds weights.
        assert_eq!(block.weights[..4], [70, 30, u16::MAX, 0]);
        let many: Vec<(u32, u32)> = (1..=40).map(|id| (id, 1)).collect();
        let block = least_conn_block(&many);
        assert_eq!(block.ids.len(), lb_common::MAX_LEAST_CONN_CANDIDATES as usize);
        assert_eq!((block.ids[31], block.weights[31]), (32, 1));
    }

    #[test]
    fn ewma_follows_samples() {
        let mut e = Ewma::default();
        e.observe(10.0);
        assert_eq!(e.mean, Some(10.0));
        e.observe(20.0);
        assert!((e.mean.unwrap() - 13.0).abs() < 1e-9);
        for _ in 0..50 {
            e.observe(50.0);
        }
        assert!((e.mean.unwrap() - 50.0).abs() < 0.01);
    }

    #[test]
    fn slow_backends_lose_weight_gradually_and_settle() {
        let configured = [1, 1, 1];
        let means = [Some(1.0), Some(1.2), Some(51.0)];
        let mut weights = vec![0, 0, 0];
        let mut history = Vec::new();
        for _ in 0..12 {
            weights = response_time_weights(&configured, &means, &weights);
            history.push(weights.clone());
        }
        // The first round starts at the targets, then stays put.
        assert_eq!(history[0], history[11], "{history:?}");
        let (fast, slow) = (weights[0], weights[2]);
        assert!(slow * 20 < fast, "slow {slow} vs fast {fast}");
        // 1.0 and 1.2 ms differ by less than the dead band: equal weights.
        assert!(weights[0].abs_diff(weights[1]) <= weights[0] / 5, "{weights:?}");
    }

    #[test]
    fn damping_moves_halfway_and_never_overshoots() {
        let configured = [1, 1];
        // Backend 2 becomes 4× slower: its target is a quarter of its weight.
        let mut weights = vec![100, 100];
        let means = [Some(2.0), Some(8.0)];
        let mut path = Vec::new();
        for _ in 0..8 {
            weights = response_time_weights(&configured, &means, &weights);
            path.push(weights[1]);
        }
        assert_eq!(path[0], 63, "first step halfway from 100 to 25: {path:?}");
        assert!(path.windows(2).all(|w| w[1] <= w[0]), "not monotonic: {path:?}");
        assert!(*path.last().unwrap() >= 25, "overshot: {path:?}");
        assert!(*path.last().unwrap() <= 25 + 3, "did not settle near 25: {path:?}");
        assert_eq!(weights[0], 100);
    }

    #[test]
    fn unmeasured_backends_keep_their_configured_share() {
        let w = response_time_weights(&[2, 1], &[None, Some(3.0)], &[0, 0]);
        assert_eq!(w[0], 2 * w[1]);
    }
}
