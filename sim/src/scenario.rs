//! Scenario files (TOML): the public format of ../shared/SCENARIOS.md,
//! parsed into a validated model. Every problem is reported with the
//! file, line and column it comes from.

use ipnet::Ipv4Net;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

/// A scenario, validated.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub about: Option<String>,
    pub seed: u64,
    pub duration: Duration,
    pub ipam: IpamKind,
    pub ipalloc_range: Ipv4Net,
    pub secret: Option<String>,
    pub latency: Latency,
    pub loss: f64,
    pub nodes: Vec<NodeDef>,
    pub events: Vec<EventDef>,
    pub checks: Vec<CheckDef>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpamKind {
    Ring,
    NodeCidr,
}

/// Fixed ("2ms") or uniform over a range ("1ms..5ms").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latency {
    pub min: Duration,
    pub max: Duration,
}

#[derive(Clone, Debug)]
pub struct NodeDef {
    pub name: String,
    pub address: Ipv4Addr,
    pub pod_cidr: Option<Ipv4Net>,
    pub start: bool,
    /// The nodes it is told about at start.
    pub peers: Peers,
    /// This node's own secret, overriding the scenario's (an extension of
    /// the format: a misconfigured node).
    pub secret: Option<String>,
}

/// The nodes a node is told about at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peers {
    /// Every other node (no `peers` key). Not written out: a list per node
    /// made a 10,000-node file hold 10^8 indexes (1.3 GB to check it).
    Everyone,
    /// The indexes of the nodes `peers` names.
    Listed(Vec<usize>),
}

impl Peers {
    /// The peers' indexes, for node `me` of a scenario of `nodes` nodes.
    pub fn of(&self, me: usize, nodes: usize) -> impl Iterator<Item = usize> + '_ {
        let (everyone, listed) = match self {
            Peers::Everyone => (Some((0..nodes).filter(move |j| *j != me)), None),
            Peers::Listed(list) => (None, Some(list.iter().copied())),
        };
        everyone
            .into_iter()
            .flatten()
            .chain(listed.into_iter().flatten())
    }
}

#[derive(Clone, Debug)]
pub struct EventDef {
    pub at: Duration,
    pub action: Action,
    /// Where it is written, for messages ("file:line:col").
    pub line: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Start(Vec<usize>),
    Crash(Vec<usize>),
    Restart(Vec<usize>),
    Wipe(Vec<usize>),
    /// Copy what the nodes persisted, for a later `Restore`.
    Backup(Vec<usize>),
    /// Crash, put back the last `Backup`'s copy of the state, start.
    Restore(Vec<usize>),
    Remove(Vec<usize>),
    Partition(Vec<Vec<usize>>),
    Cut(usize, usize),
    Heal,
    Loss {
        rate: f64,
        nodes: Option<Vec<usize>>,
    },
    Latency {
        value: Latency,
        nodes: Option<Vec<usize>>,
    },
    AddPod {
        node: usize,
        pods: Vec<String>,
    },
    DelPod(String),
}

impl Action {
    /// Whether it disturbs the cluster: convergence is timed from the last
    /// disruption.
    pub fn disrupts(&self) -> bool {
        match self {
            Action::AddPod { .. } | Action::DelPod(_) | Action::Backup(_) => false,
            Action::Start(_)
            | Action::Crash(_)
            | Action::Restart(_)
            | Action::Wipe(_)
            | Action::Restore(_)
            | Action::Remove(_)
            | Action::Partition(_)
            | Action::Cut(..)
            | Action::Heal
            | Action::Loss { .. }
            | Action::Latency { .. } => true,
        }
    }

    /// The event as people read it, with node names ("cut node1 node3").
    pub fn describe(&self, scenario: &Scenario) -> String {
        let names = |list: &[usize]| {
            list.iter()
                .map(|i| scenario.nodes[*i].name.clone())
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Action::Start(l) => format!("start {}", names(l)),
            Action::Crash(l) => format!("crash {}", names(l)),
            Action::Restart(l) => format!("restart {}", names(l)),
            Action::Wipe(l) => format!("wipe {}", names(l)),
            Action::Backup(l) => format!("backup {}", names(l)),
            Action::Restore(l) => format!("restore {}", names(l)),
            Action::Remove(l) => format!("remove {}", names(l)),
            Action::Partition(g) => format!(
                "partition {}",
                g.iter()
                    .map(|g| format!("[{}]", names(g)))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Action::Cut(a, b) => format!(
                "cut {} {}",
                scenario.nodes[*a].name, scenario.nodes[*b].name
            ),
            Action::Heal => "heal".to_string(),
            Action::Loss { rate, .. } => format!("loss {rate}"),
            Action::Latency { value, .. } => format!("latency {:?}..{:?}", value.min, value.max),
            Action::AddPod { node, pods } => format!(
                "add_pod {} x{} on {}",
                pods[0],
                pods.len(),
                scenario.nodes[*node].name
            ),
            Action::DelPod(p) => format!("del_pod {p}"),
        }
    }
}

/// What an event does, as `do = "..."` names it, before its fields are
/// read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ActionKind {
    Start,
    Crash,
    Restart,
    Wipe,
    Backup,
    Restore,
    Remove,
    Partition,
    Cut,
    Heal,
    Loss,
    Latency,
    AddPod,
    DelPod,
}

