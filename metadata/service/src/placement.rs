//! Where a new volume goes: the pool with the most room among the up nodes
//! that satisfy the request's topology and the tier's media, with CSI's
//! preferred topologies tried first. Pure: the service feeds it what it knows.

use std::collections::BTreeMap;

/// One pool as placement sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub node: String,
    pub pool_id: String,
    pub up: bool,
    pub labels: BTreeMap<String, String>,
    pub media: String,
    pub total_bytes: u64,
    /// Sum of the sizes of the volumes the catalog has on it.
    pub provisioned_bytes: u64,
    /// Blocks in use as the pool last reported (snapshots hold blocks too).
    pub used_bytes: u64,
}

impl Candidate {
    /// What may still be promised: thin volumes are counted at their full size,
    /// against the pool's size times the overcommit ratio, and never more than
    /// is physically free.
    pub fn available(&self, overcommit: f64) -> u64 {
        ((self.total_bytes as f64 * overcommit) as u64)
            .saturating_sub(self.provisioned_bytes)
            .min(self.total_bytes.saturating_sub(self.used_bytes))
    }
}

#[derive(Debug, Clone, Default)]
pub struct Request {
    pub size_bytes: u64,
    /// At least one must match (empty: any node).
    pub requisite: Vec<BTreeMap<String, String>>,
    /// Tried in order before other nodes.
    pub preferred: Vec<BTreeMap<String, String>>,
    /// Allowed pool media (empty: any).
    pub media: Vec<String>,
}

/// A node is in a segment when it carries every label of the segment.
pub fn in_segment(labels: &BTreeMap<String, String>, segment: &BTreeMap<String, String>) -> bool {
    segment.iter().all(|(k, v)| labels.get(k) == Some(v))
}

pub fn in_topology(
    labels: &BTreeMap<String, String>,
    requisite: &[BTreeMap<String, String>],
) -> bool {
    requisite.is_empty() || requisite.iter().any(|s| in_segment(labels, s))
}

pub fn media_allowed(media: &str, allowed: &[String]) -> bool {
    allowed.is_empty() || allowed.iter().any(|m| m == media)
}

