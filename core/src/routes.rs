//! Shortest-path routing over the mutually confirmed connection graph.
//!
//! Every peer gossips the set of peers it says it is connected to. A link
//! between `a` and `b` is usable only when *both* sides list each other: a
//! one-way claim is not a route (the other side may not have confirmed the
//! connection yet, or may have already dropped it). From that symmetric graph
//! each peer computes, for itself:
//!
//! * the next hop toward every reachable peer (the peer itself when it is a
//!   direct neighbour, otherwise a neighbour on a shortest path), and
//! * on demand ([`Graph::broadcast_children`]), its children in the
//!   broadcast tree rooted at any origin.
//!
//! # Determinism
//!
//! Everything here is a pure function of its inputs: no hashing, no clocks, no
//! randomness. Ties are broken by [`PeerName`] order:
//!
//! * **Next hop**: among all shortest paths from `me` to `dst`, the next hop
//!   is the *lowest-named* neighbour of `me` that lies on some shortest path
//!   (i.e. the lowest neighbour `n` with `dist(n, dst) == dist(me, dst) - 1`).
//!   Because each intermediate peer applies the same rule to the same
//!   (gossip-converged) graph, following next hops strictly decreases the
//!   distance to `dst` at every step, so forwarding never loops.
//! * **Broadcast tree**: in the BFS tree rooted at `origin`, the parent of a
//!   node at distance `d` is its lowest-named neighbour at distance `d - 1`.
//!   Every peer computes the same tree, so a broadcast reaches each peer of
//!   the origin's component exactly once.
//!
//! # Representation
//!
//! A [`Graph`] maps every peer that has an entry of its own in the
//! announcement map to a dense `u32` index (in ascending name order, so index
//! order equals name order) and holds a compact CSR adjacency of the
//! symmetric links; [`Graph::routes_from`] runs a single BFS from `me` over
//! it into [`Routes`], which keep only distances and next hops. Lookups are
//! a binary search over the sorted peer list followed by array reads.

use std::collections::{BTreeMap, BTreeSet};

use crate::peer::PeerName;

/// Distance marker for a node not (yet) reached by a BFS.
const UNREACHED: u32 = u32::MAX;
/// Next-hop marker for "no next hop" (`me` itself, or unreachable).
const NO_HOP: u32 = u32::MAX;
/// Largest number of peers that can be indexed (indices are `u32` and
/// `u32::MAX` is reserved as a marker). Peers beyond this — far more than
/// could ever fit in memory as a `BTreeMap` — are ignored rather than
/// panicking.
const MAX_PEERS: usize = (u32::MAX - 1) as usize;

/// Shortest-path next hops from one peer over symmetric (mutually confirmed) links.
///
/// Only peers that have an announcement entry of their own take part in the
/// graph: a peer that appears only as someone else's claimed neighbour has
/// confirmed nothing, so none of its links are symmetric.
///
/// It keeps only what lookups need (a few bytes per peer); the links
/// themselves stay in the [`Graph`] it was computed from. A node of a
/// 1,000-peer cluster keeping 100,000 links per table held 400 KB it never
/// read again.
///
/// `Default` is the routing table of `PeerName(0)` over an empty graph (equal
/// to `Routes::compute(PeerName(0), &BTreeMap::new())`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routes {
    /// The peer these routes are computed for.
    me: PeerName,
    /// Every peer with an announcement entry, ascending; position = index.
    nodes: Vec<PeerName>,
    /// Symmetric neighbours of `me` (node indices, ascending).
    neighbours: Vec<u32>,
    /// Hop count from `me` per node; `UNREACHED` when unreachable.
    dist: Vec<u32>,
    /// Next hop (node index) from `me` per node; `NO_HOP` for `me` and for
    /// unreachable nodes.
    next: Vec<u32>,
    /// Number of reachable nodes other than `me`.
    reachable: usize,
}

impl Default for Routes {
    fn default() -> Self {
        Routes::compute(PeerName(0), &BTreeMap::new())
    }
}

/// The symmetric link graph of a set of announcements, in compact (CSR)
/// form. Building it again reuses its buffers.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// Every peer with an announcement entry, ascending; position = index.
    nodes: Vec<PeerName>,
    /// CSR offsets: the symmetric neighbours of node `i` are
    /// `adj[adj_off[i]..adj_off[i + 1]]`. Length `nodes.len() + 1`.
    adj_off: Vec<usize>,
    /// CSR targets, ascending within each node's slice (so ascending by name).
    adj: Vec<u32>,
    /// Scratch of `build`: every claim as a node index, CSR-encoded.
    claim_off: Vec<usize>,
    claims: Vec<u32>,
    cursor: Vec<usize>,
}

