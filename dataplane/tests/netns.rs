//! LinuxDataplane against a real kernel, inside throwaway network namespaces.
//!
//! Needs root (CI runs as root); without it every test prints a note and
//! passes. Each test creates its own namespace `weft-dp-test-<pid>-<n>`,
//! deletes it on the way out (even on failure), and sends no traffic.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use weft_dataplane::{
    BridgeSpec, Dataplane, DataplaneError, Desired, LinuxDataplane, Overlay, PodRoute,
    ROUTE_PROTOCOL, RemotePeer, SleeveSpec, VxlanSpec, format_mac, vtep_mac,
};

/// A network namespace that is deleted when dropped.
struct Netns {
    name: String,
}

impl Netns {
    /// `None` (after printing why) when the test can't run here.
    fn new() -> Option<Netns> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("note: not root, skipping the netns test");
            return None;
        }
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "weft-dp-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    /// `ip -n NS ARGS...`, which must succeed; returns stdout.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip -n NS ARGS...`, failing or not.
    fn ip_ok(&self, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("run ip")
            .status
            .success()
    }

    fn fdb(&self) -> Vec<String> {
        lines(&run(
            "bridge",
            &["-n", &self.name, "fdb", "show", "dev", "weft-vxlan"],
        ))
    }

    fn neigh(&self) -> Vec<String> {
        lines(&self.ip(&["neigh", "show", "dev", "weft-vxlan"]))
    }

    fn weft_routes(&self) -> Vec<String> {
        lines(&self.ip(&["route", "show", "proto", &ROUTE_PROTOCOL.to_string()]))
    }

    /// A veth underlay `ul0` (peer `ul1`) with 192.168.77.1/24.
    fn underlay(&self) {
        self.ip(&["link", "add", "ul0", "type", "veth", "peer", "name", "ul1"]);
        self.ip(&["addr", "add", "192.168.77.1/24", "dev", "ul0"]);
        self.ip(&["link", "set", "ul0", "up"]);
        self.ip(&["link", "set", "ul1", "up"]);
    }

    /// Runs `f` on a thread inside the namespace (so a LinuxDataplane made
    /// there talks to this namespace's kernel state).
    fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let file = File::open(&path).expect("open netns file");
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            });
            t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Non-empty lines, trimmed and sorted.
fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

fn ul(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, d)
}

fn peer(d: u8, name: u64) -> RemotePeer {
    RemotePeer {
        underlay: ul(d),
        mac: vtep_mac(name),
    }
}

fn route(prefix: &str, d: u8) -> PodRoute {
    PodRoute {
        prefix: prefix.parse().unwrap(),
        next_hop: ul(d),
        device: Overlay::Fastdp,
    }
}

fn host_ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap()
}

fn desired() -> Desired {
    let mut vx = VxlanSpec::new(ul(1), 1450, vtep_mac(1));
    vx.underlay_dev = Some("ul0".into());
    Desired {
        sleeve: None,
        bridge: Some(BridgeSpec {
            name: "weft".into(),
            gateway: "10.32.0.1/12".parse().unwrap(),
            mtu: 1450,
        }),
        vxlan: Some(vx),
        peers: vec![peer(2, 2), peer(3, 3)],
        routes: vec![
            route("10.32.16.0/20", 2),
            route("10.32.32.0/20", 3),
            // Owned by a peer behind .2: relayed.
            route("10.32.48.0/20", 2),
        ],
        held: vec![],
        live: vec![],
    }
}

fn fdb_line(mac_name: u64, d: u8) -> String {
    format!(
        "{} dst {} self permanent",
        format_mac(&vtep_mac(mac_name)),
        ul(d)
    )
}

fn neigh_line(d: u8, mac_name: u64) -> String {
    format!(
        "{} lladdr {} PERMANENT",
        ul(d),
        format_mac(&vtep_mac(mac_name))
    )
}

fn route_line(prefix: &str, d: u8) -> String {
    format!("{prefix} via {} dev weft-vxlan onlink", ul(d))
}

