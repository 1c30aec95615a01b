//! Which peer `weft rmpeer` means. Removing a peer writes a tombstone that
//! is never undone, so only a peer this node has heard of may be removed:
//! one in the topology, one owning ring space, or one removed already
//! (asking again is harmless). A mistyped name is refused with the close
//! matches, never turned into a tombstone for a peer that never was.

use weft_core::{PeerName, Router, Time};

/// A peer this node has heard of; the nickname is empty when it is known
/// only from the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownPeer {
    pub name: PeerName,
    pub nickname: String,
}

/// Most close matches named in an error.
const MAX_SUGGESTIONS: usize = 5;

/// Every peer `router` has heard of, by name, once each.
pub fn known_peers(router: &Router, now: Time) -> Vec<KnownPeer> {
    let mut known: Vec<KnownPeer> = router
        .status(now)
        .peers
        .into_iter()
        .map(|p| KnownPeer {
            name: p.name,
            nickname: p.nickname,
        })
        .collect();
    let ring = router.ipam().ring();
    let owners = ring.blocks().map(|b| b.label.owner);
    let removed = ring.tombstones().map(|(removed, _)| removed);
    for name in owners.chain(removed) {
        if !known.iter().any(|k| k.name == name) {
            known.push(KnownPeer {
                name,
                nickname: String::new(),
            });
        }
    }
    known
}

/// The peer `asked` names: a known peer's name, or the nickname of
/// exactly one known peer.
pub fn find(asked: &str, known: &[KnownPeer]) -> Result<PeerName, String> {
    let by_name = asked.parse::<PeerName>().ok();
    if let Some(peer) = known.iter().find(|k| Some(k.name) == by_name) {
        return Ok(peer.name);
    }
    let nicknamed: Vec<&KnownPeer> = known.iter().filter(|k| k.nickname == asked).collect();
    match nicknamed.as_slice() {
        [one] => Ok(one.name),
        [] => Err(unknown(asked, known)),
        several => Err(format!(
            "several peers are nicknamed {asked} ({}); give the peer name",
            several
                .iter()
                .map(|k| k.name.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn unknown(asked: &str, known: &[KnownPeer]) -> String {
    let close = close_matches(asked, known);
    let hint = match close.is_empty() {
        true => "no known peer name or nickname is close to it; see `weft status peers`".into(),
        false => format!("did you mean {}?", close.join(", ")),
    };
    format!(
        "no peer named {asked} is known to this node (removing one writes a permanent tombstone, so only known peers can be removed); {hint}"
    )
}

/// Known peers whose name or nickname is a few edits away from `asked`,
/// closest first, as `name (nickname)`.
fn close_matches(asked: &str, known: &[KnownPeer]) -> Vec<String> {
    let mut scored: Vec<(usize, String)> = known
        .iter()
        .filter_map(|k| {
            let name = k.name.to_string();
            let distance = edit_distance(asked, &name).min(match k.nickname.is_empty() {
                true => usize::MAX,
                false => edit_distance(asked, &k.nickname),
            });
            let label = match k.nickname.is_empty() {
                true => name,
                false => format!("{name} ({})", k.nickname),
            };
            (distance <= close_enough(asked)).then_some((distance, label))
        })
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(MAX_SUGGESTIONS)
        .map(|(_, label)| label)
        .collect()
}

/// A third of the length, at least two edits.
fn close_enough(asked: &str) -> usize {
    (asked.chars().count() / 3).max(2)
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitute.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> Vec<KnownPeer> {
        vec![
            KnownPeer {
                name: "3f2a:0c11:9b7e:44d0".parse().unwrap(),
                nickname: "node1".into(),
            },
            KnownPeer {
                name: "0000:0000:0000:0002".parse().unwrap(),
                nickname: "node2".into(),
            },
            KnownPeer {
                name: "00aa:0000:0000:0003".parse().unwrap(),
                nickname: String::new(),
            },
        ]
    }

    #[test]
    fn known_names_and_nicknames_are_found() {
        let known = peers();
        assert_eq!(find("node2", &known), Ok(known[1].name));
        assert_eq!(find("3f2a:0c11:9b7e:44d0", &known), Ok(known[0].name));
        assert_eq!(find("3f2a0c119b7e44d0", &known), Ok(known[0].name));
        assert_eq!(find("00aa:0000:0000:0003", &known), Ok(known[2].name));
    }

    #[test]
    fn a_mistyped_name_is_refused_with_close_matches() {
        let known = peers();
        let e = find("3f2a:0c11:9b7e:44d1", &known).unwrap_err();
        assert!(e.contains("no peer named 3f2a:0c11:9b7e:44d1"), "{e}");
        assert!(
            e.contains("did you mean 3f2a:0c11:9b7e:44d0 (node1)"),
            "{e}"
        );
        let e = find("nod2", &known).unwrap_err();
        assert!(
            e.contains("did you mean 0000:0000:0000:0002 (node2)"),
            "{e}"
        );
        let e = find("elsewhere-entirely", &known).unwrap_err();
        assert!(e.contains("see `weft status peers`"), "{e}");
    }

    #[test]
    fn a_nickname_shared_by_two_peers_needs_the_name() {
        let mut known = peers();
        known[1].nickname = "node1".into();
        let e = find("node1", &known).unwrap_err();
        assert!(e.contains("several peers are nicknamed node1"), "{e}");
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("node1", "node2"), 1);
        assert_eq!(edit_distance("nod2", "node2"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