impl Graph {
    /// The graph of `(peer, its claims)` ascending by peer, each claim
    /// list ascending (what topology entries hold). A link is kept only
    /// where both sides claim it; self-claims and claims of peers without
    /// an entry are dropped.
    ///
    /// Cost: O(V + E) with names evenly spread (they are random).
    pub fn build(&mut self, announced: &[(PeerName, &[PeerName])]) {
        self.nodes.clear();
        self.nodes
            .extend(announced.iter().map(|(p, _)| *p).take(MAX_PEERS));
        let n = self.nodes.len();

        // Pass 1: every claim as a node index. Both `nodes` and each claim
        // set are ascending, so the resulting index lists are ascending and
        // each search can gallop forward from just after the previous
        // position.
        self.claim_off.clear();
        self.claims.clear();
        self.claim_off.push(0);
        let buckets = Buckets::new(&self.nodes);
        for &(owner, set) in announced.iter().take(n) {
            let mut lo = 0usize;
            for &p in set {
                if p == owner {
                    continue;
                }
                match gallop(&self.nodes, lo.max(buckets.start(p)), p) {
                    Ok(k) => {
                        // `k < n <= MAX_PEERS < u32::MAX`, so this fits.
                        self.claims.push(to_u32(k));
                        lo = k + 1;
                    }
                    Err(k) => lo = k,
                }
            }
            self.claim_off.push(self.claims.len());
        }

        // Pass 2: keep a claim i -> j only if j also claims i. Nodes are
        // visited in ascending i, so the queries "does j claim i?" arrive in
        // ascending i for every j: one forward-only cursor per node into its
        // (ascending) claim list answers them all in O(V + E) total.
        let (claim_off, claims) = (&self.claim_off, &self.claims);
        self.cursor.clear();
        self.cursor.extend_from_slice(&claim_off[..n]);
        self.adj_off.clear();
        self.adj.clear();
        self.adj_off.push(0);
        for i in 0..n {
            let iu = to_u32(i);
            for &j in &claims[claim_off[i]..claim_off[i + 1]] {
                let ju = j as usize;
                let end = claim_off[ju + 1];
                let mut c = self.cursor[ju];
                while c < end && claims[c] < iu {
                    c += 1;
                }
                self.cursor[ju] = c;
                if c < end && claims[c] == iu {
                    self.adj.push(j);
                }
            }
            self.adj_off.push(self.adj.len());
        }
    }

    /// The graph of `announced[p]` = the peers p says it is connected to.
    pub fn of(announced: &BTreeMap<PeerName, BTreeSet<PeerName>>) -> Graph {
        let claims: Vec<(PeerName, Vec<PeerName>)> = announced
            .iter()
            .map(|(p, set)| (*p, set.iter().copied().collect()))
            .collect();
        let view: Vec<(PeerName, &[PeerName])> =
            claims.iter().map(|(p, c)| (*p, c.as_slice())).collect();
        let mut graph = Graph::default();
        graph.build(&view);
        graph
    }

    /// Index of `p` among the peers with an announcement entry.
    fn index_of(&self, p: PeerName) -> Option<usize> {
        self.nodes.binary_search(&p).ok()
    }

    /// Symmetric neighbours of node `i` (ascending).
    fn neighbours_of(&self, i: usize) -> &[u32] {
        match (self.adj_off.get(i), self.adj_off.get(i + 1)) {
            (Some(&s), Some(&e)) => self.adj.get(s..e).unwrap_or(&[]),
            _ => &[],
        }
    }

    /// Shortest-path routes from `me`: one BFS.
    ///
    /// Next-hop tie-break: `next[v]` is the minimum (by index, which is by
    /// name) over all BFS parents `u` of `v` (neighbours at distance
    /// `dist[v] - 1`) of `next[u]`, where a direct neighbour's next hop is
    /// itself. That is exactly the lowest-named neighbour of `me` on some
    /// shortest path to `v`. Every parent of `v` is dequeued before any node
    /// at `v`'s level, and its own `next` is final by then (all of *its*
    /// parents were dequeued earlier still), so a running minimum is exact.
    pub fn routes_from(&self, me: PeerName) -> Routes {
        let n = self.nodes.len();
        let mut routes = Routes {
            me,
            nodes: self.nodes.clone(),
            neighbours: Vec::new(),
            dist: vec![UNREACHED; n],
            next: vec![NO_HOP; n],
            reachable: 0,
        };
        let Some(m) = self.index_of(me) else {
            return routes;
        };
        routes.neighbours = self.neighbours_of(m).to_vec();
        let (dist, next) = (&mut routes.dist, &mut routes.next);
        let m = to_u32(m);
        let mut queue: Vec<u32> = Vec::with_capacity(n);
        dist[m as usize] = 0;
        queue.push(m);
        let mut head = 0usize;
        while let Some(&u) = queue.get(head) {
            head += 1;
            let uu = u as usize;
            let du = dist[uu];
            let hop_via_u = next[uu];
            for &v in self.neighbours_of(uu) {
                let vu = v as usize;
                let dv = dist[vu];
                // A direct neighbour of `me` is its own next hop.
                let candidate = if u == m { v } else { hop_via_u };
                if dv == UNREACHED {
                    dist[vu] = du + 1;
                    next[vu] = candidate;
                    queue.push(v);
                } else if dv == du + 1 && candidate < next[vu] {
                    next[vu] = candidate;
                }
            }
        }
        routes.reachable = queue.len() - 1;
        routes
    }