#[test]
fn reconcile_diffs_and_teardown() {
    let Some(ns) = Netns::new() else { return };
    let forward_before = host_ip_forward();
    ns.underlay();
    // Someone else's route, on another device: weft must leave it alone.
    ns.ip(&[
        "route",
        "add",
        "172.16.0.0/16",
        "via",
        "192.168.77.254",
        "dev",
        "ul0",
    ]);

    ns.run_inside(|| {
        let mut dp = LinuxDataplane::new().unwrap();
        let mut d = desired();
        dp.reconcile(&d).unwrap();

        let link = ns.ip(&["-d", "link", "show", "weft-vxlan"]);
        for want in [
            &format!(
                "vxlan id {} local 192.168.77.1 dev ul0",
                weft_dataplane::DEFAULT_VNI
            ),
            "dstport 6784",
            "nolearning",
            "mtu 1450",
            &format!("link/ether {}", format_mac(&vtep_mac(1))),
            "UP",
        ] {
            assert!(link.contains(want), "{want:?} not in {link}");
        }
        let bridge = ns.ip(&["-d", "link", "show", "weft"]);
        assert!(
            bridge.contains("bridge") && bridge.contains("mtu 1450") && bridge.contains("UP"),
            "{bridge}"
        );
        assert!(
            ns.ip(&["-4", "addr", "show", "dev", "weft"])
                .contains("inet 10.32.0.1/12")
        );
        let forward = run(
            "ip",
            &[
                "netns",
                "exec",
                &ns.name,
                "cat",
                "/proc/sys/net/ipv4/ip_forward",
            ],
        );
        assert_eq!(forward.trim(), "1");

        assert_eq!(
            ns.fdb(),
            lines(&format!("{}\n{}", fdb_line(2, 2), fdb_line(3, 3)))
        );
        assert_eq!(ns.neigh(), vec![neigh_line(2, 2), neigh_line(3, 3)]);
        assert_eq!(
            ns.weft_routes(),
            vec![
                route_line("10.32.16.0/20", 2),
                route_line("10.32.32.0/20", 3),
                route_line("10.32.48.0/20", 2),
            ]
        );

        // Twice in a row: a no-op, no error.
        dp.reconcile(&d).unwrap();
        dp.reconcile(&d).unwrap();
        assert_eq!(ns.neigh().len(), 2);
        assert_eq!(ns.weft_routes().len(), 3);

        // Peer .3 left, .4 joined, .2 restarted with a new name (new MAC);
        // 10.32.32.0/20 is gone and 10.32.48.0/20 is now relayed via .4.
        d.peers = vec![peer(2, 22), peer(4, 4)];
        d.routes = vec![route("10.32.16.0/20", 2), route("10.32.48.0/20", 4)];
        dp.reconcile(&d).unwrap();
        assert_eq!(
            ns.fdb(),
            lines(&format!("{}\n{}", fdb_line(22, 2), fdb_line(4, 4)))
        );
        assert_eq!(ns.neigh(), vec![neigh_line(2, 22), neigh_line(4, 4)]);
        assert_eq!(
            ns.weft_routes(),
            vec![
                route_line("10.32.16.0/20", 2),
                route_line("10.32.48.0/20", 4)
            ]
        );

        // This node's own VTEP MAC and the MTUs change (the kernel flushes
        // the device's neighbours on a MAC change: they must come back), and
        // the gateway moves.
        {
            let vx = d.vxlan.as_mut().unwrap();
            vx.mac = vtep_mac(11);
            vx.mtu = 1400;
            let b = d.bridge.as_mut().unwrap();
            b.mtu = 1400;
            b.gateway = "10.32.0.2/12".parse().unwrap();
        }
        dp.reconcile(&d).unwrap();
        let link = ns.ip(&["-d", "link", "show", "weft-vxlan"]);
        assert!(
            link.contains(&format!("link/ether {}", format_mac(&vtep_mac(11)))),
            "{link}"
        );
        assert!(link.contains("mtu 1400") && link.contains("UP"), "{link}");
        assert!(ns.ip(&["link", "show", "weft"]).contains("mtu 1400"));
        let addrs = ns.ip(&["-4", "addr", "show", "dev", "weft"]);
        assert!(
            addrs.contains("inet 10.32.0.2/12") && !addrs.contains("10.32.0.1/"),
            "{addrs}"
        );
        assert_eq!(ns.fdb().len(), 2);
        assert_eq!(ns.neigh(), vec![neigh_line(2, 22), neigh_line(4, 4)]);
        assert_eq!(ns.weft_routes().len(), 2);

        // A weft route left on another device (an older agent's) is stale.
        ns.ip(&[
            "route",
            "add",
            "10.40.0.0/16",
            "dev",
            "ul0",
            "proto",
            &ROUTE_PROTOCOL.to_string(),
        ]);
        dp.reconcile(&d).unwrap();
        assert_eq!(ns.weft_routes().len(), 2);

        assert!(!ns.ip(&["route", "show", "172.16.0.0/16"]).trim().is_empty());

        dp.teardown().unwrap();
        assert!(!ns.ip_ok(&["link", "show", "weft-vxlan"]));
        assert!(!ns.ip_ok(&["link", "show", "weft"]));
        assert!(ns.weft_routes().is_empty());
        assert!(ns.ip_ok(&["link", "show", "ul0"]));
        assert!(!ns.ip(&["route", "show", "172.16.0.0/16"]).trim().is_empty());
        // Tearing down twice is fine.
        dp.teardown().unwrap();
    });
    assert_eq!(
        host_ip_forward(),
        forward_before,
        "the host's forwarding changed"
    );
}