impl ActionKind {
    const ALL: [ActionKind; 14] = [
        ActionKind::Start,
        ActionKind::Crash,
        ActionKind::Restart,
        ActionKind::Wipe,
        ActionKind::Backup,
        ActionKind::Restore,
        ActionKind::Remove,
        ActionKind::Partition,
        ActionKind::Cut,
        ActionKind::Heal,
        ActionKind::Loss,
        ActionKind::Latency,
        ActionKind::AddPod,
        ActionKind::DelPod,
    ];

    fn parse(name: &str) -> Option<ActionKind> {
        ActionKind::ALL.into_iter().find(|k| k.name() == name)
    }

    fn name(self) -> &'static str {
        match self {
            ActionKind::Start => "start",
            ActionKind::Crash => "crash",
            ActionKind::Restart => "restart",
            ActionKind::Wipe => "wipe",
            ActionKind::Backup => "backup",
            ActionKind::Restore => "restore",
            ActionKind::Remove => "remove",
            ActionKind::Partition => "partition",
            ActionKind::Cut => "cut",
            ActionKind::Heal => "heal",
            ActionKind::Loss => "loss",
            ActionKind::Latency => "latency",
            ActionKind::AddPod => "add_pod",
            ActionKind::DelPod => "del_pod",
        }
    }

    /// The fields it takes besides `at` and `do`.
    fn fields(self) -> &'static [&'static str] {
        match self {
            ActionKind::Start
            | ActionKind::Crash
            | ActionKind::Restart
            | ActionKind::Wipe
            | ActionKind::Backup
            | ActionKind::Restore
            | ActionKind::Remove => &["nodes"],
            ActionKind::Partition => &["groups"],
            ActionKind::Cut => &["a", "b"],
            ActionKind::Heal => &[],
            ActionKind::Loss => &["rate", "nodes"],
            ActionKind::Latency => &["value", "nodes"],
            ActionKind::AddPod => &["node", "pod", "count"],
            ActionKind::DelPod => &["pod"],
        }
    }
}