    /// Peers `me` must forward a broadcast that originated at `origin` to: its children in the BFS tree rooted at `origin`
    /// over the symmetric graph, with a deterministic tie-break (a node's parent is its lowest-named neighbour at distance d-1).
    /// Every peer computes the same tree, so a broadcast reaches each peer in origin's component exactly once. Computed on demand, O(V+E).
    ///
    /// Returns an empty list when `me` or `origin` has no usable links, or
    /// when `me` is not in `origin`'s component. The result is ascending.
    pub fn broadcast_children(&self, me: PeerName, origin: PeerName) -> Vec<PeerName> {
        let (Some(m), Some(o)) = (self.index_of(me), self.index_of(origin)) else {
            return Vec::new();
        };

        // BFS from the origin. It can stop once every node at my level has
        // been expanded (that labels my level + 1 completely), but a full BFS
        // is already O(V + E); stop early only where it is free to do so.
        let n = self.nodes.len();
        let mut dist = vec![UNREACHED; n];
        let mut queue: Vec<u32> = Vec::with_capacity(n);
        dist[o] = 0;
        queue.push(to_u32(o));
        let mut head = 0usize;
        while let Some(&u) = queue.get(head) {
            head += 1;
            let uu = u as usize;
            let du = dist[uu];
            if dist[m] != UNREACHED && du > dist[m] {
                // Levels up to dist[m] + 1 are fully labelled.
                break;
            }
            for &v in self.neighbours_of(uu) {
                let vu = v as usize;
                if dist[vu] == UNREACHED {
                    dist[vu] = du + 1;
                    queue.push(v);
                }
            }
        }

        let dm = dist[m];
        if dm == UNREACHED {
            return Vec::new();
        }
        // A neighbour v one level further out is my child iff its
        // lowest-named neighbour at my level is me. Adjacency is ascending,
        // so that is the first neighbour of v at distance dm.
        self.neighbours_of(m)
            .iter()
            .map(|&v| v as usize)
            .filter(|&v| dist[v] == dm + 1)
            .filter(|&v| {
                self.neighbours_of(v)
                    .iter()
                    .find(|&&w| dist[w as usize] == dm)
                    .is_some_and(|&w| w as usize == m)
            })
            .map(|v| self.nodes[v])
            .collect()
    }
}

impl Routes {
    /// `announced[p]` = the peers that p says it is connected to. Peers may appear only as neighbours (no entry of their own) -> such links are not symmetric, so unusable.
    ///
    /// A peer listing itself is ignored. If `me` has no entry of its own it
    /// has no usable links: only `me` itself is reachable.
    ///
    /// Cost: O((V + E) · log V) to index the announcements and check
    /// symmetry, plus one O(V + E) BFS.
    pub fn compute(me: PeerName, announced: &BTreeMap<PeerName, BTreeSet<PeerName>>) -> Routes {
        Graph::of(announced).routes_from(me)
    }

    /// Like [`Routes::compute`], from `(peer, its claims)` ascending by peer,
    /// each claim list ascending (what topology entries hold), without
    /// building maps first.
    pub fn compute_sorted(me: PeerName, announced: &[(PeerName, &[PeerName])]) -> Routes {
        let mut graph = Graph::default();
        graph.build(announced);
        graph.routes_from(me)
    }

    /// Index of `p` among the peers with an announcement entry.
    fn index_of(&self, p: PeerName) -> Option<usize> {
        self.nodes.binary_search(&p).ok()
    }

    /// The peer these routes were computed for.
    pub fn me(&self) -> PeerName {
        self.me
    }

    /// Next hop toward dst; None when dst == me or unreachable.
    ///
    /// Among all shortest paths, the next hop is the lowest-named neighbour of
    /// `me` that lies on one of them.
    pub fn next_hop(&self, dst: PeerName) -> Option<PeerName> {
        if dst == self.me {
            return None;
        }
        let i = self.index_of(dst)?;
        match self.next[i] {
            NO_HOP => None,
            h => Some(self.nodes[h as usize]),
        }
    }

    /// Hop count (1 = direct neighbour); None when unreachable; Some(0) for me.
    pub fn hops(&self, dst: PeerName) -> Option<u32> {
        if dst == self.me {
            return Some(0);
        }
        let i = self.index_of(dst)?;
        match self.dist[i] {
            UNREACHED => None,
            d => Some(d),
        }
    }

