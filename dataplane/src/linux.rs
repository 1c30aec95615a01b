//! The Linux kernel dataplane over rtnetlink.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::plan::{self, FdbEntry, NeighEntry, RouteEntry};
use crate::{
    BRIDGE_NAME, BridgeSpec, Dataplane, DataplaneError, Desired, Overlay, ROUTE_PROTOCOL,
    VXLAN_NAME, VxlanSpec, format_mac,
};

// errno values the kernel answers with, for hints and tolerated errors.
const EPERM: i32 = 1;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EOPNOTSUPP: i32 = 95;
const EADDRINUSE: i32 = 98;
const EADDRNOTAVAIL: i32 = 99;

/// The kernel dataplane: programs the bridge, the VXLAN device and its FDB,
/// neighbour and route entries through rtnetlink.
///
/// rtnetlink is async; this struct owns a small current-thread tokio runtime
/// and a netlink connection on it, and its [`Dataplane`] methods block on
/// that runtime. So:
///
/// - **Do not call its methods from async code** (inside a tokio runtime's
///   worker): tokio panics when a runtime is blocked on from within another.
///   Call it from a dedicated thread or through `tokio::task::spawn_blocking`.
/// - The netlink socket belongs to the **network namespace of the thread
///   that calls [`LinuxDataplane::new`]**, and `/proc/sys/net` (for IPv4
///   forwarding) is resolved in the namespace of the thread that calls
///   `reconcile`: keep both on threads in the same namespace.
pub struct LinuxDataplane {
    rt: tokio::runtime::Runtime,
    handle: Handle,
    /// Device names of the last successful reconcile, for `teardown`.
    bridge_name: String,
    vxlan_name: String,
}

impl LinuxDataplane {
    /// Opens a netlink connection in the calling thread's network namespace.
    pub fn new() -> Result<Self, DataplaneError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(DataplaneError::Setup)?;
        let (conn, handle) = {
            // The tokio netlink socket registers with the runtime's reactor.
            let _guard = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection().map_err(DataplaneError::Setup)?;
            (conn, handle)
        };
        // The connection task runs whenever a method blocks on the runtime.
        rt.spawn(conn);
        Ok(LinuxDataplane {
            rt,
            handle,
            bridge_name: BRIDGE_NAME.to_string(),
            vxlan_name: VXLAN_NAME.to_string(),
        })
    }
}

impl Dataplane for LinuxDataplane {
    fn reconcile(&mut self, desired: &Desired) -> Result<(), DataplaneError> {
        // Relayed prefixes arrive on weft-vxlan and leave through it again,
        // and pod traffic crosses from the bridge to weft-vxlan: both need
        // forwarding.
        crate::sysctl::enable_forwarding()?;
        self.rt.block_on(reconcile(&self.handle, desired))?;
        if let Some(b) = &desired.bridge {
            self.bridge_name = b.name.clone();
        }
        if let Some(v) = &desired.vxlan {
            self.vxlan_name = v.name.clone();
        }
        Ok(())
    }

    fn teardown(&mut self) -> Result<(), DataplaneError> {
        let names = [self.vxlan_name.clone(), self.bridge_name.clone()];
        self.rt.block_on(teardown(&self.handle, &names))
    }

    fn delete_device(&mut self, name: &str) -> Result<(), DataplaneError> {
        self.rt.block_on(async {
            let Some(link) = get_link(&self.handle, name).await? else {
                return Ok(());
            };
            match self.handle.link().del(link.index).execute().await {
                Err(e) if errno(&e) != Some(ENODEV) => Err(DataplaneError::Bridge {
                    name: name.to_string(),
                    action: "delete the pod device on",
                    reason: describe(&e),
                }),
                _ => Ok(()),
            }
        })
    }

    fn tune(&mut self, applied: &Desired) {
        if let Some(bridge) = &applied.bridge {
            crate::sysctl::answer_arp_for_remote_pods(&bridge.name);
        }
        crate::sysctl::let_iptables_see_bridged_traffic(applied);
        crate::sysctl::no_rp_filter_on_overlays(applied);
    }
}