/// "a, b or c".
fn one_of(names: &[&str]) -> String {
    match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

#[derive(Clone, Debug)]
pub struct CheckDef {
    pub at: CheckAt,
    pub expect: Expect,
    pub line: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckAt {
    Time(Duration),
    End,
    Always,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expect {
    Converged,
    UniqueIps,
    Allocated(Option<Vec<String>>),
    Pending(Vec<String>),
    Reachable {
        from: Option<String>,
        to: Option<String>,
    },
    Unreachable {
        from: String,
        to: String,
    },
    GossipBytes {
        max_per_node_per_s: f64,
    },
}

/// A scenario that cannot be run, and where the problem is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ScenarioError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

// ---- the file as written ------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: Spanned<String>,
    about: Option<String>,
    seed: Option<u64>,
    duration: Spanned<String>,
    ipam: Option<Spanned<String>>,
    ipalloc_range: Option<Spanned<String>>,
    secret: Option<Spanned<String>>,
    network: Option<NetworkSpec>,
    #[serde(default)]
    nodes: Vec<Spanned<NodeSpec>>,
    #[serde(default)]
    events: Vec<Spanned<EventSpec>>,
    #[serde(default)]
    checks: Vec<Spanned<CheckSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkSpec {
    latency: Option<Spanned<String>>,
    loss: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSpec {
    name: String,
    address: Spanned<String>,
    pod_cidr: Option<Spanned<String>>,
    start: Option<bool>,
    peers: Option<Vec<Spanned<String>>>,
    secret: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventSpec {
    at: Spanned<String>,
    #[serde(rename = "do")]
    action: Spanned<String>,
    nodes: Option<Vec<Spanned<String>>>,
    groups: Option<Vec<Vec<Spanned<String>>>>,
    a: Option<Spanned<String>>,
    b: Option<Spanned<String>>,
    rate: Option<Spanned<f64>>,
    value: Option<Spanned<String>>,
    node: Option<Spanned<String>>,
    pod: Option<Spanned<String>>,
    count: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckSpec {
    at: Spanned<String>,
    expect: Spanned<String>,
    pods: Option<Vec<Spanned<String>>>,
    from: Option<Spanned<String>>,
    to: Option<Spanned<String>>,
    max_per_node_per_s: Option<Spanned<f64>>,
}

/// Turns byte spans into line:column messages.
struct Source<'a> {
    file: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ScenarioError {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ScenarioError {
            file: self.file.to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    fn line_of(&self, span: &Range<usize>) -> usize {
        self.error(span.clone(), "").line
    }
}

/// Reads and validates a scenario file.
pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
    let file = path.display().to_string();
    let unreadable = |message: String| ScenarioError {
        file: file.clone(),
        line: 1,
        column: 1,
        message,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| unreadable(format!("cannot read the file: {e}")))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(unreadable(format!(
            "the file is larger than {} MiB: a scenario is a page of TOML",
            MAX_FILE_BYTES >> 20
        )));
    }
    parse(&file, &text)
}

/// The largest scenario file read (a 1,000-node one is ~100 KB); a device
/// or a mistaken path to a huge file gets an error, not an endless read.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// Parses and validates scenario text; `file` names it in messages.
pub fn parse(file: &str, text: &str) -> Result<Scenario, ScenarioError> {
    let src = Source { file, text };
    let raw: File = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        src.error(span, e.message().trim().to_string())
    })?;
    Validator { src: &src }.scenario(raw)
}

/// Node name -> index.
type Names<'a> = BTreeMap<&'a str, usize>;

struct Validator<'a> {
    src: &'a Source<'a>,
}

impl Validator<'_> {
    fn scenario(&self, raw: File) -> Result<Scenario, ScenarioError> {
        if raw.name.get_ref().trim().is_empty() {
            return Err(self.src.error(raw.name.span(), "name must not be empty"));
        }
        let duration = self.duration(&raw.duration)?;
        let ipam = match raw.ipam.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
            None | Some(("ring", _)) => IpamKind::Ring,
            Some(("node-cidr", _)) => IpamKind::NodeCidr,
            Some((other, span)) => {
                return Err(self.src.error(
                    span,
                    format!("ipam must be \"ring\" or \"node-cidr\", not {other:?}"),
                ));
            }
        };
        let ipalloc_range = match &raw.ipalloc_range {
            None => weft_core::config::DEFAULT_IPALLOC_RANGE
                .parse()
                .expect("valid default"),
            Some(s) => {
                let range = self.cidr(s)?;
                weft_core::config::check_ipalloc_range(range)
                    .map_err(|e| self.src.error(s.span(), e.to_string()))?;
                range
            }
        };
        let secret = raw.secret.as_ref().map(|s| self.secret(s)).transpose()?;
        let (latency, loss) = match &raw.network {
            None => (default_latency(), 0.0),
            Some(n) => (
                n.latency
                    .as_ref()
                    .map(|l| self.latency(l))
                    .transpose()?
                    .unwrap_or(default_latency()),
                n.loss
                    .as_ref()
                    .map(|l| self.rate(l))
                    .transpose()?
                    .unwrap_or(0.0),
            ),
        };
        // Name -> index of the first node so named: looked up once per
        // name written, so a 10,000-node file is not 10^8 comparisons.
        let mut names = Names::new();
        for (i, n) in raw.nodes.iter().enumerate() {
            names.entry(n.get_ref().name.as_str()).or_insert(i);
        }
        if names.is_empty() {
            return Err(self
                .src
                .error(0..0, "a scenario needs at least one [[nodes]] entry"));
        }
        let mut nodes = Vec::new();
        let mut addresses = BTreeSet::new();
        for (i, spanned) in raw.nodes.iter().enumerate() {
            let n = spanned.get_ref();
            if names.get(n.name.as_str()) != Some(&i) {
                return Err(self.src.error(
                    spanned.span(),
                    format!("node name {:?} is used twice", n.name),
                ));
            }
            let address: Ipv4Addr = n.address.get_ref().parse().map_err(|_| {
                self.src.error(
                    n.address.span(),
                    format!("{:?} is not an IPv4 address", n.address.get_ref()),
                )
            })?;
            if !addresses.insert(address) {
                return Err(self.src.error(
                    n.address.span(),
                    format!("address {address} is used by two nodes"),
                ));
            }
            let pod_cidr = n.pod_cidr.as_ref().map(|c| self.cidr(c)).transpose()?;
            match (ipam, pod_cidr) {
                (IpamKind::NodeCidr, None) => {
                    return Err(self.src.error(
                        spanned.span(),
                        format!(
                            "node {:?} needs a pod_cidr with ipam = \"node-cidr\"",
                            n.name
                        ),
                    ));
                }
                (IpamKind::Ring, Some(_)) => {
                    let span = n.pod_cidr.as_ref().map_or(spanned.span(), |c| c.span());
                    return Err(self
                        .src
                        .error(span, "pod_cidr is only for ipam = \"node-cidr\""));
                }
                _ => {}
            }
            let peers = match &n.peers {
                None => Peers::Everyone,
                Some(list) => Peers::Listed(
                    list.iter()
                        .map(|p| self.node(&names, p))
                        .collect::<Result<_, _>>()?,
                ),
            };
            nodes.push(NodeDef {
                name: n.name.clone(),
                address,
                pod_cidr,
                start: n.start.unwrap_or(true),
                peers,
                secret: n.secret.as_ref().map(|s| self.secret(s)).transpose()?,
            });
        }
        let mut pods = BTreeSet::new();
        let mut events = Vec::new();
        let mut pods_added = 0usize;
        for e in &raw.events {
            let event = self.event(e, &names, &mut pods)?;
            if let Action::AddPod { pods: list, .. } = &event.action {
                pods_added += list.len();
                if pods_added > MAX_POD_ADDS {
                    return Err(self.src.error(
                        e.get_ref().action.span(),
                        format!("the scenario adds more than {MAX_POD_ADDS} pods in all"),
                    ));
                }
            }
            if event.at > duration {
                return Err(self.src.error(
                    e.get_ref().at.span(),
                    "event is after the end of the scenario (duration)",
                ));
            }
            events.push(event);
        }
        self.check_restores(&raw.events, &events, &nodes)?;
        events.sort_by_key(|e| e.at); // stable: same-time events keep file order
        let checks = raw
            .checks
            .iter()
            .map(|c| self.check(c, duration, &pods))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Scenario {
            name: raw.name.into_inner(),
            about: raw.about,
            seed: raw.seed.unwrap_or(1),
            duration,
            ipam,
            ipalloc_range,
            secret,
            latency,
            loss,
            nodes,
            events,
            checks,
        })
    }

    /// Every `restore` of a node comes after a `backup` of it.
    fn check_restores(
        &self,
        specs: &[Spanned<EventSpec>],
        events: &[EventDef],
        nodes: &[NodeDef],
    ) -> Result<(), ScenarioError> {
        let mut order: Vec<usize> = (0..events.len()).collect();
        order.sort_by_key(|i| events[*i].at);
        let mut backed_up = BTreeSet::new();
        for i in order {
            match &events[i].action {
                Action::Backup(list) => backed_up.extend(list.iter().copied()),
                Action::Restore(list) => {
                    if let Some(n) = list.iter().find(|n| !backed_up.contains(*n)) {
                        return Err(self.src.error(
                            specs[i].span(),
                            format!("restore of {:?} before any backup of it", nodes[*n].name),
                        ));
                    }
                }
                Action::Start(_)
                | Action::Crash(_)
                | Action::Restart(_)
                | Action::Wipe(_)
                | Action::Remove(_)
                | Action::Partition(_)
                | Action::Cut(..)
                | Action::Heal
                | Action::Loss { .. }
                | Action::Latency { .. }
                | Action::AddPod { .. }
                | Action::DelPod(_) => {}
            }
        }
        Ok(())
    }

    fn event(
        &self,
        spanned: &Spanned<EventSpec>,
        names: &Names,
        pods: &mut BTreeSet<String>,
    ) -> Result<EventDef, ScenarioError> {
        let e = spanned.get_ref();
        let at = self.duration(&e.at)?;
        let kind = e.action.get_ref().as_str();
        let Some(action_kind) = ActionKind::parse(kind) else {
            let names = ActionKind::ALL.map(ActionKind::name);
            return Err(self.src.error(
                e.action.span(),
                format!("unknown event {kind:?}: use {}", one_of(&names)),
            ));
        };
        let allowed = action_kind.fields();
        let present = [
            ("nodes", e.nodes.is_some()),
            ("groups", e.groups.is_some()),
            ("a", e.a.is_some()),
            ("b", e.b.is_some()),
            ("rate", e.rate.is_some()),
            ("value", e.value.is_some()),
            ("node", e.node.is_some()),
            ("pod", e.pod.is_some()),
            ("count", e.count.is_some()),
        ];
        self.only_fields(spanned.span(), "do", kind, &present, allowed)?;
        let need = |field: &str| {
            self.src
                .error(spanned.span(), format!("do = {kind:?} needs `{field}`"))
        };
        let nodes =
            |list: &Option<Vec<Spanned<String>>>| -> Result<Option<Vec<usize>>, ScenarioError> {
                list.as_ref()
                    .map(|l| l.iter().map(|n| self.node(names, n)).collect())
                    .transpose()
            };
        let node_list = || nodes(&e.nodes)?.ok_or_else(|| need("nodes"));
        let action = match action_kind {
            ActionKind::Start => Action::Start(node_list()?),
            ActionKind::Crash => Action::Crash(node_list()?),
            ActionKind::Restart => Action::Restart(node_list()?),
            ActionKind::Wipe => Action::Wipe(node_list()?),
            ActionKind::Backup => Action::Backup(node_list()?),
            ActionKind::Restore => Action::Restore(node_list()?),
            ActionKind::Remove => Action::Remove(node_list()?),
            ActionKind::Partition => {
                let groups = e.groups.as_ref().ok_or_else(|| need("groups"))?;
                let groups: Vec<Vec<usize>> = groups
                    .iter()
                    .map(|g| g.iter().map(|n| self.node(names, n)).collect())
                    .collect::<Result<_, _>>()?;
                let mut seen = BTreeSet::new();
                if groups.iter().flatten().any(|n| !seen.insert(*n)) {
                    return Err(self
                        .src
                        .error(spanned.span(), "a node appears in two partition groups"));
                }
                Action::Partition(groups)
            }
            ActionKind::Cut => {
                let a = self.node(names, e.a.as_ref().ok_or_else(|| need("a"))?)?;
                let b = self.node(names, e.b.as_ref().ok_or_else(|| need("b"))?)?;
                if a == b {
                    return Err(self
                        .src
                        .error(spanned.span(), "cut needs two different nodes"));
                }
                Action::Cut(a, b)
            }
            ActionKind::Heal => Action::Heal,
            ActionKind::Loss => Action::Loss {
                rate: self.rate(e.rate.as_ref().ok_or_else(|| need("rate"))?)?,
                nodes: nodes(&e.nodes)?,
            },
            ActionKind::Latency => Action::Latency {
                value: self.latency(e.value.as_ref().ok_or_else(|| need("value"))?)?,
                nodes: nodes(&e.nodes)?,
            },
            ActionKind::AddPod => {
                let node = self.node(names, e.node.as_ref().ok_or_else(|| need("node"))?)?;
                let pod = e.pod.as_ref().ok_or_else(|| need("pod"))?;
                let base = pod.get_ref().clone();
                let list: Vec<String> = match &e.count {
                    None => vec![base],
                    Some(c) if *c.get_ref() == 0 => {
                        return Err(self.src.error(c.span(), "count must be at least 1"));
                    }
                    Some(c) if *c.get_ref() > MAX_POD_COUNT => {
                        return Err(self.src.error(
                            c.span(),
                            format!("count {} is more than the {MAX_POD_COUNT} pods one add_pod may add", c.get_ref()),
                        ));
                    }
                    Some(c) => (1..=*c.get_ref()).map(|i| format!("{base}-{i}")).collect(),
                };
                for p in &list {
                    self.pod_name(p, pod.span())?;
                    pods.insert(p.clone());
                }
                Action::AddPod { node, pods: list }
            }
            ActionKind::DelPod => {
                let pod = e.pod.as_ref().ok_or_else(|| need("pod"))?;
                if !pods.contains(pod.get_ref()) {
                    return Err(self.src.error(
                        pod.span(),
                        format!("pod {:?} is not added by an earlier add_pod", pod.get_ref()),
                    ));
                }
                Action::DelPod(pod.get_ref().clone())
            }
        };
        Ok(EventDef {
            at,
            action,
            line: self.src.line_of(&spanned.span()),
        })
    }

    fn check(
        &self,
        spanned: &Spanned<CheckSpec>,
        duration: Duration,
        pods: &BTreeSet<String>,
    ) -> Result<CheckDef, ScenarioError> {
        let c = spanned.get_ref();
        let at = match c.at.get_ref().as_str() {
            "end" => CheckAt::End,
            "always" => CheckAt::Always,
            _ => {
                let t = self.duration(&c.at)?;
                if t > duration {
                    return Err(self.src.error(
                        c.at.span(),
                        "check is after the end of the scenario (duration)",
                    ));
                }
                CheckAt::Time(t)
            }
        };
        let kind = c.expect.get_ref().as_str();
        let allowed: &[&str] = match kind {
            "converged" | "unique_ips" => &[],
            "allocated" | "pending" => &["pods"],
            "reachable" | "unreachable" => &["from", "to"],
            "gossip_bytes" => &["max_per_node_per_s"],
            other => {
                return Err(self.src.error(
                    c.expect.span(),
                    format!("unknown check {other:?}: use converged, unique_ips, allocated, pending, reachable, unreachable or gossip_bytes"),
                ));
            }
        };
        let present = [
            ("pods", c.pods.is_some()),
            ("from", c.from.is_some()),
            ("to", c.to.is_some()),
            ("max_per_node_per_s", c.max_per_node_per_s.is_some()),
        ];
        self.only_fields(spanned.span(), "expect", kind, &present, allowed)?;
        let pod = |p: &Spanned<String>| -> Result<String, ScenarioError> {
            if pods.contains(p.get_ref()) {
                Ok(p.get_ref().clone())
            } else {
                Err(self.src.error(
                    p.span(),
                    format!("pod {:?} is not added by any add_pod event", p.get_ref()),
                ))
            }
        };
        let pod_list =
            |l: &Option<Vec<Spanned<String>>>| -> Result<Option<Vec<String>>, ScenarioError> {
                l.as_ref().map(|l| l.iter().map(pod).collect()).transpose()
            };
        let need = |field: &str| {
            self.src
                .error(spanned.span(), format!("expect = {kind:?} needs `{field}`"))
        };
        let expect = match kind {
            "converged" => Expect::Converged,
            "unique_ips" => Expect::UniqueIps,
            "allocated" => Expect::Allocated(pod_list(&c.pods)?),
            "pending" => Expect::Pending(pod_list(&c.pods)?.ok_or_else(|| need("pods"))?),
            "reachable" => Expect::Reachable {
                from: c.from.as_ref().map(pod).transpose()?,
                to: c.to.as_ref().map(pod).transpose()?,
            },
            "unreachable" => Expect::Unreachable {
                from: pod(c.from.as_ref().ok_or_else(|| need("from"))?)?,
                to: pod(c.to.as_ref().ok_or_else(|| need("to"))?)?,
            },
            _ => {
                let max = c
                    .max_per_node_per_s
                    .as_ref()
                    .ok_or_else(|| need("max_per_node_per_s"))?;
                if max.get_ref().is_nan() || *max.get_ref() <= 0.0 {
                    return Err(self
                        .src
                        .error(max.span(), "max_per_node_per_s must be a positive number"));
                }
                Expect::GossipBytes {
                    max_per_node_per_s: *max.get_ref(),
                }
            }
        };
        Ok(CheckDef {
            at,
            expect,
            line: self.src.line_of(&spanned.span()),
        })
    }

    /// Refuses fields that do not apply to this kind of event or check.
    fn only_fields(
        &self,
        span: Range<usize>,
        key: &str,
        kind: &str,
        present: &[(&str, bool)],
        allowed: &[&str],
    ) -> Result<(), ScenarioError> {
        match present.iter().find(|(f, p)| *p && !allowed.contains(f)) {
            Some((field, _)) => Err(self.src.error(
                span,
                format!("field `{field}` does not apply to {key} = {kind:?}"),
            )),
            None => Ok(()),
        }
    }

    fn node(&self, names: &Names, name: &Spanned<String>) -> Result<usize, ScenarioError> {
        names.get(name.get_ref().as_str()).copied().ok_or_else(|| {
            self.src.error(
                name.span(),
                format!("no node is named {:?}", name.get_ref()),
            )
        })
    }

    fn pod_name(&self, pod: &str, span: Range<usize>) -> Result<(), ScenarioError> {
        let ok = !pod.is_empty()
            && pod.len() <= 200
            && pod
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if ok {
            Ok(())
        } else {
            Err(self.src.error(
                span,
                format!("pod name {pod:?} must be letters, digits, '-', '_' or '.'"),
            ))
        }
    }

    fn duration(&self, s: &Spanned<String>) -> Result<Duration, ScenarioError> {
        parse_duration(s.get_ref()).ok_or_else(|| {
            self.src.error(s.span(), format!("{:?} is not a duration: write a number and a unit, e.g. \"250ms\", \"5s\", \"2m\"", s.get_ref()))
        })
    }

    fn latency(&self, s: &Spanned<String>) -> Result<Latency, ScenarioError> {
        let text = s.get_ref();
        let bad = || {
            self.src.error(
                s.span(),
                format!("{text:?} is not a latency: write \"2ms\" or a range \"1ms..5ms\""),
            )
        };
        let (min, max) = match text.split_once("..") {
            Some((a, b)) => (
                parse_duration(a).ok_or_else(bad)?,
                parse_duration(b).ok_or_else(bad)?,
            ),
            None => {
                let d = parse_duration(text).ok_or_else(bad)?;
                (d, d)
            }
        };
        if min > max {
            return Err(self.src.error(
                s.span(),
                "latency range is empty: the first bound is above the second",
            ));
        }
        Ok(Latency { min, max })
    }

    fn rate(&self, r: &Spanned<f64>) -> Result<f64, ScenarioError> {
        let v = *r.get_ref();
        if (0.0..=1.0).contains(&v) {
            Ok(v)
        } else {
            Err(self.src.error(
                r.span(),
                format!("loss rate {v} is not a probability between 0 and 1"),
            ))
        }
    }

    fn secret(&self, s: &Spanned<String>) -> Result<String, ScenarioError> {
        weft_core::config::check_secret(s.get_ref().as_bytes())
            .map_err(|e| self.src.error(s.span(), e.to_string()))?;
        Ok(s.get_ref().clone())
    }

    fn cidr(&self, s: &Spanned<String>) -> Result<Ipv4Net, ScenarioError> {
        s.get_ref()
            .parse::<Ipv4Net>()
            .map(|n| n.trunc())
            .map_err(|_| {
                self.src.error(
                    s.span(),
                    format!(
                        "{:?} is not an IPv4 CIDR such as \"10.32.0.0/12\"",
                        s.get_ref()
                    ),
                )
            })
    }
}

