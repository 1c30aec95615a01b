//! The pod's network plumbing over rtnetlink: a veth pair with the host
//! end on the bridge and the pod end, addressed and routed, in the pod's
//! network namespace. Work inside the namespace runs on a thread that
//! entered it, with its own netlink socket.

use crate::spec::{Attached, CniError, code};
use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteAttribute;
use rtnetlink::{
    Handle, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

/// What ADD sets up.
pub struct Plan<'a> {
    pub netns: &'a Path,
    pub bridge: &'a str,
    pub host_ifname: String,
    pub ifname: &'a str,
    pub mtu: u32,
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub hairpin: bool,
}

/// The host end's name: stable per attachment, so retries and DEL find it.
pub fn host_ifname(attachment: &str) -> String {
    format!("vethwf{:08x}", fnv(attachment) as u32)
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn netlink_error(what: &str, e: impl std::fmt::Display) -> CniError {
    CniError::new(code::NETLINK, format!("cannot {what}: {e}"))
}

fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| CniError::new(code::IO, format!("cannot start: {e}")))
}

/// Runs `op` with a netlink handle in the current namespace.
fn here<T, F, Fut>(op: F) -> Result<T, CniError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, CniError>>,
{
    let rt = runtime()?;
    rt.block_on(async {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| netlink_error("open netlink", e))?;
        tokio::spawn(conn);
        op(handle).await
    })
}

/// Runs `op` with a netlink handle inside the namespace at `netns`.
fn inside<T, F, Fut>(netns: &Path, op: F) -> Result<T, CniError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, CniError>>,
{
    let file = open_netns(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                CniError::new(
                    code::IO,
                    format!("cannot enter network namespace {}: {e}", netns.display()),
                )
            })?;
            here(op)
        })
        .join()
        .unwrap_or_else(|_| Err(CniError::new(code::IO, "namespace worker panicked")))
    })
}

/// Checks that `netns` is a network namespace this process can enter, by
/// entering it on a throwaway thread: the one test that is exact (a
/// regular file or another kind of namespace opens fine, and only fails
/// once ADD has taken an address and made a veth).
pub fn check_netns(netns: &Path) -> Result<(), CniError> {
    let file = open_netns(netns)?;
    let entered = std::thread::scope(|s| {
        s.spawn(|| nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET))
            .join()
    });
    let why = match entered {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(nix::errno::Errno::EINVAL)) => "it is not a network namespace".to_string(),
        Ok(Err(e)) => format!("cannot enter it: {e}"),
        Err(_) => "the namespace check panicked".to_string(),
    };
    Err(CniError::new(
        code::INVALID_ENV,
        format!("CNI_NETNS={}: {why}", netns.display()),
    ))
}

pub fn open_netns(netns: &Path) -> Result<std::fs::File, CniError> {
    std::fs::File::open(netns).map_err(|e| {
        CniError::new(
            code::INVALID_ENV,
            format!(
                "CNI_NETNS={}: cannot open the network namespace: {e}",
                netns.display()
            ),
        )
    })
}

async fn link(h: &Handle, name: &str) -> Result<Option<LinkMessage>, CniError> {
    match h.link().get().match_name(name).execute().try_next().await {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
        Err(e) => Err(netlink_error(&format!("look up {name}"), e)),
    }
}