    /// Whether a link between `a` and `b`, neither of them me, appearing
    /// (`new`) or going, can change these routes. One between peers
    /// equally far from me (or both unreachable) lies on no shortest path.
    /// A new one between peers a hop apart in distance shortens no path
    /// either: it only offers the farther peer the nearer one's next hop,
    /// taken only if lower-named than the one it has (the tie-break
    /// above). A 1,000-node cluster settling after its start makes such
    /// links by the thousand, and four in five of the route computations
    /// they caused changed nothing.
    pub fn link_changes(&self, a: PeerName, b: PeerName, new: bool) -> bool {
        let (ha, hb) = match (self.hops(a), self.hops(b)) {
            (Some(ha), Some(hb)) if ha != hb => (ha, hb),
            (ha, hb) => return ha != hb,
        };
        if !new || ha.abs_diff(hb) > 1 {
            return true;
        }
        let (near, far) = if ha < hb { (a, b) } else { (b, a) };
        match (self.next_hop(near), self.next_hop(far)) {
            (Some(offered), Some(held)) => offered < held,
            _ => true,
        }
    }

    /// Whether `dst` is reachable over symmetric links; true for me.
    pub fn is_reachable(&self, dst: PeerName) -> bool {
        self.hops(dst).is_some()
    }

    /// Every reachable peer other than me, ascending, with its next hop.
    pub fn iter(&self) -> impl Iterator<Item = (PeerName, PeerName)> + '_ {
        self.nodes
            .iter()
            .zip(&self.next)
            .filter(|&(_, &h)| h != NO_HOP)
            .map(|(&dst, &h)| (dst, self.nodes[h as usize]))
    }

    /// Number of reachable peers other than me.
    pub fn len(&self) -> usize {
        self.reachable
    }

    /// True when no peer other than me is reachable.
    pub fn is_empty(&self) -> bool {
        self.reachable == 0
    }

    /// Direct (symmetric) neighbours of me, ascending.
    pub fn neighbours(&self) -> impl Iterator<Item = PeerName> + '_ {
        self.neighbours.iter().map(|&v| self.nodes[v as usize])
    }
}

/// Where to start looking for a name in the ascending `nodes`. Peer names
/// are random 64-bit values, evenly spread, so splitting their range into
/// about as many equal buckets as there are names puts each name within a
/// step or two of its bucket's first index: a lookup costs O(1) instead of
/// O(log distance), which matters with 100,000 claims per computation.
/// Unevenly spread names only make the start less close, never wrong.
struct Buckets {
    min: u64,
    /// A name's bucket is `(name - min) >> shift` (a shift, not a
    /// division: this runs once per claim).
    shift: u32,
    /// `first[b]` = index of the first name in bucket `b` or a later one;
    /// one more entry than there are buckets.
    first: Vec<usize>,
}

impl Buckets {
    fn new(nodes: &[PeerName]) -> Buckets {
        let (Some(min), Some(max)) = (nodes.first(), nodes.last()) else {
            return Buckets {
                min: 0,
                shift: 0,
                first: vec![0],
            };
        };
        let widest = max.0 - min.0;
        // The smallest shift that leaves at most one bucket per name.
        let mut shift = 0;
        while (widest >> shift) as usize >= nodes.len() {
            shift += 1;
        }
        let mut b = Buckets {
            min: min.0,
            shift,
            first: Vec::with_capacity(nodes.len() + 1),
        };
        for (i, p) in nodes.iter().enumerate() {
            // Buckets are ascending with the names: fill up to this one.
            b.first.resize(b.bucket(p.0 - b.min) + 1, i);
        }
        b.first.push(nodes.len());
        b
    }

    fn bucket(&self, offset: u64) -> usize {
        (offset >> self.shift) as usize
    }

    /// An index at or before `p`'s position among the names.
    fn start(&self, p: PeerName) -> usize {
        let Some(offset) = p.0.checked_sub(self.min) else {
            return 0;
        };
        // Past the last bucket: after every name.
        let last = self.first.len() - 1;
        self.first[self.bucket(offset).min(last)]
    }
}

/// Search ascending `sorted[from..]` for `target` by exponential then
/// binary search: `Ok(i)` if `sorted[i] == target`, else `Err(i)` with `i` the
/// insertion point. Both are absolute indices `>= from`. Costs
/// O(log(distance from `from`)), which beats a plain binary search when
/// consecutive targets are close together.
fn gallop(sorted: &[PeerName], from: usize, target: PeerName) -> Result<usize, usize> {
    let rest = sorted.get(from..).unwrap_or(&[]);
    // Find a window (bound / 2, bound] whose end is >= target.
    let mut bound = 1usize;
    while bound < rest.len() && rest[bound - 1] < target {
        bound *= 2;
    }
    let lo = bound / 2;
    let hi = bound.min(rest.len());
    match rest.get(lo..hi).unwrap_or(&[]).binary_search(&target) {
        Ok(k) => Ok(from + lo + k),
        Err(k) => Err(from + lo + k),
    }
}

