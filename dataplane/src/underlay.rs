//! The node's own network, as the kernel holds it: interfaces with their
//! IPv4 networks and MTUs, and the IPv4 routing table. The agent refuses a
//! pod range that collides with it, and `weft doctor` reports on it.

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

/// One IPv4 route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: Ipv4Net,
    pub device: String,
    /// The next hop, for routes through a gateway.
    pub gateway: Option<Ipv4Addr>,
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

/// The main IPv4 routing table (empty if it cannot be read).
pub fn routes() -> Vec<Route> {
    routes_from("/proc/net/route")
}

/// The routes in a `/proc/net/route` file: the calling thread's network
/// namespace's with `/proc/thread-self/net/route`.
pub fn routes_from(path: &str) -> Vec<Route> {
    std::fs::read_to_string(path)
        .map(|text| parse_routes(&text))
        .unwrap_or_default()
}

/// `/proc/net/route`: a header line, then per route the device,
/// destination, gateway, flags, ..., mask, as little-endian hex.
fn parse_routes(text: &str) -> Vec<Route> {
    let hex = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.swap_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let device = fields.first()?.to_string();
            let destination = hex(fields.get(1)?)?;
            let gateway = hex(fields.get(2)?)?;
            let mask = hex(fields.get(7)?)?;
            let prefix = u32::from(mask).leading_ones() as u8;
            Some(Route {
                destination: Ipv4Net::new(destination, prefix).ok()?.trunc(),
                device,
                gateway: Some(gateway).filter(|g| !g.is_unspecified()),
            })
        })
        .collect()
}

/// Something of the node's own network inside the pod range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Collision {
    /// An interface's address (with its prefix) overlaps the range.
    Address { device: String, net: Ipv4Net },
    /// A route (not weft's) for part of the range.
    Route { device: String, net: Ipv4Net },
    /// The service range given with --service-cidr.
    Services(Ipv4Net),
}

impl std::fmt::Display for Collision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Collision::Address { device, net } => {
                write!(f, "{device} has address {net}, in or around it")
            }
            Collision::Route { device, net } => {
                write!(f, "the route {net} dev {device} overlaps it")
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
    fn the_routing_table_is_read_from_proc() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    garbage line\n";
        assert_eq!(
            parse_routes(text),
            vec![
                Route {
                    destination: net("0.0.0.0/0"),
                    device: "eth0".into(),
                    gateway: Some("192.168.1.1".parse().unwrap()),
                },
                Route {
                    destination: net("192.168.1.0/24"),
                    device: "eth0".into(),
                    gateway: None,
                },
            ]
        );
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
            },
            Route {
                destination: net("10.40.0.0/16"),
                device: "eth0".into(),
                gateway: None,
            },
            Route {
                destination: net("10.33.0.0/16"),
                device: "eth1".into(),
                gateway: None,
            },
            Route {
                destination: net("10.34.0.0/16"),
                device: "weft-vxlan".into(),
                gateway: None,
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
                    net: net("10.33.0.0/16")
                },
                Collision::Services(net("10.32.0.0/16")),
            ]
        );
        assert_eq!(
            found[0].to_string(),
            "eth0 has address 10.40.0.5/16, in or around it"
        );
        let clear = collisions(net("10.96.0.0/12"), &interfaces, &routes, None, &[]);
        assert_eq!(clear, vec![]);
    }
}