async fn reconcile(h: &Handle, d: &Desired) -> Result<(), DataplaneError> {
    if let Some(b) = &d.bridge {
        ensure_bridge(h, b).await?;
    }
    let Some(vx) = &d.vxlan else {
        if let Some(sleeve) = &d.sleeve {
            return reconcile_sleeve(h, sleeve, d).await;
        }
        // No overlay: every weft route is stale.
        for r in &list_routes(h).await? {
            del_route(h, r).await?;
        }
        return Ok(());
    };
    // Read the entries only after the device is right: recreating it
    // flushes all its entries, a new MAC or MTU flushes its neighbours.
    let index = ensure_vxlan(h, vx).await?;
    // Routes towards peers VXLAN does not reach go into the sleeve.
    let sleeve_index = match &d.sleeve {
        Some(sleeve) => Some(ensure_sleeve(h, sleeve).await?),
        None => None,
    };
    if sleeve_index.is_none()
        && let Some(r) = d.routes.iter().find(|r| r.device == Overlay::Sleeve)
    {
        return Err(DataplaneError::Route {
            action: "add",
            prefix: r.prefix,
            next_hop: r.next_hop.to_string(),
            reason: "it should go into the sleeve, and there is no sleeve device".into(),
        });
    }
    let device_index = |device| match (device, sleeve_index) {
        (Overlay::Sleeve, Some(i)) => i,
        _ => index,
    };
    let current_routes = list_routes(h).await?;

    let neighbours = list_neighbours(h, index).await?;
    let mut peers = d.peers.clone();
    peers.extend(plan::held_peers(
        &d.held,
        &d.live,
        &d.peers,
        index,
        &current_routes,
        &neighbours,
    ));
    let fdb = plan::plan_fdb(&peers, &list_fdb(h, index).await?);
    let neigh = plan::plan_neighbours(&peers, &neighbours);
    let routes = plan::plan_routes(&d.routes, &d.held, &d.live, device_index, &current_routes);

    // Add before remove, so a route never points at a missing neighbour or
    // FDB entry while the plan is being applied.
    for e in &fdb.set {
        set_fdb(h, &vx.name, index, e).await?;
    }
    for n in &neigh.set {
        set_neighbour(h, &vx.name, index, n).await?;
    }
    set_routes(h, &routes.set, device_index).await?;
    for r in &routes.remove {
        del_route(h, r).await?;
    }
    for ip in &neigh.remove {
        del_neighbour(h, &vx.name, index, *ip).await?;
    }
    for e in &fdb.remove_remotes {
        del_fdb(h, &vx.name, index, e.mac, Some(e.dst)).await?;
    }
    for mac in &fdb.remove_macs {
        del_fdb(h, &vx.name, index, *mac, None).await?;
    }
    Ok(())
}

