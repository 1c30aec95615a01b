//! The node's own network, as the kernel holds it: interfaces with their
//! IPv4 networks and MTUs, and the IPv4 routes of every routing table. The
//! agent refuses a pod range that collides with it, and `weft doctor`
//! reports on it.

use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// One network interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mtu: Option<u32>,
    /// Its IPv4 addresses, with their prefix lengths.
    pub addrs: Vec<Ipv4Net>,
}

/// The main routing table's number (`ip route` shows it by default).
pub const MAIN_TABLE: u32 = 254;
/// The local table's: the kernel's routes for the node's own addresses.
const LOCAL_TABLE: u32 = 255;

/// One IPv4 route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: Ipv4Net,
    pub device: String,
    /// The next hop, for routes through a gateway.
    pub gateway: Option<Ipv4Addr>,
    /// Its routing table: [`MAIN_TABLE`], or another one policy routing
    /// (`ip rule`) sends traffic to.
    pub table: u32,
}

/// The node's interfaces, by name (empty if they cannot be read).
pub fn interfaces() -> BTreeMap<String, Interface> {
    let mut out: BTreeMap<String, Interface> = BTreeMap::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for a in addrs {
        let entry = out
            .entry(a.interface_name.clone())
            .or_insert_with(|| Interface {
                mtu: device_mtu(&a.interface_name),
                name: a.interface_name.clone(),
                addrs: Vec::new(),
            });
        let ip = a.address.and_then(|s| s.as_sockaddr_in().map(|s| s.ip()));
        let mask = a.netmask.and_then(|s| s.as_sockaddr_in().map(|s| s.ip()));
        if let (Some(ip), Some(mask)) = (ip, mask) {
            let prefix = u32::from(mask).leading_ones() as u8;
            if let Ok(net) = Ipv4Net::new(ip, prefix) {
                entry.addrs.push(net);
            }
        }
    }
    out
}

/// A device's MTU from sysfs.
pub fn device_mtu(name: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The interface holding `ip`, if any holds it: the one VXLAN sends
/// through, whose MTU bounds the pods'.
pub fn holding(ip: Ipv4Addr) -> Option<Interface> {
    interfaces()
        .into_values()
        .find(|i| i.addrs.iter().any(|a| a.addr() == ip))
}

/// The MTU of the interface holding `ip`, if any holds it.
pub fn mtu_holding(ip: Ipv4Addr) -> Option<u32> {
    holding(ip)?.mtu
}

/// The IPv4 unicast routes of every table but the local one (policy
/// routing keeps routes in tables of their own, which /proc/net/route
/// does not show), read over rtnetlink in the calling thread's network
/// namespace; empty if they cannot be read.
pub fn routes() -> Vec<Route> {
    // A thread of its own: the caller may be inside an async runtime, and
    // a new thread keeps the caller's network namespace.
    std::thread::scope(|s| s.spawn(dump_routes).join().unwrap_or_default())
}

fn dump_routes() -> Vec<Route> {
    use futures_util::TryStreamExt;
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    else {
        return Vec::new();
    };
    rt.block_on(async {
        let Ok((connection, handle, _)) = rtnetlink::new_connection() else {
            return Vec::new();
        };
        tokio::spawn(connection);
        let query = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build();
        let messages: Vec<_> = handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .unwrap_or_default();
        messages.iter().filter_map(route).collect()
    })
}

/// A unicast route of a table other than the local one, from its message.
fn route(m: &rtnetlink::packet_route::route::RouteMessage) -> Option<Route> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteType};
    if m.header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(m.header.table);
    let (mut destination, mut gateway, mut device) = (Ipv4Addr::UNSPECIFIED, None, None);
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => destination = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            RouteAttribute::Oif(index) => device = device_name(*index),
            // Tables above 255 are only in the attribute.
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    if table == LOCAL_TABLE {
        return None;
    }
    Some(Route {
        destination: Ipv4Net::new(destination, m.header.destination_prefix_length).ok()?,
        device: device.unwrap_or_default(),
        gateway,
        table,
    })
}

/// The name of the interface with index `index`.
fn device_name(index: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has room for IF_NAMESIZE bytes, as if_indextoname
    // requires; it writes a NUL-terminated name or returns NULL.
    let found = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if found.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Something of the node's own network inside the pod range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Collision {
    /// An interface's address (with its prefix) overlaps the range.
    Address { device: String, net: Ipv4Net },
    /// A route (not weft's) for part of the range.
    Route {
        device: String,
        net: Ipv4Net,
        table: u32,
    },
    /// The service range given with --service-cidr.
    Services(Ipv4Net),
}