fn mac_of(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(
                mac.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

/// ADD's plumbing. On failure nothing is left behind.
pub fn attach(plan: &Plan) -> Result<Attached, CniError> {
    let netns = open_netns(plan.netns)?;
    let host = here(|h| async move {
        let bridge = link(&h, plan.bridge).await?.ok_or_else(|| {
            CniError::new(
                code::TRY_AGAIN,
                format!(
                    "bridge {} does not exist yet: the weft agent creates it once this node has address space",
                    plan.bridge
                ),
            )
        })?;
        // A leftover of an earlier, interrupted ADD.
        if let Some(old) = link(&h, &plan.host_ifname).await? {
            let _ = h.link().del(old.header.index).execute().await;
        }
        // The pod end is born in the pod's namespace under its final name:
        // moving and renaming it afterwards costs the kernel far more.
        let pod_end = LinkMessageBuilder::<LinkUnspec>::new()
            .name(plan.ifname.to_string())
            .mtu(plan.mtu)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(plan.host_ifname.clone())
            .mtu(plan.mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(pod_end)))
            .build();
        h.link().add(veth).execute().await.map_err(|e| {
            let hint = match &e {
                rtnetlink::Error::NetlinkError(m) if m.raw_code() == -17 => {
                    format!(" ({} already exists in the pod's namespace)", plan.ifname)
                }
                _ => String::new(),
            };
            netlink_error(&format!("create the veth pair{hint}"), e)
        })?;
        let attached = async {
            let host = link(&h, &plan.host_ifname)
                .await?
                .ok_or_else(|| netlink_error("find the new veth", "it vanished"))?;
            h.link()
                .set(
                    LinkUnspec::new_with_index(host.header.index)
                        .controller(bridge.header.index)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| netlink_error(&format!("attach the veth to {}", plan.bridge), e))?;
            if plan.hairpin {
                h.link()
                    .set_port(LinkBridgePort::new(host.header.index).hairpin(true).build())
                    .execute()
                    .await
                    .map_err(|e| netlink_error("set hairpin mode", e))?;
            }
            Ok::<_, CniError>(mac_of(&host))
        };
        match attached.await {
            Ok(mac) => Ok(mac),
            Err(e) => {
                if let Ok(Some(l)) = link(&h, &plan.host_ifname).await {
                    let _ = h.link().del(l.header.index).execute().await;
                }
                Err(e)
            }
        }
    })?;
    let (ifname, address, gateway) = (plan.ifname, plan.address, plan.gateway);
    let pod = inside(plan.netns, |h| async move {
        let pod_end = link(&h, ifname)
            .await?
            .ok_or_else(|| netlink_error("find the veth in the pod", "it is missing"))?;
        let index = pod_end.header.index;
        h.address()
            .add(index, IpAddr::V4(address.addr()), address.prefix_len())
            .execute()
            .await
            .map_err(|e| netlink_error(&format!("assign {address}"), e))?;
        h.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| netlink_error("bring the pod interface up", e))?;
        h.route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(gateway)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| netlink_error(&format!("add the default route via {gateway}"), e))?;
        Ok(mac_of(&pod_end))
    });
    let mac = match pod {
        Ok(mac) => mac,
        Err(e) => {
            let _ = remove_host_end(&plan.host_ifname);
            return Err(e);
        }
    };
    Ok(Attached {
        host_ifname: plan.host_ifname.clone(),
        host_mac: host,
        ifname: plan.ifname.to_string(),
        mac,
        sandbox: plan.netns.display().to_string(),
        address: plan.address,
        gateway: plan.gateway,
    })
}

/// Deletes the host end (and so the pair); fine if it is gone.
pub fn remove_host_end(host_ifname: &str) -> Result<(), CniError> {
    here(|h| async move {
        if let Some(l) = link(&h, host_ifname).await? {
            match h.link().del(l.header.index).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => {}
                Err(e) => return Err(netlink_error(&format!("delete {host_ifname}"), e)),
            }
        }
        Ok(())
    })
}

/// What the pod's interface holds, for CHECK.
#[derive(Debug, PartialEq, Eq)]
pub struct Observed {
    pub addresses: Vec<Ipv4Net>,
    pub default_gateway: Option<Ipv4Addr>,
}

pub fn observe(netns: &Path, ifname: &str) -> Result<Observed, CniError> {
    inside(netns, |h| async move {
        let l = link(&h, ifname).await?.ok_or_else(|| {
            CniError::new(
                code::UNKNOWN_CONTAINER,
                format!("interface {ifname} is missing from the pod's namespace"),
            )
        })?;
        let mut addresses = Vec::new();
        let mut stream = h
            .address()
            .get()
            .set_link_index_filter(l.header.index)
            .execute();
        while let Some(m) = stream
            .try_next()
            .await
            .map_err(|e| netlink_error("list addresses", e))?
        {
            for a in &m.attributes {
                if let rtnetlink::packet_route::address::AddressAttribute::Address(IpAddr::V4(ip)) =
                    a
                    && let Ok(net) = Ipv4Net::new(*ip, m.header.prefix_len)
                {
                    addresses.push(net);
                }
            }
        }
        let mut default_gateway = None;
        let mut routes = h
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(r) = routes
            .try_next()
            .await
            .map_err(|e| netlink_error("list routes", e))?
        {
            if r.header.destination_prefix_length != 0 {
                continue;
            }
            for a in &r.attributes {
                if let RouteAttribute::Gateway(
                    rtnetlink::packet_route::route::RouteAddress::Inet(gw),
                ) = a
                {
                    default_gateway = Some(*gw);
                }
            }
        }
        Ok(Observed {
            addresses,
            default_gateway,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_valid_and_distinct() {
        let a = host_ifname("c1/eth0");
        assert_eq!(a, host_ifname("c1/eth0"));
        assert_ne!(a, host_ifname("c2/eth0"));
        assert!(a.len() <= 15, "{a}");
    }
}