async fn teardown(h: &Handle, names: &[String]) -> Result<(), DataplaneError> {
    // Routes on the VXLAN device vanish with it; this catches any weft route
    // left on another device.
    for r in &list_routes(h).await? {
        del_route(h, r).await?;
    }
    for name in names {
        let Some(link) = get_link(h, name).await? else {
            continue;
        };
        match h.link().del(link.index).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(ENODEV) => {}
            Err(e) => {
                return Err(match link.kind {
                    Some(InfoKind::Vxlan) => DataplaneError::Vxlan {
                        name: name.clone(),
                        action: "delete",
                        reason: describe(&e),
                    },
                    _ => DataplaneError::Bridge {
                        name: name.clone(),
                        action: "delete",
                        reason: describe(&e),
                    },
                });
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Links

/// What weft needs to know about an existing device.
struct Link {
    index: u32,
    kind: Option<InfoKind>,
    mtu: Option<u32>,
    mac: Option<Vec<u8>>,
    up: bool,
    vxlan: Vec<InfoVxlan>,
}

impl Link {
    fn from_message(m: LinkMessage) -> Link {
        let mut link = Link {
            index: m.header.index,
            kind: None,
            mtu: None,
            mac: None,
            up: m.header.flags.contains(LinkFlags::Up),
            vxlan: Vec::new(),
        };
        for attr in m.attributes {
            match attr {
                LinkAttribute::Mtu(mtu) => link.mtu = Some(mtu),
                LinkAttribute::Address(mac) => link.mac = Some(mac),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(kind) => link.kind = Some(kind),
                            LinkInfo::Data(InfoData::Vxlan(v)) => link.vxlan = v,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// The device called `name`, or `None`.
async fn get_link(h: &Handle, name: &str) -> Result<Option<Link>, DataplaneError> {
    let mut stream = h.link().get().match_name(name).execute();
    match stream.try_next().await {
        Ok(Some(m)) => Ok(Some(Link::from_message(m))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(DataplaneError::Dump {
            what: "links",
            reason: describe(&e),
        }),
    }
}

/// Sets MTU and MAC where they differ and brings the device up. Both
/// bridges and VXLAN devices take a new MAC while up (taking the VXLAN
/// device down would flush its neighbours and routes).
async fn tune_link(
    h: &Handle,
    link: &Link,
    mtu: u32,
    mac: Option<&[u8]>,
) -> Result<(), rtnetlink::Error> {
    let mac_differs = mac.is_some_and(|m| link.mac.as_deref() != Some(m));
    if mac_differs || link.mtu != Some(mtu) || !link.up {
        let mut msg = LinkUnspec::new_with_index(link.index).mtu(mtu).up();
        if let Some(mac) = mac {
            msg = msg.address(mac.to_vec());
        }
        h.link().set(msg.build()).execute().await?;
    }
    Ok(())
}

async fn ensure_bridge(h: &Handle, b: &BridgeSpec) -> Result<(), DataplaneError> {
    let err = |action, e: &rtnetlink::Error| DataplaneError::Bridge {
        name: b.name.clone(),
        action,
        reason: describe(e),
    };
    let link = match get_link(h, &b.name).await? {
        Some(link) if link.kind == Some(InfoKind::Bridge) => link,
        Some(_) => {
            return Err(DataplaneError::Bridge {
                name: b.name.clone(),
                action: "use",
                reason: "a device with this name exists and is not a bridge".into(),
            });
        }
        None => {
            let msg = LinkBridge::new(&b.name).mtu(b.mtu).build();
            h.link()
                .add(msg)
                .execute()
                .await
                .map_err(|e| err("create", &e))?;
            get_link(h, &b.name)
                .await?
                .ok_or_else(|| DataplaneError::Bridge {
                    name: b.name.clone(),
                    action: "create",
                    reason: "the device vanished right after creation".into(),
                })?
        }
    };
    tune_link(h, &link, b.mtu, None)
        .await
        .map_err(|e| err("configure", &e))?;

    // The gateway address; any other IPv4 address on weft's bridge is stale
    // (a changed gateway). Stale ones go first: a new address in the same
    // subnet would be a secondary, and deleting the old primary deletes its
    // secondaries too.
    let addrs: Vec<AddressMessage> = h
        .address()
        .get()
        .set_link_index_filter(link.index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| DataplaneError::Dump {
            what: "bridge addresses",
            reason: describe(&e),
        })?;
    let mut have_gateway = false;
    for a in addrs {
        if a.header.family != AddressFamily::Inet {
            continue;
        }
        let ip = a.attributes.iter().find_map(|attr| match attr {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        if ip == Some(b.gateway.addr()) && a.header.prefix_len == b.gateway.prefix_len() {
            have_gateway = true;
            continue;
        }
        match h.address().del(a).execute().await {
            Err(e) if errno(&e) != Some(EADDRNOTAVAIL) => {
                return Err(err("remove a stale address from", &e));
            }
            _ => {}
        }
    }
    if !have_gateway {
        h.address()
            .add(
                link.index,
                IpAddr::V4(b.gateway.addr()),
                b.gateway.prefix_len(),
            )
            .execute()
            .await
            .map_err(|e| err("add the gateway address to", &e))?;
    }
    Ok(())
}

/// Attributes of an existing VXLAN device that can only be set at creation.
fn vxlan_matches(link: &Link, vx: &VxlanSpec, underlay: Option<u32>) -> bool {
    let has = |want: &InfoVxlan| link.vxlan.contains(want);
    has(&InfoVxlan::Id(vx.vni))
        && has(&InfoVxlan::Port(vx.port))
        && has(&InfoVxlan::Local(vx.local))
        && has(&InfoVxlan::Learning(false))
        && underlay.is_none_or(|i| has(&InfoVxlan::Link(i)))
}

/// Creates (or recreates) the VXLAN device and returns its index.
async fn ensure_vxlan(h: &Handle, vx: &VxlanSpec) -> Result<u32, DataplaneError> {
    let err = |action, reason| DataplaneError::Vxlan {
        name: vx.name.clone(),
        action,
        reason,
    };
    let underlay = match &vx.underlay_dev {
        Some(dev) => Some(
            get_link(h, dev)
                .await?
                .ok_or_else(|| DataplaneError::UnderlayNotFound(dev.clone()))?
                .index,
        ),
        None => None,
    };
    let mut existing = get_link(h, &vx.name).await?;
    if let Some(link) = &existing {
        if link.kind != Some(InfoKind::Vxlan) {
            return Err(err(
                "use",
                "a device with this name exists and is not a VXLAN device".into(),
            ));
        }
        if !vxlan_matches(link, vx, underlay) {
            // VNI, port, local address or underlay changed (e.g. the node's
            // IP did): those are fixed at creation. The FDB, neighbour and
            // route entries go with the old device and are re-added below.
            h.link()
                .del(link.index)
                .execute()
                .await
                .map_err(|e| err("delete the outdated", describe(&e)))?;
            existing = None;
        }
    }
    let link = match existing {
        Some(link) => link,
        None => {
            let mut b = LinkVxlan::new(&vx.name, vx.vni)
                .port(vx.port)
                .local(vx.local)
                // weft programs every FDB entry itself; see the crate docs.
                .learning(false)
                // No outer UDP checksum (Linux's own default for VXLAN over
                // IPv4, and flannel's): the inner packet carries its own,
                // and where the underlay cannot offload tunnel checksums
                // (veth) computing it costs ~6% of throughput.
                .udp_csum(false)
                .mtu(vx.mtu)
                .address(vx.mac.to_vec())
                .up();
            if let Some(i) = underlay {
                b = b.dev(i);
            }
            h.link()
                .add(b.build())
                .execute()
                .await
                .map_err(|e| err("create", vxlan_reason(&e, vx)))?;
            get_link(h, &vx.name)
                .await?
                .ok_or_else(|| err("create", "the device vanished right after creation".into()))?
        }
    };
    tune_link(h, &link, vx.mtu, Some(&vx.mac))
        .await
        .map_err(|e| err("configure", vxlan_reason(&e, vx)))?;
    Ok(link.index)
}

fn vxlan_reason(e: &rtnetlink::Error, vx: &VxlanSpec) -> String {
    let hint = match errno(e) {
        Some(EOPNOTSUPP) => " (is the vxlan kernel module loaded?)".to_string(),
        Some(EPERM) => " (the agent needs CAP_NET_ADMIN)".to_string(),
        Some(EEXIST) => format!(
            " (does another VXLAN device use VNI {} on UDP port {}?)",
            vx.vni, vx.port
        ),
        Some(EADDRINUSE) => format!(
            " (UDP port {} is in use, e.g. by Weave Net or another VXLAN device)",
            vx.port
        ),
        Some(EADDRNOTAVAIL) => format!(" (is {} an address of this node?)", vx.local),
        _ => String::new(),
    };
    format!("{}{hint}", describe(e))
}

// ---------------------------------------------------------------------------
// FDB

/// The neighbour-table entries of `family` on the device `index` (the
/// kernel dumps every device's).
async fn dump_neighbours(
    h: &Handle,
    family: AddressFamily,
    what: &'static str,
    index: u32,
) -> Result<Vec<NeighbourMessage>, DataplaneError> {
    let msgs: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(family)
        .execute()
        .try_collect()
        .await
        .map_err(|e| DataplaneError::Dump {
            what,
            reason: describe(&e),
        })?;
    Ok(msgs
        .into_iter()
        .filter(|m| m.header.ifindex == index)
        .collect())
}

async fn list_fdb(h: &Handle, index: u32) -> Result<Vec<FdbEntry>, DataplaneError> {
    // The dump covers every device's FDB (all bridge ports too): filter ours.
    let msgs = dump_neighbours(h, AddressFamily::Bridge, "FDB entries", index).await?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| {
            let mac = lladdr(&m.attributes)?;
            // An entry without an IPv4 remote is not one of weft's: as
            // 0.0.0.0 it never matches a peer (see plan_fdb).
            let dst = neighbour_ip(&m.attributes).unwrap_or(Ipv4Addr::UNSPECIFIED);
            Some(FdbEntry { mac, dst })
        })
        .collect())
}

async fn set_fdb(h: &Handle, dev: &str, index: u32, e: &FdbEntry) -> Result<(), DataplaneError> {
    // `bridge fdb replace MAC dev weft-vxlan dst IP self permanent`: for a
    // unicast MAC the kernel replaces the entry's remote in place.
    h.neighbours()
        .add_bridge(index, &e.mac)
        .flags(NeighbourFlags::Own)
        .destination(IpAddr::V4(e.dst))
        .replace()
        .execute()
        .await
        .map_err(|err| DataplaneError::Fdb {
            dev: dev.to_string(),
            action: "add",
            mac: format_mac(&e.mac),
            dst: e.dst.to_string(),
            reason: describe(&err),
        })
}

/// Deletes one remote of `mac` (`dst` given) or the whole entry.
async fn del_fdb(
    h: &Handle,
    dev: &str,
    index: u32,
    mac: [u8; 6],
    dst: Option<Ipv4Addr>,
) -> Result<(), DataplaneError> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.flags = NeighbourFlags::Own;
    msg.header.state = NeighbourState::Permanent;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    if let Some(dst) = dst {
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
    }
    match h.neighbours().del(msg).execute().await {
        Ok(()) => Ok(()),
        // Already gone (a `set` replaced that remote): that was the goal.
        Err(e) if errno(&e) == Some(ENOENT) => Ok(()),
        Err(e) => Err(DataplaneError::Fdb {
            dev: dev.to_string(),
            action: "remove",
            mac: format_mac(&mac),
            dst: dst.map_or("(all)".to_string(), |d| d.to_string()),
            reason: describe(&e),
        }),
    }
}

// ---------------------------------------------------------------------------
// Neighbours

async fn list_neighbours(h: &Handle, index: u32) -> Result<Vec<NeighEntry>, DataplaneError> {
    let msgs = dump_neighbours(h, AddressFamily::Inet, "neighbours", index).await?;
    Ok(msgs
        .into_iter()
        // Only PERMANENT entries are weft's; see plan_neighbours.
        .filter(|m| m.header.state == NeighbourState::Permanent)
        .filter_map(|m| {
            Some(NeighEntry {
                ip: neighbour_ip(&m.attributes)?,
                mac: lladdr(&m.attributes)?,
            })
        })
        .collect())
}

async fn set_neighbour(
    h: &Handle,
    dev: &str,
    index: u32,
    n: &NeighEntry,
) -> Result<(), DataplaneError> {
    // `ip neigh replace IP lladdr MAC dev weft-vxlan nud permanent`.
    h.neighbours()
        .add(index, IpAddr::V4(n.ip))
        .link_layer_address(&n.mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(|e| DataplaneError::Neighbour {
            dev: dev.to_string(),
            action: "add",
            ip: n.ip,
            mac: format_mac(&n.mac),
            reason: describe(&e),
        })
}

async fn del_neighbour(
    h: &Handle,
    dev: &str,
    index: u32,
    ip: Ipv4Addr,
) -> Result<(), DataplaneError> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.ifindex = index;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    match h.neighbours().del(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(ENOENT) => Ok(()),
        Err(e) => Err(DataplaneError::Neighbour {
            dev: dev.to_string(),
            action: "remove",
            ip,
            mac: "(any)".to_string(),
            reason: describe(&e),
        }),
    }
}

fn lladdr(attrs: &[NeighbourAttribute]) -> Option<[u8; 6]> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(mac) => mac.as_slice().try_into().ok(),
        _ => None,
    })
}

fn neighbour_ip(attrs: &[NeighbourAttribute]) -> Option<Ipv4Addr> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        // In AF_BRIDGE (FDB) messages netlink-packet-route leaves NDA_DST as
        // raw bytes: 4 of them are an IPv4 remote.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
        }
        _ => None,
    })
}