#[test]
fn recreates_vxlan_when_local_address_changes() {
    let Some(ns) = Netns::new() else { return };
    ns.underlay();
    ns.ip(&["addr", "add", "192.168.77.9/24", "dev", "ul0"]);
    ns.run_inside(|| {
        let mut dp = LinuxDataplane::new().unwrap();
        let mut d = desired();
        dp.reconcile(&d).unwrap();
        d.vxlan.as_mut().unwrap().local = ul(9);
        dp.reconcile(&d).unwrap();
        let link = ns.ip(&["-d", "link", "show", "weft-vxlan"]);
        assert!(link.contains("local 192.168.77.9"), "{link}");
        // Entries flushed with the old device are back.
        assert_eq!(ns.fdb().len(), 2);
        assert_eq!(ns.neigh().len(), 2);
        assert_eq!(ns.weft_routes().len(), 3);

        // Without a VXLAN device weft's routes go (the device stays until
        // teardown).
        d.vxlan = None;
        dp.reconcile(&d).unwrap();
        assert!(ns.weft_routes().is_empty());
        dp.teardown().unwrap();
        assert!(!ns.ip_ok(&["link", "show", "weft-vxlan"]));
    });
}

#[test]
fn vxlan_failures_are_reported_as_vxlan_errors() {
    let Some(ns) = Netns::new() else { return };
    ns.underlay();
    ns.run_inside(|| {
        let mut dp = LinuxDataplane::new().unwrap();

        let mut d = desired();
        d.vxlan.as_mut().unwrap().underlay_dev = Some("nosuchdev".into());
        let err = dp.reconcile(&d).unwrap_err();
        assert!(matches!(err, DataplaneError::UnderlayNotFound(_)), "{err}");

        // A device of another kind holds the name: not weft's to delete.
        ns.ip(&["link", "add", "weft-vxlan", "type", "veth", "peer", "name", "x1"]);
        let err = dp.reconcile(&desired()).unwrap_err();
        assert!(matches!(err, DataplaneError::Vxlan { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "cannot use VXLAN device weft-vxlan: a device with this name exists and is not a VXLAN device"
        );
        assert!(ns.ip(&["-d", "link", "show", "weft-vxlan"]).contains("veth"));
        ns.ip(&["link", "del", "weft-vxlan"]);

        // Another VXLAN device already has this VNI and port.
        ns.ip(&[
            "link", "add", "other-vx", "type", "vxlan", "id",
            &weft_dataplane::DEFAULT_VNI.to_string(), "dstport", "6784", "local", "192.168.77.1",
        ]);
        ns.ip(&["link", "set", "other-vx", "up"]);
        let err = dp.reconcile(&desired()).unwrap_err();
        eprintln!("conflicting VXLAN device: {err}");
        assert!(matches!(err, DataplaneError::Vxlan { action: "create", .. }), "{err}");
        assert!(err.to_string().starts_with("cannot create VXLAN device weft-vxlan: "), "{err}");
    });
}

#[test]
fn routes_mix_vxlan_and_the_sleeve_per_prefix() {
    let Some(ns) = Netns::new() else { return };
    ns.underlay();
    // The agent creates the TUN device (it holds its descriptor).
    ns.ip(&["tuntap", "add", "dev", "weft-sleeve", "mode", "tun"]);
    ns.run_inside(|| {
        let mut dp = LinuxDataplane::new().unwrap();
        let mut d = desired();
        d.sleeve = Some(SleeveSpec {
            name: "weft-sleeve".into(),
            mtu: 1450,
        });
        dp.reconcile(&d).unwrap();
        // Peer .2 stops answering over VXLAN: its prefixes (the relayed
        // one too) go into the sleeve; its FDB and neighbour entries stay.
        for r in d.routes.iter_mut().filter(|r| r.next_hop == ul(2)) {
            r.device = Overlay::Sleeve;
        }
        dp.reconcile(&d).unwrap();
        // No process holds the TUN device here, so the kernel marks its
        // routes "linkdown".
        let sleeve = |p: &str| format!("{p} via {} dev weft-sleeve onlink linkdown", ul(2));
        let want = vec![
            sleeve("10.32.16.0/20"),
            route_line("10.32.32.0/20", 3),
            sleeve("10.32.48.0/20"),
        ];
        assert_eq!(ns.weft_routes(), want);
        assert_eq!(ns.fdb().len(), 2);
        assert_eq!(ns.neigh().len(), 2);
        // Idempotent, and back to VXLAN.
        dp.reconcile(&d).unwrap();
        assert_eq!(ns.weft_routes(), want);
        dp.reconcile(&desired()).unwrap();
        assert_eq!(ns.weft_routes().len(), 3);
        assert!(ns.weft_routes().iter().all(|r| r.contains("weft-vxlan")));
        // A sleeve route without a sleeve device is refused.
        let mut d = desired();
        d.routes[0].device = Overlay::Sleeve;
        let err = dp.reconcile(&d).unwrap_err();
        assert!(matches!(err, DataplaneError::Route { .. }), "{err}");
        dp.teardown().unwrap();
    });
}

/// Peer .3's agent restarts: nothing is desired for it any more, but its
/// prefix is held, so the kernel keeps its route, neighbour and FDB entries
/// (a fresh agent on this node, with nothing desired yet, keeps them too);
/// once the prefix is neither desired nor held, they go.
#[test]
fn held_prefixes_keep_their_route_and_next_hop() {
    let Some(ns) = Netns::new() else { return };
    ns.underlay();
    ns.run_inside(|| {
        let full = desired();
        LinuxDataplane::new().unwrap().reconcile(&full).unwrap();
        let (routes, fdb, neigh) = (ns.weft_routes(), ns.fdb(), ns.neigh());
        let mut away = desired();
        away.peers.retain(|p| p.underlay != ul(3));
        away.routes.retain(|r| r.next_hop != ul(3));
        away.held = vec!["10.32.32.0/20".parse().unwrap()];
        // A new dataplane, as a restarted agent has.
        let mut dp = LinuxDataplane::new().unwrap();
        dp.reconcile(&away).unwrap();
        assert_eq!(ns.weft_routes(), routes);
        assert_eq!(ns.fdb(), fdb);
        assert_eq!(ns.neigh(), neigh);
        // Back: nothing changes.
        dp.reconcile(&full).unwrap();
        assert_eq!(ns.weft_routes(), routes);
        // Forgotten: route, neighbour and FDB entry go.
        away.held.clear();
        dp.reconcile(&away).unwrap();
        assert_eq!(
            ns.weft_routes(),
            vec![
                route_line("10.32.16.0/20", 2),
                route_line("10.32.48.0/20", 2)
            ]
        );
        assert_eq!(ns.fdb(), lines(&fdb_line(2, 2)));
        assert_eq!(ns.neigh(), vec![neigh_line(2, 2)]);
        dp.teardown().unwrap();
    });
}

/// `nft -j list ruleset` in `ns`: the objects (tables, chains, rules).
fn nft_objects(ns: &Netns) -> Vec<serde_json::Value> {
    let out = run(
        "ip",
        &["netns", "exec", &ns.name, "nft", "-j", "list", "ruleset"],
    );
    let json: serde_json::Value = serde_json::from_str(&out).expect("nft -j output");
    json["nftables"].as_array().cloned().unwrap_or_default()
}

/// weft's objects of `kind` ("table", "chain", "rule").
fn weft_objects(objects: &[serde_json::Value], kind: &str) -> Vec<serde_json::Value> {
    objects
        .iter()
        .filter_map(|o| o.get(kind))
        .filter(|o| {
            o["family"] == "ip" && o[if kind == "table" { "name" } else { "table" }] == "weft"
        })
        .cloned()
        .collect()
}

#[test]
fn masquerade_table_is_replaced_atomically_and_removed() {
    use weft_dataplane::nftables::{install_masquerade, remove_masquerade};
    let Some(ns) = Netns::new() else { return };
    // Someone else's table: weft must leave it alone.
    run(
        "ip",
        &[
            "netns",
            "exec",
            &ns.name,
            "nft",
            "add table inet other; add chain inet other c",
        ],
    );
    ns.run_inside(|| {
        install_masquerade("10.40.0.0/16".parse().unwrap()).unwrap();
        install_masquerade("10.32.0.0/12".parse().unwrap()).unwrap();
        install_masquerade("10.32.0.0/12".parse().unwrap()).unwrap();
    });
    let objects = nft_objects(&ns);
    assert_eq!(weft_objects(&objects, "table").len(), 1);
    let chains = weft_objects(&objects, "chain");
    assert_eq!(chains.len(), 1, "{chains:?}");
    let chain = &chains[0];
    assert_eq!(
        (
            &chain["name"],
            &chain["type"],
            &chain["hook"],
            &chain["prio"],
            &chain["policy"]
        ),
        (
            &"postrouting".into(),
            &"nat".into(),
            &"postrouting".into(),
            &100.into(),
            &"accept".into()
        )
    );
    let rules = weft_objects(&objects, "rule");
    assert_eq!(rules.len(), 1, "{rules:?}");
    let prefix = serde_json::json!({"prefix": {"addr": "10.32.0.0", "len": 12}});
    let addr = |field: &str| serde_json::json!({"payload": {"protocol": "ip", "field": field}});
    assert_eq!(
        rules[0]["expr"],
        serde_json::json!([
            {"match": {"op": "==", "left": addr("saddr"), "right": prefix}},
            {"match": {"op": "!=", "left": addr("daddr"), "right": prefix}},
            {"masquerade": null},
        ])
    );
    let other = |objects: &[serde_json::Value]| {
        objects
            .iter()
            .filter(|o| o["table"]["name"] == "other" || o["chain"]["table"] == "other")
            .count()
    };
    assert_eq!(other(&objects), 2);

    ns.run_inside(|| {
        remove_masquerade().unwrap();
        // Removing what is not there is fine.
        remove_masquerade().unwrap();
    });
    let objects = nft_objects(&ns);
    assert!(weft_objects(&objects, "table").is_empty());
    assert_eq!(other(&objects), 2);
}

/// Policy routing keeps routes in tables of their own: the underlay facts
/// see them (the pod range check must), with their table, and skip the
/// kernel's local table.
#[test]
fn routes_of_every_table_are_read() {
    let Some(ns) = Netns::new() else { return };
    ns.underlay();
    ns.ip(&["route", "add", "10.33.0.0/16", "dev", "ul0", "table", "100"]);
    ns.ip(&[
        "route",
        "add",
        "10.34.0.0/16",
        "via",
        "192.168.77.2",
        "dev",
        "ul0",
    ]);
    let routes = ns.run_inside(weft_dataplane::underlay::routes);
    let find = |net: &str| {
        routes
            .iter()
            .find(|r| r.destination == net.parse::<ipnet::Ipv4Net>().unwrap())
    };
    let policy = find("10.33.0.0/16").expect("the table 100 route");
    assert_eq!((policy.table, policy.device.as_str()), (100, "ul0"));
    let main = find("10.34.0.0/16").expect("the main table route");
    assert_eq!(main.table, weft_dataplane::underlay::MAIN_TABLE);
    assert_eq!(main.gateway, Some(ul(2)));
    assert!(
        routes.iter().all(|r| !r.destination.addr().is_loopback()),
        "{routes:?}"
    );
}

mod policy {
    use super::*;
    use weft_dataplane::nftables::policy::TABLE;
    use weft_dataplane::nftables::{install_policy, remove_policy};
    use weft_policy::{
        AddrRange, Grant, Isolation, PodRules, PolicyRef, PortRange, Ports, Protocol, RuleSet,
    };

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn range(first: &str, last: &str) -> AddrRange {
        AddrRange {
            first: ip(first),
            last: ip(last),
        }
    }

    fn isolation(grants: Vec<Grant>) -> Option<Isolation> {
        Some(Isolation {
            policies: vec![PolicyRef {
                namespace: "default".into(),
                name: "p".into(),
            }],
            grants,
        })
    }

    fn pod(ingress: Option<Isolation>, egress: Option<Isolation>) -> PodRules {
        PodRules {
            namespace: "default".into(),
            name: "pod".into(),
            ingress,
            egress,
        }
    }

    /// Pod .2 takes TCP 8080-8090 and UDP 53 from 10.32.0.0/24 and anything
    /// from 10.40.0.0/16; pod .3 may send only to 10.32.0.2 on TCP 80; pod
    /// .4 is isolated both ways with nothing allowed.
    fn sample() -> RuleSet {
        let ports = Ports::Only(vec![
            PortRange {
                protocol: Protocol::Tcp,
                first: 8080,
                last: 8090,
            },
            PortRange {
                protocol: Protocol::Udp,
                first: 53,
                last: 53,
            },
        ]);
        let mut rules = RuleSet::default();
        rules.pods.insert(
            ip("10.32.0.2"),
            pod(
                isolation(vec![
                    Grant {
                        peers: range("10.32.0.0", "10.32.0.255"),
                        ports,
                    },
                    Grant {
                        peers: range("10.40.0.0", "10.40.255.255"),
                        ports: Ports::Any,
                    },
                ]),
                None,
            ),
        );
        let to_80 = Ports::Only(vec![PortRange {
            protocol: Protocol::Tcp,
            first: 80,
            last: 80,
        }]);
        rules.pods.insert(
            ip("10.32.0.3"),
            pod(
                None,
                isolation(vec![Grant {
                    peers: range("10.32.0.2", "10.32.0.2"),
                    ports: to_80,
                }]),
            ),
        );
        rules
            .pods
            .insert(ip("10.32.0.4"), pod(isolation(vec![]), isolation(vec![])));
        rules.pods.insert(ip("10.32.0.5"), pod(None, None));
        rules
    }

    fn nft_text(ns: &Netns) -> String {
        run("ip", &["netns", "exec", &ns.name, "nft", "list", "ruleset"])
    }

    /// The elements of each set of weft's policy table, as `nft -j` spells
    /// them, by set name.
    fn policy_sets(ns: &Netns) -> BTreeMap<String, Vec<serde_json::Value>> {
        nft_objects(ns)
            .iter()
            .filter_map(|o| o.get("set"))
            .filter(|s| s["family"] == "ip" && s["table"] == TABLE)
            .map(|s| {
                let elems = s["elem"].as_array().cloned().unwrap_or_default();
                (s["name"].as_str().unwrap().to_string(), elems)
            })
            .collect()
    }

    fn concat(fields: serde_json::Value) -> serde_json::Value {
        serde_json::json!({ "concat": fields })
    }

    fn prefix(addr: &str, len: u8) -> serde_json::Value {
        serde_json::json!({"prefix": {"addr": addr, "len": len}})
    }

    #[test]
    fn policy_table_holds_the_rule_sets_elements_and_is_replaced_whole() {
        use serde_json::json;
        let Some(ns) = Netns::new() else { return };
        // Someone else's table and weft's masquerade: left alone.
        run(
            "ip",
            &["netns", "exec", &ns.name, "nft", "add table inet other"],
        );
        ns.run_inside(|| {
            weft_dataplane::nftables::install_masquerade("10.32.0.0/12".parse().unwrap()).unwrap();
            install_policy(&sample()).unwrap();
        });
        let sets = policy_sets(&ns);
        let expected: BTreeMap<String, Vec<serde_json::Value>> = [
            ("ingress_isolated", vec![json!("10.32.0.2"), json!("10.32.0.4")]),
            (
                "ingress_ports",
                vec![
                    concat(json!(["10.32.0.2", prefix("10.32.0.0", 24), "tcp", {"range": [8080, 8090]}])),
                    concat(json!(["10.32.0.2", prefix("10.32.0.0", 24), "udp", 53])),
                ],
            ),
            (
                "ingress_any",
                vec![concat(json!(["10.32.0.2", prefix("10.40.0.0", 16)]))],
            ),
            ("egress_isolated", vec![json!("10.32.0.3"), json!("10.32.0.4")]),
            (
                "egress_ports",
                vec![concat(json!(["10.32.0.3", "10.32.0.2", "tcp", 80]))],
            ),
            ("egress_any", vec![]),
        ]
        .into_iter()
        .map(|(name, elems)| (name.to_string(), elems))
        .collect();
        assert_eq!(sets, expected);
        let objects = nft_objects(&ns);
        let chains: Vec<(String, serde_json::Value)> = objects
            .iter()
            .filter_map(|o| o.get("chain"))
            .filter(|c| c["table"] == TABLE)
            .map(|c| (c["name"].as_str().unwrap().to_string(), c["hook"].clone()))
            .collect();
        assert_eq!(
            chains,
            [
                ("ingress".to_string(), json!(null)),
                ("egress".to_string(), json!(null)),
                ("forward".to_string(), json!("forward")),
                ("input".to_string(), json!("input")),
            ]
        );
        let rules = |chain: &str| {
            objects
                .iter()
                .filter_map(|o| o.get("rule"))
                .filter(|r| r["table"] == TABLE && r["chain"] == chain)
                .count()
        };
        assert_eq!(
            [
                rules("ingress"),
                rules("egress"),
                rules("forward"),
                rules("input")
            ],
            [3, 3, 3, 2]
        );
        let tables = |objects: &[serde_json::Value]| -> Vec<String> {
            objects
                .iter()
                .filter_map(|o| o.get("table"))
                .map(|t| {
                    format!(
                        "{} {}",
                        t["family"].as_str().unwrap(),
                        t["name"].as_str().unwrap()
                    )
                })
                .collect()
        };
        assert_eq!(
            tables(&objects),
            ["inet other", "ip weft", "ip weft_policy"]
        );

        // Installing the same rules again changes nothing.
        let before = nft_text(&ns);
        ns.run_inside(|| install_policy(&sample()).unwrap());
        assert_eq!(nft_text(&ns), before);

        // Changed rules replace the old ones whole: .2 is no longer
        // isolated, .6 is, .3 may now send anywhere on UDP 53.
        let mut changed = sample();
        changed.pods.get_mut(&ip("10.32.0.2")).unwrap().ingress = None;
        changed
            .pods
            .insert(ip("10.32.0.6"), pod(isolation(vec![]), None));
        changed.pods.get_mut(&ip("10.32.0.3")).unwrap().egress = isolation(vec![Grant {
            peers: range("0.0.0.0", "255.255.255.255"),
            ports: Ports::Only(vec![PortRange {
                protocol: Protocol::Udp,
                first: 53,
                last: 53,
            }]),
        }]);
        ns.run_inside(|| install_policy(&changed).unwrap());
        let sets = policy_sets(&ns);
        assert_eq!(
            sets["ingress_isolated"],
            [json!("10.32.0.4"), json!("10.32.0.6")]
        );
        assert_eq!(sets["ingress_ports"], Vec::<serde_json::Value>::new());
        assert_eq!(sets["ingress_any"], Vec::<serde_json::Value>::new());
        assert_eq!(
            sets["egress_ports"],
            [concat(json!([
                "10.32.0.3",
                prefix("0.0.0.0", 0),
                "udp",
                53
            ]))]
        );

        // No rules: the same table, empty sets, everything passes.
        ns.run_inside(|| install_policy(&RuleSet::default()).unwrap());
        assert!(policy_sets(&ns).values().all(Vec::is_empty));
        assert_eq!(policy_sets(&ns).len(), 6);

        ns.run_inside(|| {
            remove_policy().unwrap();
            remove_policy().unwrap();
        });
        assert_eq!(tables(&nft_objects(&ns)), ["inet other", "ip weft"]);
    }

    /// A node namespace with bridge `br0` (10.32.0.1/24) and one veth per
    /// pod namespace, the pods at 10.32.0.2, .3, ...; false (after a
    /// note) when bridged packets would not pass nftables here.
    fn bridged_pods(node: &Netns, pods: &[&Netns]) -> bool {
        node.ip(&["link", "add", "br0", "type", "bridge"]);
        node.ip(&["addr", "add", "10.32.0.1/24", "dev", "br0"]);
        node.ip(&["link", "set", "br0", "up"]);
        for (i, pod) in pods.iter().enumerate() {
            let host = format!("veth{i}");
            let addr = format!("10.32.0.{}/24", i + 2);
            node.ip(&[
                "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
            ]);
            node.ip(&["link", "set", &host, "master", "br0", "up"]);
            pod.ip(&["addr", "add", &addr, "dev", "eth0"]);
            pod.ip(&["link", "set", "eth0", "up"]);
        }
        let call_iptables = node
            .run_inside(|| std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables"));
        let on = call_iptables.is_ok_and(|v| v.trim() == "1");
        if !on {
            eprintln!("note: no br_netfilter with bridge-nf-call-iptables=1 here, skipping");
        }
        on
    }

    /// What the drop rule of `chain` (ingress, egress) has counted.
    fn drops(ns: &Netns, chain: &str) -> u64 {
        nft_objects(ns)
            .iter()
            .filter_map(|o| o.get("rule"))
            .filter(|r| r["table"] == TABLE && r["chain"] == chain)
            .filter_map(|r| r["expr"][0]["counter"]["packets"].as_u64())
            .sum()
    }

    /// B takes TCP 8080 from A only.
    fn b_takes_8080_from_a(extra: Option<u16>) -> RuleSet {
        let mut ports = vec![PortRange {
            protocol: Protocol::Tcp,
            first: 8080,
            last: 8080,
        }];
        ports.extend(extra.map(|port| PortRange {
            protocol: Protocol::Tcp,
            first: port,
            last: port,
        }));
        let mut rules = RuleSet::default();
        rules.pods.insert(
            ip("10.32.0.3"),
            pod(
                isolation(vec![Grant {
                    peers: range("10.32.0.2", "10.32.0.2"),
                    ports: Ports::Only(ports),
                }]),
                None,
            ),
        );
        rules
    }

    /// Real packets between two pods bridged on one node (br_netfilter
    /// passes them through the forward hook): the allowed port connects,
    /// the other does not, and an established connection outlives a
    /// re-install. The refused connect is seen by its timeout and by the
    /// drop counter.
    #[test]
    fn bridged_pods_are_filtered_and_established_connections_survive() {
        use std::io::{Read, Write};
        use std::net::TcpStream;
        use std::time::Duration;
        let (Some(node), Some(a), Some(b)) = (Netns::new(), Netns::new(), Netns::new()) else {
            return;
        };
        if !bridged_pods(&node, &[&a, &b]) {
            return;
        }
        node.run_inside(|| install_policy(&b_takes_8080_from_a(None)).unwrap());
        let listeners = [listen(&b, "10.32.0.3", 8080), listen(&b, "10.32.0.3", 8081)];
        let connect = |port: u16| connect(&a, "10.32.0.3", port);
        assert_eq!(drops(&node, "ingress"), 0);
        assert!(connect(8081).is_err(), "8081 is not granted");
        assert!(drops(&node, "ingress") > 0, "the refused SYN was counted");
        let mut client = connect(8080).expect("8080 is granted");
        let (mut server, _) = listeners[0].accept().unwrap();
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let echo = |client: &mut TcpStream, server: &mut TcpStream, byte: u8| {
            client.write_all(&[byte]).unwrap();
            let mut got = [0];
            server.read_exact(&mut got).unwrap();
            server.write_all(&got).unwrap();
            client.read_exact(&mut got).unwrap();
            got[0]
        };
        assert_eq!(echo(&mut client, &mut server, 1), 1);
        // New rules that still allow it: the connection carries on.
        node.run_inside(|| install_policy(&b_takes_8080_from_a(Some(9000))).unwrap());
        assert_eq!(echo(&mut client, &mut server, 2), 2);
        // Without the table everything connects again.
        node.run_inside(|| remove_policy().unwrap());
        assert!(connect(8081).is_ok());
    }

    /// A batch the kernel refuses (overlapping intervals: no RuleSet from
    /// `compile` has them) is a typed error naming the step, and leaves
    /// the previous table whole: the batch is one transaction.
    #[test]
    fn a_refused_batch_leaves_the_previous_table_in_force() {
        let Some(ns) = Netns::new() else { return };
        ns.run_inside(|| install_policy(&sample()).unwrap());
        let before = nft_text(&ns);
        let mut overlapping = sample();
        let grant = |first, last| Grant {
            peers: range(first, last),
            ports: Ports::Any,
        };
        overlapping.pods.insert(
            ip("10.32.0.9"),
            pod(
                isolation(vec![
                    grant("10.1.0.0", "10.1.0.9"),
                    grant("10.1.0.5", "10.1.0.20"),
                ]),
                None,
            ),
        );
        let refused = ns.run_inside(|| install_policy(&overlapping)).unwrap_err();
        let DataplaneError::Nftables { table, step, .. } = &refused else {
            panic!("{refused:?}")
        };
        assert_eq!(
            (*table, *step),
            (TABLE, "add the elements of set ingress_any"),
            "{refused}"
        );
        assert_eq!(nft_text(&ns), before);
    }

    /// TCP connect from `from` to `to`:`port`, given up after 2 s.
    fn connect(from: &Netns, to: &str, port: u16) -> std::io::Result<std::net::TcpStream> {
        let to = std::net::SocketAddr::from((ip(to), port));
        from.run_inside(|| {
            std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2))
        })
    }

    fn listen(ns: &Netns, addr: &str, port: u16) -> std::net::TcpListener {
        ns.run_inside(|| std::net::TcpListener::bind((ip(addr), port)).unwrap())
    }

    /// A pod isolated for egress reaches only its grant, through the
    /// forward hook (another pod) and the input hook (its node), while
    /// replies to connections others open to it pass (conntrack).
    #[test]
    fn egress_isolation_covers_pods_and_the_node_but_not_replies() {
        let (Some(node), Some(a), Some(b)) = (Netns::new(), Netns::new(), Netns::new()) else {
            return;
        };
        if !bridged_pods(&node, &[&a, &b]) {
            return;
        }
        let mut rules = RuleSet::default();
        rules.pods.insert(
            ip("10.32.0.2"),
            pod(
                None,
                isolation(vec![Grant {
                    peers: range("10.32.0.3", "10.32.0.3"),
                    ports: Ports::Only(vec![PortRange {
                        protocol: Protocol::Tcp,
                        first: 8080,
                        last: 8080,
                    }]),
                }]),
            ),
        );
        node.run_inside(|| install_policy(&rules).unwrap());
        let _b = [listen(&b, "10.32.0.3", 8080), listen(&b, "10.32.0.3", 8081)];
        let _node = listen(&node, "10.32.0.1", 8082);
        let _a = listen(&a, "10.32.0.2", 8083);
        assert!(connect(&a, "10.32.0.3", 8080).is_ok());
        assert_eq!(drops(&node, "egress"), 0);
        assert!(connect(&a, "10.32.0.3", 8081).is_err(), "not granted");
        let after_pod = drops(&node, "egress");
        assert!(after_pod > 0);
        assert!(
            connect(&a, "10.32.0.1", 8082).is_err(),
            "the node is no grant"
        );
        assert!(drops(&node, "egress") > after_pod);
        // B may open a connection to A: A's answers are replies.
        assert!(connect(&b, "10.32.0.2", 8083).is_ok());
    }

    /// More elements than one message holds and a batch larger than the
    /// socket's default buffer: 1,000 pods with 12 port ranges each.
    #[test]
    fn a_large_rule_set_is_installed_in_one_batch() {
        let Some(ns) = Netns::new() else { return };
        let mut rules = RuleSet::default();
        for i in 0..1000u32 {
            let ports: Vec<PortRange> = (0..12)
                .map(|p| PortRange {
                    protocol: Protocol::Tcp,
                    first: 1000 + 10 * p,
                    last: 1000 + 10 * p + 5,
                })
                .collect();
            let grant = Grant {
                peers: range("10.32.0.0", "10.47.255.255"),
                ports: Ports::Only(ports),
            };
            let addr = Ipv4Addr::from(u32::from(ip("10.32.0.0")) + i + 1);
            rules.pods.insert(addr, pod(isolation(vec![grant]), None));
        }
        assert!(
            weft_dataplane::nftables::policy::policy_batch(&rules)
                .bytes
                .len()
                > 600_000
        );
        ns.run_inside(|| install_policy(&rules).unwrap());
        let sets = policy_sets(&ns);
        assert_eq!(sets["ingress_isolated"].len(), 1000);
        assert_eq!(sets["ingress_ports"].len(), 12_000);
    }
}