/// A size exactly, in the largest binary unit that divides it: "4 GiB",
/// "1023 MiB", "12345 bytes". Where a size decides an answer, rounding it
/// would hide why ("1.0 GiB available" for a 1 GiB request that failed).
pub fn exact_size(b: u64) -> String {
    const UNITS: [(u64, &str); 5] = [
        (1 << 50, "PiB"),
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    match UNITS.iter().find(|(u, _)| b >= *u && b.is_multiple_of(*u)) {
        Some((u, name)) => format!("{} {name}", b / u),
        None => format!("{b} bytes"),
    }
}

/// The index of the chosen candidate, or why none fits, node by node.
pub fn choose(cands: &[Candidate], req: &Request, overcommit: f64) -> Result<usize, String> {
    if cands.is_empty() {
        return Err("no volume server has registered with the metadata service".into());
    }
    let mut reasons = Vec::new();
    let mut best: Option<(usize, usize, u64)> = None;
    for (i, c) in cands.iter().enumerate() {
        let avail = c.available(overcommit);
        let why = if !c.up {
            Some("down".to_string())
        } else if !in_topology(&c.labels, &req.requisite) {
            Some("outside the requested topology".to_string())
        } else if !media_allowed(&c.media, &req.media) {
            Some(format!(
                "pool media {:?} is not one the tier allows ({})",
                c.media,
                req.media.join(", ")
            ))
        } else if avail < req.size_bytes {
            Some(format!(
                "{} available, {} short",
                exact_size(avail),
                exact_size(req.size_bytes - avail)
            ))
        } else {
            None
        };
        if let Some(why) = why {
            reasons.push(format!("{}: {why}", c.node));
            continue;
        }
        let rank = req
            .preferred
            .iter()
            .position(|s| in_segment(&c.labels, s))
            .unwrap_or(req.preferred.len());
        let better = match best {
            None => true,
            Some((_, r, a)) => rank < r || (rank == r && avail > a),
        };
        if better {
            best = Some((i, rank, avail));
        }
    }
    best.map(|(i, _, _)| i).ok_or_else(|| {
        format!(
            "no pool can hold {} ({})",
            exact_size(req.size_bytes),
            reasons.join("; ")
        )
    })
}

/// `n` candidates on distinct nodes (and, with `spread`, distinct values of
/// that label), each the best of what the earlier picks leave; or why not,
/// node by node.
pub fn choose_n(
    cands: &[Candidate],
    req: &Request,
    overcommit: f64,
    n: usize,
    spread: Option<&str>,
) -> Result<Vec<usize>, String> {
    let mut chosen: Vec<usize> = Vec::with_capacity(n);
    while chosen.len() < n {
        let mut excluded = Vec::new();
        let allowed: Vec<usize> = (0..cands.len())
            .filter(|&i| {
                let c = &cands[i];
                if let Some(&k) = chosen.iter().find(|&&k| cands[k].node == c.node) {
                    excluded.push(format!("{}: holds copy {}", c.node, position(&chosen, k)));
                    return false;
                }
                if let Some(label) = spread {
                    let v = c.labels.get(label);
                    if let Some(&k) = chosen.iter().find(|&&k| cands[k].labels.get(label) == v) {
                        excluded.push(format!(
                            "{}: same {label} ({}) as copy {}",
                            c.node,
                            v.map_or("unset", String::as_str),
                            position(&chosen, k)
                        ));
                        return false;
                    }
                }
                true
            })
            .collect();
        let sub: Vec<Candidate> = allowed.iter().map(|&i| cands[i].clone()).collect();
        // With nothing left after earlier picks, the exclusions say why;
        // with nothing at all, `choose` does.
        let picked = if sub.is_empty() && !chosen.is_empty() {
            Err(String::new())
        } else {
            choose(&sub, req, overcommit)
        };
        match picked {
            Ok(j) => chosen.push(allowed[j]),
            Err(why) if n == 1 => return Err(why),
            Err(why) => {
                excluded.dedup();
                let mut parts = excluded;
                if !why.is_empty() {
                    parts.push(why);
                }
                return Err(format!(
                    "{n} copies need {n} nodes{}, each with room; found {}: {}",
                    spread.map_or(String::new(), |l| format!(" in distinct {l} values")),
                    chosen.len(),
                    parts.join("; ")
                ));
            }
        }
    }
    Ok(chosen)
}

/// Copy numbers as people count them (1-based).
fn position(chosen: &[usize], k: usize) -> usize {
    chosen.iter().position(|&c| c == k).map_or(0, |p| p + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn cand(node: &str, zone: &str, total: u64, provisioned: u64) -> Candidate {
        Candidate {
            node: node.into(),
            pool_id: format!("pool-{node}"),
            up: true,
            labels: BTreeMap::from([("zone".into(), zone.into())]),
            media: "file".into(),
            total_bytes: total,
            provisioned_bytes: provisioned,
            used_bytes: 0,
        }
    }

    fn seg(zone: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("zone".into(), zone.into())])
    }

    #[test]
    fn most_room_wins_and_repeated_placement_spreads_by_capacity() {
        let mut c = vec![
            cand("a", "z1", 4 * G, 0),
            cand("b", "z1", 2 * G, 0),
            cand("c", "z2", G, 0),
        ];
        let mut placed = [0; 3];
        for _ in 0..14 {
            let i = choose(
                &c,
                &Request {
                    size_bytes: G / 2,
                    ..Default::default()
                },
                1.0,
            )
            .expect("fits");
            c[i].provisioned_bytes += G / 2;
            placed[i] += 1;
        }
        // Seven GiB of pools hold fourteen halves, each pool filled.
        assert_eq!(placed, [8, 4, 2]);
        let e = choose(
            &c,
            &Request {
                size_bytes: 1,
                ..Default::default()
            },
            1.0,
        )
        .expect_err("full");
        assert!(e.contains("a: 0 bytes available, 1 bytes short"), "{e}");
        // The size that decides is exact: a pool 1 MiB short of a 1 GiB
        // volume says so (it used to say "1.0 GiB available").
        let short = [cand("n", "z1", G - (1 << 20), 0)];
        let e = choose(
            &short,
            &Request {
                size_bytes: G,
                ..Default::default()
            },
            1.0,
        )
        .expect_err("1 MiB short");
        assert_eq!(
            e,
            "no pool can hold 1 GiB (n: 1023 MiB available, 1 MiB short)"
        );
        assert_eq!(exact_size(4097), "4097 bytes");
        assert_eq!(exact_size(3 << 40), "3 TiB");
        // Overcommit lets thin volumes promise more than the disk.
        assert!(choose(
            &c,
            &Request {
                size_bytes: G,
                ..Default::default()
            },
            2.0
        )
        .is_ok());
    }

    #[test]
    fn topology_media_and_liveness_narrow_the_choice() {
        let mut c = vec![
            cand("a", "z1", 4 * G, 0),
            cand("b", "z2", 2 * G, 0),
            cand("c", "z2", G, 0),
        ];
        let req = Request {
            size_bytes: G,
            requisite: vec![seg("z2")],
            ..Default::default()
        };
        assert_eq!(choose(&c, &req, 1.0), Ok(1));
        c[1].up = false;
        assert_eq!(choose(&c, &req, 1.0), Ok(2));
        c[2].media = "hdd".into();
        let e = choose(
            &c,
            &Request {
                media: vec!["nvme".into()],
                ..req.clone()
            },
            1.0,
        )
        .expect_err("nothing");
        assert!(
            e.contains("a: outside") && e.contains("b: down") && e.contains("c: pool media"),
            "{e}"
        );
        // Preferred segments come first, even with less room.
        c[1].up = true;
        let pref = Request {
            size_bytes: G,
            preferred: vec![seg("z2")],
            ..Default::default()
        };
        assert_eq!(choose(&c, &pref, 1.0), Ok(1));
        assert!(choose(&[], &pref, 1.0)
            .expect_err("none")
            .contains("no volume server"));
    }

    #[test]
    fn copies_go_to_distinct_nodes_and_zones_or_say_why_not() {
        // Two pools on node a: copies still take distinct nodes.
        let mut a2 = cand("a", "z1", 8 * G, 0);
        a2.pool_id = "pool-a2".into();
        let c = vec![
            cand("a", "z1", 8 * G, 0),
            a2,
            cand("b", "z1", 4 * G, 0),
            cand("c", "z2", 2 * G, 0),
        ];
        let req = Request {
            size_bytes: G,
            ..Default::default()
        };
        let picked = choose_n(&c, &req, 1.0, 3, None).expect("three nodes");
        let nodes: Vec<&str> = picked.iter().map(|&i| c[i].node.as_str()).collect();
        assert_eq!(nodes, ["a", "b", "c"]);
        // Spread over zones: two zones hold two copies, not three.
        let two = choose_n(&c, &req, 1.0, 2, Some("zone")).expect("two zones");
        let zones: Vec<&str> = two.iter().map(|&i| c[i].labels["zone"].as_str()).collect();
        assert_eq!(zones, ["z1", "z2"]);
        let e = choose_n(&c, &req, 1.0, 3, Some("zone")).expect_err("two zones only");
        assert!(
            e.starts_with("3 copies need 3 nodes in distinct zone values"),
            "{e}"
        );
        assert!(e.contains("b: same zone (z1) as copy 1"), "{e}");
        assert!(e.contains("c: holds copy 2"), "{e}");
        // A node too full is named with its shortfall.
        let full = vec![cand("a", "z1", 4 * G, 0), cand("b", "z1", 4 * G, 4 * G)];
        let e = choose_n(&full, &req, 1.0, 2, None).expect_err("b is full");
        assert!(e.contains("a: holds copy 1"), "{e}");
        assert!(e.contains("b: 0 bytes available, 1 GiB short"), "{e}");
        // No node at all: said so, for one copy or three.
        for n in [1, 3] {
            let e = choose_n(&[], &req, 1.0, n, None).expect_err("no nodes");
            assert!(e.contains("no volume server has registered"), "{n}: {e}");
        }
    }
}