/// Pod routes into the sleeve's TUN device: the same `via <next hop>
/// onlink` routes as over VXLAN (a TUN device ignores the gateway; the
/// agent reads each packet and forwards it by its own table). Without
/// VXLAN every route goes there, whatever device it names.
async fn reconcile_sleeve(
    h: &Handle,
    sleeve: &crate::SleeveSpec,
    d: &Desired,
) -> Result<(), DataplaneError> {
    let index = ensure_sleeve(h, sleeve).await?;
    let current = list_routes(h).await?;
    let plan = plan::plan_routes(&d.routes, &d.held, &d.live, |_| index, &current);
    set_routes(h, &plan.set, |_| index).await?;
    for r in &plan.remove {
        del_route(h, r).await?;
    }
    Ok(())
}

/// Brings the sleeve's TUN device up with its MTU; returns its index.
async fn ensure_sleeve(h: &Handle, sleeve: &crate::SleeveSpec) -> Result<u32, DataplaneError> {
    let err = |action: &'static str, reason: String| DataplaneError::Sleeve {
        name: sleeve.name.clone(),
        action,
        reason,
    };
    let link = get_link(h, &sleeve.name)
        .await?
        .ok_or_else(|| err("use", "the agent has not created the TUN device".into()))?;
    tune_link(h, &link, sleeve.mtu, None)
        .await
        .map_err(|e| err("bring up", describe(&e)))?;
    Ok(link.index)
}

