//! UDP system calls the sleeve batches with: sending many equal-sized
//! datagrams in one `sendmsg` (UDP GSO, `UDP_SEGMENT`), receiving the
//! kernel's coalesced datagrams in one `recvmsg` (UDP GRO), and larger
//! socket buffers. std offers none of these, so they call libc directly.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

/// From linux/udp.h (not in the libc crate for glibc targets).
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Most datagrams the kernel takes in one GSO send (UDP_MAX_SEGMENTS).
pub const MAX_SEGMENTS: usize = 64;
/// Most UDP payload in one send, even a GSO one: the outer IPv4 packet
/// holds at most 65,535 bytes, 28 of them headers.
pub const MAX_GSO_BYTES: usize = 65_535 - 28;

fn set_int_option(
    socket: &UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the fd is open for the socket's lifetime; the option value
    // is a c_int we own, and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to hand over coalesced datagrams (with their segment
/// size in a control message) instead of one `recvmsg` per datagram.
pub fn enable_gro(socket: &UdpSocket) -> io::Result<()> {
    set_int_option(socket, libc::SOL_UDP, UDP_GRO, 1)
}

/// Socket buffers of `bytes` each way, so bursts of 64 KB sends are not
/// dropped: beyond the system's limit when root (`*BUFFORCE`), else up to
/// it.
pub fn grow_buffers(socket: &UdpSocket, bytes: libc::c_int) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if set_int_option(socket, libc::SOL_SOCKET, force, bytes).is_err() {
            let _ = set_int_option(socket, libc::SOL_SOCKET, plain, bytes);
        }
    }
}

fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for
            // sockaddr_in (that is its purpose).
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET);
            // storage is aligned for it.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddrV4::new(ip, u16::from_be(sin.sin_port)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6 (family AF_INET6).
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(SocketAddrV6::new(ip, port, sin6.sin6_flowinfo, sin6.sin6_scope_id).into())
        }
        _ => None,
    }
}

/// Room for one control message carrying an int (UDP_GRO) or a u16
/// (UDP_SEGMENT), aligned as `cmsghdr` requires.
#[repr(C, align(8))]
struct ControlBuffer([u8; 64]);

/// Sends `bytes` to `to` as datagrams of `segment` bytes each (the last
/// may be shorter) in one system call: the kernel splits them (UDP GSO).
pub fn send_segments(
    socket: &UdpSocket,
    bytes: &[u8],
    segment: u16,
    to: SocketAddr,
) -> io::Result<()> {
    let (mut addr, addr_len) = to_sockaddr(to);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut control = ControlBuffer([0; 64]);
    // SAFETY: msghdr is plain old data; all zeroes is a valid empty one.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = addr_len;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size. (`as _`: size_t on glibc,
    // socklen_t on musl, here and for cmsg_len.)
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
    // SAFETY: msg_control points at 64 aligned bytes, more than
    // CMSG_SPACE(2), so the first header and its 2 data bytes are in
    // bounds; CMSG_FIRSTHDR is non-null because msg_controllen covers a
    // cmsghdr. sendmsg only reads the buffers msg points to, which all
    // outlive the call.
    let rc = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
        libc::sendmsg(socket.as_raw_fd(), &msg, 0)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One `recvmsg`: the bytes received, their sender, and the size of each
/// datagram when the kernel coalesced several (UDP GRO), else `None`.
pub fn recv_coalesced(
    socket: &impl AsRawFd,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<usize>)> {
    // SAFETY: sockaddr_storage and msghdr are plain old data.
    let mut addr: libc::sockaddr_storage = unsafe { zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = ControlBuffer([0; 64]);
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: every pointer in msg is to a live buffer of the stated
    // length, which the kernel writes within.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let from = from_sockaddr(&addr).ok_or_else(|| io::Error::other("unknown address family"))?;
    Ok((n as usize, from, gro_size(&msg)))
}

/// The segment size in a UDP_GRO control message of `msg`, if any.
fn gro_size(msg: &libc::msghdr) -> Option<usize> {
    // SAFETY: msg came back from recvmsg: its control length says how
    // much of the control buffer the kernel filled, and the CMSG macros
    // walk only within it; data is read unaligned as the kernel packs it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                return usize::try_from(size).ok().filter(|&s| s > 0);
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_sends_arrive_as_datagrams_or_coalesced() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        grow_buffers(&rx, 1 << 20);
        enable_gro(&rx).unwrap();
        let to = rx.local_addr().unwrap();
        let bytes: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        send_segments(&tx, &bytes, 1000, to).unwrap();
        let mut buf = vec![0u8; 65_536];
        let mut got = Vec::new();
        while got.len() < bytes.len() {
            let (n, from, size) = recv_coalesced(&rx, &mut buf).unwrap();
            assert_eq!(from, tx.local_addr().unwrap());
            // Either split on receipt or handed over whole with the size.
            let size = size.unwrap_or(n);
            assert!(buf[..n].chunks(size).all(|c| c.len() <= 1000));
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, bytes);
    }

    #[test]
    fn addresses_round_trip() {
        for a in ["10.1.2.3:6783", "[fe80::1]:6783"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(from_sockaddr(&to_sockaddr(a).0), Some(a));
        }
    }
}