impl std::fmt::Display for Collision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Collision::Address { device, net } => {
                write!(f, "{device} has address {net}, in or around it")
            }
            Collision::Route { device, net, table } => {
                write!(f, "the route {net} dev {device}")?;
                if *table != MAIN_TABLE {
                    write!(f, " table {table}")?;
                }
                write!(f, " overlaps it")
            }
            Collision::Services(net) => write!(f, "the service range {net} overlaps it"),
        }
    }
}

fn overlap(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// What of the node's network collides with `range`. Weft's own devices
/// (`ours`) are left out, and so is the default route, which covers
/// everything without claiming anything.
pub fn collisions<'a>(
    range: Ipv4Net,
    interfaces: impl IntoIterator<Item = &'a Interface>,
    routes: &[Route],
    services: Option<Ipv4Net>,
    ours: &[&str],
) -> Vec<Collision> {
    let foreign = |device: &str| !ours.contains(&device) && device != "lo";
    let mut out: Vec<Collision> = interfaces
        .into_iter()
        .filter(|i| foreign(&i.name))
        .flat_map(|i| i.addrs.iter().map(move |net| (i.name.clone(), *net)))
        .filter(|(_, net)| overlap(range, *net))
        .map(|(device, net)| Collision::Address { device, net })
        .collect();
    let on_interfaces: Vec<Ipv4Net> = out
        .iter()
        .filter_map(|c| match c {
            Collision::Address { net, .. } => Some(net.trunc()),
            _ => None,
        })
        .collect();
    out.extend(
        routes
            .iter()
            .filter(|r| foreign(&r.device) && r.destination.prefix_len() > 0)
            .filter(|r| overlap(range, r.destination))
            // An interface's own network route says nothing new.
            .filter(|r| !on_interfaces.contains(&r.destination))
            .map(|r| Collision::Route {
                device: r.device.clone(),
                net: r.destination,
                table: r.table,
            }),
    );
    out.extend(
        services
            .filter(|s| overlap(range, *s))
            .map(Collision::Services),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_mtu_is_found_by_address() {
        let mtu = mtu_holding("127.0.0.1".parse().unwrap()).expect("lo holds 127.0.0.1");
        assert!(mtu >= 1500, "{mtu}");
        assert_eq!(mtu_holding("192.0.2.99".parse().unwrap()), None);
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn collisions_name_the_device_route_or_service_range() {
        let range = net("10.32.0.0/12");
        let interfaces = [
            Interface {
                name: "eth0".into(),
                mtu: Some(1500),
                addrs: vec![net("10.40.0.5/16")],
            },
            Interface {
                name: "weft".into(),
                mtu: Some(1450),
                addrs: vec![net("10.32.0.1/12")],
            },
            Interface {
                name: "eth1".into(),
                mtu: Some(1500),
                addrs: vec![net("192.168.1.11/24")],
            },
        ];
        let routes = [
            Route {
                destination: net("0.0.0.0/0"),
                device: "eth1".into(),
                gateway: None,
                table: MAIN_TABLE,
            },
            Route {
                destination: net("10.40.0.0/16"),
                device: "eth0".into(),
                gateway: None,
                table: MAIN_TABLE,
            },
            Route {
                destination: net("10.33.0.0/16"),
                device: "eth1".into(),
                gateway: None,
                table: 100,
            },
            Route {
                destination: net("10.34.0.0/16"),
                device: "weft-vxlan".into(),
                gateway: None,
                table: MAIN_TABLE,
            },
        ];
        let found = collisions(
            range,
            &interfaces,
            &routes,
            Some(net("10.32.0.0/16")),
            &["weft", "weft-vxlan"],
        );
        assert_eq!(
            found,
            vec![
                Collision::Address {
                    device: "eth0".into(),
                    net: net("10.40.0.5/16")
                },
                Collision::Route {
                    device: "eth1".into(),
                    net: net("10.33.0.0/16"),
                    table: 100,
                },
                Collision::Services(net("10.32.0.0/16")),
            ]
        );
        assert_eq!(
            found[0].to_string(),
            "eth0 has address 10.40.0.5/16, in or around it"
        );
        assert_eq!(
            found[1].to_string(),
            "the route 10.33.0.0/16 dev eth1 table 100 overlaps it"
        );
        let clear = collisions(net("10.96.0.0/12"), &interfaces, &routes, None, &[]);
        assert_eq!(clear, vec![]);
    }
}