// ---------------------------------------------------------------------------
// Routes

/// Adds or replaces (atomically switching the next hop or device) pod
/// routes, each on the device `index` gives for it.
async fn set_routes(
    h: &Handle,
    routes: &[crate::PodRoute],
    index: impl Fn(Overlay) -> u32,
) -> Result<(), DataplaneError> {
    for r in routes {
        let msg = route_message(r.prefix, Some(r.next_hop), Some(index(r.device)), 0);
        h.route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| route_error("add", r.prefix, Some(r.next_hop), &e))?;
    }
    Ok(())
}

/// weft's routes (protocol [`ROUTE_PROTOCOL`]) in the main table, on any
/// device.
async fn list_routes(h: &Handle) -> Result<Vec<RouteEntry>, DataplaneError> {
    let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let msgs: Vec<RouteMessage> =
        h.route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(|e| DataplaneError::Dump {
                what: "routes",
                reason: describe(&e),
            })?;
    Ok(msgs.iter().filter_map(route_entry).collect())
}

fn route_entry(m: &RouteMessage) -> Option<RouteEntry> {
    if m.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL)
        || m.header.address_family != AddressFamily::Inet
    {
        return None;
    }
    // Tables above 255 are only in the attribute.
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table.into());
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut e = RouteEntry {
        prefix: Ipv4Net::default(),
        next_hop: None,
        oif: None,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
        metric: 0,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => e.next_hop = Some(*ip),
            RouteAttribute::Oif(i) => e.oif = Some(*i),
            RouteAttribute::Priority(p) => e.metric = *p,
            _ => {}
        }
    }
    e.prefix = Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?;
    Some(e)
}