/// Convert an index known to be below `MAX_PEERS` to `u32`.
fn to_u32(i: usize) -> u32 {
    // Callers only pass indices < nodes.len() <= MAX_PEERS < u32::MAX.
    u32::try_from(i).unwrap_or(u32::MAX - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    type Announced = BTreeMap<PeerName, BTreeSet<PeerName>>;

    fn p(n: u64) -> PeerName {
        PeerName(n)
    }

    /// Build an announcement map from (owner, [claimed...]) rows.
    fn ann(rows: &[(u64, &[u64])]) -> Announced {
        rows.iter()
            .map(|&(o, cs)| (p(o), cs.iter().copied().map(p).collect()))
            .collect()
    }

    /// Add a symmetric link to an announcement map.
    fn link(a: &mut Announced, x: u64, y: u64) {
        a.entry(p(x)).or_default().insert(p(y));
        a.entry(p(y)).or_default().insert(p(x));
    }

    #[test]
    fn line_routes_through_middle() {
        // a(1) - b(2) - c(3)
        let a = ann(&[(1, &[2]), (2, &[1, 3]), (3, &[2])]);
        let r = Routes::compute(p(1), &a);
        assert_eq!(r.me(), p(1));
        assert_eq!(r.next_hop(p(3)), Some(p(2)));
        assert_eq!(r.hops(p(3)), Some(2));
        assert_eq!(r.next_hop(p(2)), Some(p(2)));
        assert_eq!(r.hops(p(2)), Some(1));
        assert_eq!(r.next_hop(p(1)), None);
        assert_eq!(r.hops(p(1)), Some(0));
        assert!(r.is_reachable(p(1)));
        assert_eq!(r.len(), 2);
        assert!(!r.is_empty());
        assert_eq!(
            r.iter().collect::<Vec<_>>(),
            vec![(p(2), p(2)), (p(3), p(2))]
        );
        assert_eq!(r.neighbours().collect::<Vec<_>>(), vec![p(2)]);

        let rc = Routes::compute(p(3), &a);
        assert_eq!(rc.next_hop(p(1)), Some(p(2)));
        assert_eq!(rc.hops(p(1)), Some(2));
    }

    #[test]
    fn one_way_claim_is_not_a_route() {
        // a lists b, b does not list a.
        let a = ann(&[(1, &[2]), (2, &[])]);
        for me in [1, 2] {
            let r = Routes::compute(p(me), &a);
            let other = 3 - me;
            assert_eq!(r.next_hop(p(other)), None);
            assert_eq!(r.hops(p(other)), None);
            assert!(!r.is_reachable(p(other)));
            assert!(r.is_empty());
            assert_eq!(r.neighbours().count(), 0);
        }
        // b lists a but has no entry of its own -> still one-way.
        let a = ann(&[(1, &[2])]);
        let r = Routes::compute(p(1), &a);
        assert!(!r.is_reachable(p(2)));
        assert!(r.is_empty());
        // One-way claim in the middle of a line breaks the line.
        let a = ann(&[(1, &[2]), (2, &[1, 3]), (3, &[])]);
        let r = Routes::compute(p(1), &a);
        assert_eq!(r.hops(p(2)), Some(1));
        assert_eq!(r.hops(p(3)), None);
        assert_eq!(r.next_hop(p(3)), None);
    }

    #[test]
    fn isolated_peer() {
        let a = ann(&[(1, &[2]), (2, &[1]), (9, &[])]);
        let r = Routes::compute(p(9), &a);
        assert!(r.is_empty());
        assert_eq!(r.len(), 0);
        assert_eq!(r.iter().count(), 0);
        assert_eq!(r.neighbours().count(), 0);
        assert!(r.is_reachable(p(9)));
        assert_eq!(r.hops(p(9)), Some(0));
        assert!(!r.is_reachable(p(1)));
        let g = Graph::of(&a);
        assert_eq!(g.broadcast_children(p(9), p(9)), Vec::<PeerName>::new());
        assert_eq!(g.broadcast_children(p(9), p(1)), Vec::<PeerName>::new());
        // And the others cannot reach it either.
        assert!(!Routes::compute(p(1), &a).is_reachable(p(9)));

        // A `me` with no entry at all, and an empty graph.
        let r = Routes::compute(p(42), &a);
        assert!(r.is_empty());
        assert_eq!(r.hops(p(42)), Some(0));
        assert_eq!(r.next_hop(p(1)), None);
        let r = Routes::compute(p(5), &BTreeMap::new());
        assert!(r.is_empty());
        assert!(r.is_reachable(p(5)));
        assert_eq!(Routes::default(), Routes::compute(p(0), &BTreeMap::new()));
    }

    #[test]
    fn self_claims_are_ignored() {
        let a = ann(&[(1, &[1, 2]), (2, &[1, 2])]);
        let r = Routes::compute(p(1), &a);
        assert_eq!(r.neighbours().collect::<Vec<_>>(), vec![p(2)]);
        assert_eq!(r.len(), 1);
        assert_eq!(r.next_hop(p(1)), None);
    }

    #[test]
    fn triangle_routes_direct() {
        let mut a = Announced::new();
        link(&mut a, 10, 20);
        link(&mut a, 20, 30);
        link(&mut a, 10, 30);
        for me in [10, 20, 30] {
            let r = Routes::compute(p(me), &a);
            for dst in [10, 20, 30] {
                if dst == me {
                    assert_eq!(r.next_hop(p(dst)), None);
                } else {
                    assert_eq!(r.next_hop(p(dst)), Some(p(dst)));
                    assert_eq!(r.hops(p(dst)), Some(1));
                }
            }
            assert_eq!(r.len(), 2);
            assert_eq!(r.neighbours().count(), 2);
        }
    }

    #[test]
    fn square_cut_link_goes_around() {
        // 1 - 2
        // |   |
        // 4 - 3
        let mut a = Announced::new();
        link(&mut a, 1, 2);
        link(&mut a, 2, 3);
        link(&mut a, 3, 4);
        link(&mut a, 4, 1);
        let r = Routes::compute(p(1), &a);
        assert_eq!(r.next_hop(p(2)), Some(p(2)));
        // Two shortest paths to 3: via 2 and via 4; lowest-named wins.
        assert_eq!(r.next_hop(p(3)), Some(p(2)));
        assert_eq!(r.hops(p(3)), Some(2));
        // Same tie from 3's side toward 1: via 2 (not 4).
        assert_eq!(Routes::compute(p(3), &a).next_hop(p(1)), Some(p(2)));

        // Cut 1-2 (only one side withdraws: that suffices).
        a.get_mut(&p(2)).map(|s| s.remove(&p(1)));
        let r = Routes::compute(p(1), &a);
        assert_eq!(r.next_hop(p(2)), Some(p(4)));
        assert_eq!(r.hops(p(2)), Some(3));
        assert_eq!(r.next_hop(p(3)), Some(p(4)));
        assert_eq!(r.hops(p(3)), Some(2));
        assert_eq!(r.neighbours().collect::<Vec<_>>(), vec![p(4)]);
        let r2 = Routes::compute(p(2), &a);
        assert_eq!(r2.next_hop(p(1)), Some(p(3)));
        assert_eq!(r2.hops(p(1)), Some(3));
    }

    #[test]
    fn next_hop_tie_break_is_lowest_first_hop_not_lowest_parent() {
        // me=50 has neighbours 10 and 90. dst=99 is 3 hops away both via
        // 10 -> 70 -> 99 and via 90 -> 20 -> 99. The lowest-named *parent* of
        // 99 is 20 (reached via 90), but the rule is about the first hop:
        // the lowest neighbour of me on a shortest path is 10.
        let mut a = Announced::new();
        link(&mut a, 50, 10);
        link(&mut a, 50, 90);
        link(&mut a, 90, 20);
        link(&mut a, 10, 70);
        link(&mut a, 20, 99);
        link(&mut a, 70, 99);
        let r = Routes::compute(p(50), &a);
        assert_eq!(r.hops(p(99)), Some(3));
        assert_eq!(r.next_hop(p(99)), Some(p(10)));
        assert_eq!(r.next_hop(p(20)), Some(p(90)));
    }

    #[test]
    fn broadcast_tree_on_square() {
        let mut a = Announced::new();
        link(&mut a, 1, 2);
        link(&mut a, 2, 3);
        link(&mut a, 3, 4);
        link(&mut a, 4, 1);
        let g = Graph::of(&a);
        let kids = |me: u64, origin: u64| g.broadcast_children(p(me), p(origin));
        assert_eq!(kids(1, 1), vec![p(2), p(4)]);
        // 3's parent is the lowest of {2, 4} = 2.
        assert_eq!(kids(2, 1), vec![p(3)]);
        assert_eq!(kids(4, 1), Vec::<PeerName>::new());
        assert_eq!(kids(3, 1), Vec::<PeerName>::new());
        // Unknown origin.
        assert_eq!(kids(1, 77), Vec::<PeerName>::new());
    }

    // ---------------------------------------------------------------------
    // Property tests against a plainly written reference.
    // ---------------------------------------------------------------------

    /// Symmetric-link test written directly against the announcement map.
    fn ref_sym(a: &Announced, x: PeerName, y: PeerName) -> bool {
        x != y
            && a.get(&x).is_some_and(|s| s.contains(&y))
            && a.get(&y).is_some_and(|s| s.contains(&x))
    }

    /// Symmetric neighbours of `x` among `all`, ascending.
    fn ref_neighbours(a: &Announced, all: &BTreeSet<PeerName>, x: PeerName) -> Vec<PeerName> {
        all.iter().copied().filter(|&y| ref_sym(a, x, y)).collect()
    }

    /// Plain BFS distance map from `src` (includes `src` at 0).
    fn ref_dist(a: &Announced, all: &BTreeSet<PeerName>, src: PeerName) -> BTreeMap<PeerName, u32> {
        let mut dist = BTreeMap::new();
        dist.insert(src, 0u32);
        let mut q = VecDeque::from([src]);
        while let Some(u) = q.pop_front() {
            let du = dist[&u];
            for v in ref_neighbours(a, all, u) {
                if let std::collections::btree_map::Entry::Vacant(e) = dist.entry(v) {
                    e.insert(du + 1);
                    q.push_back(v);
                }
            }
        }
        dist
    }

    /// Random graph: up to 30 distinct names (from a small range so that some
    /// extra names are left over to probe with), each pair (including self)
    /// claimed independently with a random density, and each name has its
    /// own entry with high probability (those without are neighbour-only).
    fn graph() -> impl Strategy<Value = (BTreeSet<PeerName>, Announced)> {
        (prop::collection::btree_set(0u64..64, 1..=30), 0.05f64..0.95)
            .prop_flat_map(|(names, density)| {
                let n = names.len();
                (
                    Just(names),
                    prop::collection::vec(prop::bool::weighted(density), n * n),
                    prop::collection::vec(prop::bool::weighted(0.9), n),
                )
            })
            .prop_map(|(names, claims, has_entry)| {
                let names: Vec<PeerName> = names.into_iter().map(PeerName).collect();
                let n = names.len();
                let mut a = Announced::new();
                for (i, &x) in names.iter().enumerate() {
                    if !has_entry[i] {
                        continue;
                    }
                    let set = a.entry(x).or_default();
                    for (j, &y) in names.iter().enumerate() {
                        if claims[i * n + j] {
                            set.insert(y);
                        }
                    }
                }
                (names.into_iter().collect(), a)
            })
    }

    proptest! {
        #[test]
        fn buckets_start_at_or_before_the_name(
            names in prop::collection::btree_set(any::<u64>(), 0..40),
            clustered in prop::collection::btree_set(0u64..100, 0..40),
            probes in prop::collection::vec(any::<u64>(), 20),
        ) {
            // Evenly spread names, and a cluster with one far outlier.
            let spread: Vec<PeerName> = names.into_iter().map(PeerName).collect();
            let mut skewed: Vec<PeerName> = clustered.into_iter().map(PeerName).collect();
            skewed.push(PeerName(u64::MAX));
            for nodes in [spread, skewed] {
                let buckets = Buckets::new(&nodes);
                let all = probes.iter().copied().map(PeerName).chain(nodes.iter().copied());
                for p in all.chain([PeerName(0), PeerName(u64::MAX)]) {
                    let position = nodes.partition_point(|q| *q < p);
                    prop_assert!(buckets.start(p) <= position);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn a_link_said_not_to_change_routes_does_not((all, a) in graph()) {
            let with_entries: Vec<PeerName> = a.keys().copied().collect();
            for &me in &with_entries {
                let routes = Routes::compute(me, &a);
                for &x in with_entries.iter().filter(|x| **x != me) {
                    for &y in with_entries.iter().filter(|y| **y > x && **y != me) {
                        let linked = a[&x].contains(&y) && a[&y].contains(&x);
                        let mut changed = a.clone();
                        if linked {
                            changed.get_mut(&x).map(|s| s.remove(&y));
                        } else {
                            changed.get_mut(&x).map(|s| s.insert(y));
                            changed.get_mut(&y).map(|s| s.insert(x));
                        }
                        if !routes.link_changes(x, y, !linked) {
                            prop_assert_eq!(
                                &Routes::compute(me, &changed),
                                &routes,
                                "{:?} linked {} from {:?}, {:?}", (x, y), !linked, me, &all
                            );
                        }
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn routes_match_reference_bfs((all, a) in graph()) {
            let routes: BTreeMap<PeerName, Routes> =
                all.iter().map(|&x| (x, Routes::compute(x, &a))).collect();
            let dists: BTreeMap<PeerName, BTreeMap<PeerName, u32>> =
                all.iter().map(|&x| (x, ref_dist(&a, &all, x))).collect();
            // A name that is never in the graph.
            let stranger = PeerName(1000);

            for &me in &all {
                let r = &routes[&me];
                let dme = &dists[&me];
                let nbrs = ref_neighbours(&a, &all, me);
                prop_assert_eq!(r.me(), me);
                prop_assert_eq!(r.neighbours().collect::<Vec<_>>(), nbrs.clone());

                // Reachable set.
                let got: BTreeSet<PeerName> = r.iter().map(|(d, _)| d).collect();
                let want: BTreeSet<PeerName> =
                    dme.keys().copied().filter(|&d| d != me).collect();
                prop_assert_eq!(&got, &want);
                prop_assert_eq!(r.len(), want.len());
                prop_assert_eq!(r.is_empty(), want.is_empty());
                prop_assert!(!r.is_reachable(stranger));
                prop_assert_eq!(r.next_hop(stranger), None);
                prop_assert_eq!(r.hops(stranger), None);
                prop_assert_eq!(r.next_hop(me), None);
                prop_assert_eq!(r.hops(me), Some(0));
                prop_assert!(r.is_reachable(me));

                // iter() is ascending and agrees with next_hop().
                let listed: Vec<(PeerName, PeerName)> = r.iter().collect();
                prop_assert!(listed.windows(2).all(|w| w[0].0 < w[1].0));
                for &(d, h) in &listed {
                    prop_assert_eq!(r.next_hop(d), Some(h));
                }

                for &dst in &all {
                    prop_assert_eq!(r.hops(dst), dme.get(&dst).copied());
                    prop_assert_eq!(r.is_reachable(dst), dme.contains_key(&dst));
                    if dst == me {
                        continue;
                    }
                    let Some(&d) = dme.get(&dst) else {
                        prop_assert_eq!(r.next_hop(dst), None);
                        continue;
                    };
                    let hop = r.next_hop(dst);
                    prop_assert!(hop.is_some());
                    let hop = hop.unwrap_or(me);
                    // A symmetric neighbour on a shortest path...
                    prop_assert!(nbrs.contains(&hop));
                    prop_assert_eq!(dists[&hop].get(&dst).copied(), Some(d - 1));
                    // ...and the lowest such neighbour.
                    let lowest = nbrs
                        .iter()
                        .copied()
                        .find(|n| dists[n].get(&dst) == Some(&(d - 1)));
                    prop_assert_eq!(Some(hop), lowest);

                    // Forwarding with each peer's own table reaches dst in
                    // exactly d steps.
                    let mut cur = me;
                    let mut steps = 0u32;
                    while cur != dst {
                        prop_assert!(steps < d, "loop or detour from {:?} to {:?}", me, dst);
                        let nh = routes[&cur].next_hop(dst);
                        prop_assert!(nh.is_some(), "{:?} has no hop to {:?}", cur, dst);
                        let nh = nh.unwrap_or(dst);
                        prop_assert!(ref_sym(&a, cur, nh));
                        cur = nh;
                        steps += 1;
                    }
                    prop_assert_eq!(steps, d);
                }
            }
        }

        #[test]
        fn broadcast_reaches_component_exactly_once((all, a) in graph()) {
            let g = Graph::of(&a);
            for &origin in &all {
                let dorig = ref_dist(&a, &all, origin);
                let component: BTreeSet<PeerName> = dorig.keys().copied().collect();

                // Each peer's children are exactly its children in the
                // reference tree: parent = lowest-named neighbour one level up.
                for &x in &all {
                    let want: Vec<PeerName> = match dorig.get(&x) {
                        None => Vec::new(),
                        Some(&dx) => ref_neighbours(&a, &all, x)
                            .into_iter()
                            .filter(|c| dorig.get(c) == Some(&(dx + 1)))
                            .filter(|&c| {
                                ref_neighbours(&a, &all, c)
                                    .into_iter()
                                    .find(|w| dorig.get(w) == Some(&dx))
                                    == Some(x)
                            })
                            .collect(),
                    };
                    prop_assert_eq!(g.broadcast_children(x, origin), want);
                }

                // The origin holds the message from the start.
                let mut received: BTreeMap<PeerName, u32> = BTreeMap::new();
                received.insert(origin, 1);
                let mut q = VecDeque::from([origin]);
                while let Some(x) = q.pop_front() {
                    for c in g.broadcast_children(x, origin) {
                        prop_assert!(ref_sym(&a, x, c), "{:?} forwarded to non-neighbour {:?}", x, c);
                        let k = received.entry(c).or_insert(0);
                        *k += 1;
                        prop_assert_eq!(*k, 1, "{:?} received twice from origin {:?}", c, origin);
                        q.push_back(c);
                    }
                }
                let got: BTreeSet<PeerName> = received.keys().copied().collect();
                prop_assert_eq!(got, component);
                // Peers outside the component, asked directly, forward nothing.
                for &x in &all {
                    if !received.contains_key(&x) {
                        prop_assert!(g.broadcast_children(x, origin).is_empty());
                    }
                }
            }
        }
    }
}