fn default_latency() -> Latency {
    Latency {
        min: Duration::from_millis(1),
        max: Duration::from_millis(1),
    }
}

/// The most pods one `add_pod` may add with `count`, and all `add_pod`s
/// together: far beyond any cluster the simulator runs, and a file that
/// asks for billions gets an error, not an out-of-memory abort.
const MAX_POD_COUNT: u32 = 100_000;
const MAX_POD_ADDS: usize = 1_000_000;

/// "250ms", "5s", "1.5s", "2m", "1h".
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    let secs = value * scale;
    (secs.is_finite() && (0.0..1e9).contains(&secs)).then(|| Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "t"
duration = "10s"

[[nodes]]
name = "node1"
address = "192.168.1.11"

[[nodes]]
name = "node2"
address = "192.168.1.12"
"#;

    fn err(extra: &str) -> String {
        parse("t.toml", &format!("{MINIMAL}{extra}"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_documented_example_parses() {
        let text = r#"
name = "partition-heal"
about = "One node cut off, then healed: rings merge, every pod reachable."
seed = 1
duration = "90s"
ipam = "ring"
ipalloc_range = "10.32.0.0/12"
secret = "s3cret"

[network]
latency = "1ms..5ms"
loss = 0.0

[[nodes]]
name = "node1"
address = "192.168.1.11"
start = true
peers = ["node2"]

[[nodes]]
name = "node2"
address = "192.168.1.12"

[[nodes]]
name = "node3"
address = "192.168.1.13"

[[events]]
at = "10s"
do = "partition"
groups = [["node1"], ["node2", "node3"]]

[[checks]]
at = "60s"
expect = "converged"
"#;
        let s = parse("example.toml", text).unwrap();
        assert_eq!(s.nodes.len(), 3);
        assert_eq!(s.nodes[0].peers, Peers::Listed(vec![1]));
        assert_eq!(s.nodes[1].peers, Peers::Everyone);
        assert_eq!(s.nodes[0].peers.of(0, 3).collect::<Vec<_>>(), vec![1]);
        assert_eq!(s.nodes[1].peers.of(1, 3).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(
            s.latency,
            Latency {
                min: Duration::from_millis(1),
                max: Duration::from_millis(5)
            }
        );
        assert_eq!(
            s.events[0].action,
            Action::Partition(vec![vec![0], vec![1, 2]])
        );
        assert_eq!(s.checks[0].at, CheckAt::Time(Duration::from_secs(60)));
    }

    #[test]
    fn a_restore_needs_an_earlier_backup_of_the_node() {
        let event = |at: &str, what: &str| {
            format!("\n[[events]]\nat = \"{at}\"\ndo = \"{what}\"\nnodes = [\"node2\"]\n")
        };
        let e = err(&event("5s", "restore"));
        assert_eq!(
            e,
            "t.toml:13:1: restore of \"node2\" before any backup of it"
        );
        // Written first but due later: the time decides, not the order.
        let text = format!(
            "{MINIMAL}{}{}",
            event("9s", "restore"),
            event("5s", "backup")
        );
        let s = parse("t.toml", &text).unwrap();
        assert_eq!(s.events[0].action, Action::Backup(vec![1]));
        assert_eq!(s.events[1].action, Action::Restore(vec![1]));
    }

    #[test]
    fn unknown_keys_are_errors_with_their_position() {
        let e = err("\n[[checks]]\nat = \"end\"\nexpect = \"converged\"\nexpcet = 1\n");
        assert!(e.starts_with("t.toml:16:1: unknown field `expcet`"), "{e}");
    }

    #[test]
    fn mistakes_name_the_place_and_the_fix() {
        assert_eq!(
            err("\n[[events]]\nat = \"5 seconds\"\ndo = \"heal\"\n"),
            "t.toml:14:6: \"5 seconds\" is not a duration: write a number and a unit, e.g. \"250ms\", \"5s\", \"2m\""
        );
        assert_eq!(
            err("\n[[events]]\nat = \"5s\"\ndo = \"crash\"\nnodes = [\"node9\"]\n"),
            "t.toml:16:10: no node is named \"node9\""
        );
        assert!(
            err("\n[[events]]\nat = \"5s\"\ndo = \"explode\"\n")
                .ends_with("unknown event \"explode\": use start, crash, restart, wipe, backup, restore, remove, partition, cut, heal, loss, latency, add_pod or del_pod")
        );
        assert!(
            err("\n[[events]]\nat = \"5s\"\ndo = \"heal\"\nnodes = [\"node1\"]\n")
                .contains("field `nodes` does not apply to do = \"heal\"")
        );
        assert!(
            err("\n[[checks]]\nat = \"end\"\nexpect = \"pending\"\npods = [\"ghost\"]\n")
                .contains("pod \"ghost\" is not added by any add_pod event")
        );
        assert!(err("\n[network]\nloss = 1.5\n").contains("loss rate 1.5 is not a probability"));
        assert!(
            err("\n[[events]]\nat = \"20s\"\ndo = \"heal\"\n")
                .contains("after the end of the scenario")
        );
        assert_eq!(
            parse(
                "t.toml",
                &MINIMAL.replace("duration", "ipalloc_range = \"10.0.0.0/31\"\nduration")
            )
            .unwrap_err()
            .to_string(),
            "t.toml:3:17: allocation range 10.0.0.0/31 is too small: use a /30 or larger"
        );
        assert!(
            err("\n[[nodes]]\nname = \"node3\"\naddress = \"192.168.1.13\"\nsecret = \"\"\n")
                .starts_with("t.toml:16:10: the shared secret is empty")
        );
        let bad_toml = parse("t.toml", "name = \"x\"\nduration = \n").unwrap_err();
        assert_eq!((bad_toml.line, bad_toml.column), (2, 12), "{bad_toml}");
    }

    #[test]
    fn pods_expand_with_count() {
        let s = parse("t.toml", &format!("{MINIMAL}\n[[events]]\nat = \"1s\"\ndo = \"add_pod\"\nnode = \"node1\"\npod = \"web\"\ncount = 3\n")).unwrap();
        assert_eq!(
            s.events[0].action,
            Action::AddPod {
                node: 0,
                pods: vec!["web-1".into(), "web-2".into(), "web-3".into()]
            }
        );
    }

    #[test]
    fn a_file_asking_for_billions_of_pods_gets_an_error() {
        let add = |pod: &str, count: u64| {
            format!(
                "\n[[events]]\nat = \"1s\"\ndo = \"add_pod\"\nnode = \"node1\"\npod = \"{pod}\"\ncount = {count}\n"
            )
        };
        assert!(
            err(&add("web", 4_000_000_000))
                .contains("count 4000000000 is more than the 100000 pods one add_pod may add")
        );
        let eleven: String = (0..11).map(|i| add(&format!("p{i}"), 100_000)).collect();
        let e = err(&eleven);
        assert!(
            e.contains("the scenario adds more than 1000000 pods in all"),
            "{e}"
        );
        let ten: String = (0..10).map(|i| add(&format!("p{i}"), 100_000)).collect();
        assert!(parse("t.toml", &format!("{MINIMAL}{ten}")).is_ok());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// A scenario file is untrusted input: whatever a cut, a stray
        /// character or a changed value makes of a valid one, parsing
        /// answers with a scenario or an error, never a panic.
        #[test]
        fn mangled_files_are_errors_not_panics(
            cut in proptest::prelude::any::<proptest::sample::Index>(),
            len in 0usize..24,
            insert in "[\\[\\]=\"a-z0-9.,_ \n#{}-]{0,8}",
        ) {
            let text = format!("{MINIMAL}{LIBRARY_LIKE}");
            let cut = cut.index(text.len());
            let end = (cut + len).min(text.len());
            if text.is_char_boundary(cut) && text.is_char_boundary(end) {
                let mangled = format!("{}{insert}{}", &text[..cut], &text[end..]);
                let _ = parse("t.toml", &mangled);
            }
        }
    }

    #[test]
    fn the_mangling_starts_from_a_valid_file() {
        let s = parse("t.toml", &format!("{MINIMAL}{LIBRARY_LIKE}")).unwrap();
        assert_eq!((s.events.len(), s.checks.len()), (8, 2));
    }

    /// Every kind of event and check once, for the mangling above to cut.
    const LIBRARY_LIKE: &str = r#"
[network]
latency = "1ms..5ms"
loss = 0.1

[[events]]
at = "1s"
do = "add_pod"
node = "node1"
pod = "web"
count = 3

[[events]]
at = "2s"
do = "partition"
groups = [["node1"], ["node2"]]

[[events]]
at = "3s"
do = "cut"
a = "node1"
b = "node2"

[[events]]
at = "4s"
do = "loss"
rate = 0.3
nodes = ["node1"]

[[events]]
at = "5s"
do = "latency"
value = "10ms"

[[events]]
at = "6s"
do = "heal"

[[events]]
at = "7s"
do = "del_pod"
pod = "web-1"

[[events]]
at = "8s"
do = "crash"
nodes = ["node2"]

[[checks]]
at = "end"
expect = "reachable"
from = "web-2"
to = "web-3"

[[checks]]
at = "9s"
expect = "converged"
"#;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("-1s"), None);
    }
}