/// `PREFIX [via NH] [dev OIF] [onlink] proto 177 metric METRIC` in the main
/// table.
fn route_message(
    prefix: Ipv4Net,
    next_hop: Option<Ipv4Addr>,
    oif: Option<u32>,
    metric: u32,
) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(prefix.network(), prefix.prefix_len())
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
    if let Some(nh) = next_hop {
        b = b.gateway(nh).onlink();
    }
    if let Some(i) = oif {
        b = b.output_interface(i);
    }
    if metric != 0 {
        b = b.priority(metric);
    }
    b.build()
}

async fn del_route(h: &Handle, r: &RouteEntry) -> Result<(), DataplaneError> {
    // Prefix, protocol and metric identify the route in the main table;
    // scope "nowhere" matches any scope (as `ip route del` does), so a
    // link-scope route of weft's goes too.
    let mut msg = route_message(r.prefix, None, None, r.metric);
    msg.header.scope = RouteScope::NoWhere;
    match h.route().del(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), Some(ESRCH | ENOENT)) => Ok(()),
        Err(e) => Err(route_error("remove", r.prefix, r.next_hop, &e)),
    }
}

fn route_error(
    action: &'static str,
    prefix: Ipv4Net,
    next_hop: Option<Ipv4Addr>,
    e: &rtnetlink::Error,
) -> DataplaneError {
    DataplaneError::Route {
        action,
        prefix,
        next_hop: next_hop.map_or("(none)".to_string(), |n| n.to_string()),
        reason: describe(e),
    }
}

// ---------------------------------------------------------------------------
// Errors

/// The errno of a kernel error answer.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().abs()),
        _ => None,
    }
}

/// "Operation not supported" rather than rtnetlink's "Received a netlink
/// error message Operation not supported (os error 95)".
fn describe(e: &rtnetlink::Error) -> String {
    match errno(e) {
        Some(code) => {
            let s = std::io::Error::from_raw_os_error(code).to_string();
            match s.rfind(" (os error") {
                Some(i) => s[..i].to_string(),
                None => s,
            }
        }
        None => e.to_string(),
    }
}
