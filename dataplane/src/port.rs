//! UDP 6783 carries three kinds of datagram: fastdp probes, sleeve frames
//! and the control plane's. Whoever reads a datagram sorts it here, so
//! the kinds are told apart in one place.
//!
//! With a sleeve, the port is two sockets in one `SO_REUSEPORT` group,
//! and a classic BPF program makes the kernel steer each datagram by its
//! kind byte: control datagrams to the driver loop's socket, everything
//! else to the sleeve's receive thread. The loop thus reads its own
//! datagrams straight from the kernel, with no thread in between. What
//! the kernel cannot steer apart (a GRO batch that mixes kinds) still
//! reaches its reader: the sleeve hands control datagrams over, and the
//! loop sorts out probes. Without steering (an old kernel), the sleeve's
//! thread reads the one socket and hands every control datagram over.

use crate::probe::{Prober, Received};
use crate::sleeve::udp;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use weft_core::wire::{self, SleeveFrame};

/// What to do with one datagram.
#[derive(Debug)]
pub enum Sorted<'a> {
    /// A probe request: send this reply to the sender, as a plain
    /// datagram (it must not depend on the VXLAN path it vouches for).
    Answer([u8; crate::probe::PROBE_LEN]),
    /// Taken by the prober (a reply recorded, or a malformed probe).
    Taken,
    /// A sleeve frame, for the sleeve.
    Frame(SleeveFrame<'a>),
    /// For the control plane (the driver loop).
    Control,
}

/// Sorts `datagram` from `from`. `prober`: fastdp's, when it runs;
/// `sleeve`: whether a sleeve takes frames (without one they go to the
/// control plane, which refuses them like any other stray datagram).
pub fn sort<'a>(
    datagram: &'a [u8],
    from: SocketAddr,
    prober: Option<&Prober>,
    sleeve: bool,
) -> Sorted<'a> {
    if let Some(prober) = prober {
        match prober.receive(datagram, from) {
            Received::NotProbe => {}
            Received::Taken => return Sorted::Taken,
            Received::Answer(reply) => return Sorted::Answer(reply),
        }
    }
    match sleeve.then(|| wire::parse_sleeve(datagram)).flatten() {
        Some(frame) => Sorted::Frame(frame),
        None => Sorted::Control,
    }
}

/// A control datagram the sleeve's receive thread read, and its sender.
pub type HandedOver = (Vec<u8>, SocketAddr);

/// The bound port: the socket the sleeve reads (or the only one), and,
/// when the kernel steers, the driver loop's own.
pub struct Port {
    pub main: UdpSocket,
    pub control: Option<UdpSocket>,
}

/// Index of the driver loop's socket in the reuseport group (the order
/// of binding); the sleeve's is 0, where the kernel also sends what the
/// program cannot read (datagrams shorter than its kind byte).
const CONTROL_INDEX: u32 = 1;
/// Offset of the kind byte in weft's header ("WEFT", version, kind).
const KIND_OFFSET: u32 = 5;
/// Kinds below this are the control plane's (plain and sealed); sleeve
/// frames and probes ("WFTPROBE": 'O' at that offset) are above.
const FIRST_DATA_KIND: u32 = 2;
/// From linux/socket.h (the libc crate has it for Android only).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Binds `addr`. `steer`: a sleeve will read `main`, so give the driver
/// loop its own socket if the kernel can steer control datagrams to it.
/// A port in use is refused, as a plain bind would: a second agent must
/// not join the group.
pub fn bind(addr: SocketAddr, steer: bool) -> io::Result<Port> {
    let plain = UdpSocket::bind(addr)?;
    if !steer {
        return Ok(Port {
            main: plain,
            control: None,
        });
    }
    let addr = plain.local_addr()?;
    drop(plain);
    match bind_steered(addr) {
        Ok((main, control)) => Ok(Port {
            main,
            control: Some(control),
        }),
        Err(e) => {
            tracing::warn!("UDP {addr}: control datagrams pass through the sleeve's thread: {e}");
            Ok(Port {
                main: UdpSocket::bind(addr)?,
                control: None,
            })
        }
    }
}

fn bind_steered(addr: SocketAddr) -> io::Result<(UdpSocket, UdpSocket)> {
    let main = reuseport_socket(addr)?;
    attach_steering(&main)?;
    let control = reuseport_socket(addr)?;
    // The kernel coalesces (GRO) a flow's datagrams only when the socket
    // its hash picks, before any program runs, accepts coalesced reads:
    // for half the peers that is this one.
    udp::enable_gro(&control)?;
    Ok((main, control))
}

fn reuseport_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The group's program: the kind byte of the UDP payload picks the
/// socket index (the kernel runs it with the payload at offset 0).
fn attach_steering(socket: &UdpSocket) -> io::Result<()> {
    let statement = |code: u32, jt, jf, k| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let mut program = [
        statement(
            libc::BPF_LD | libc::BPF_B | libc::BPF_ABS,
            0,
            0,
            KIND_OFFSET,
        ),
        statement(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            1,
            0,
            FIRST_DATA_KIND,
        ),
        statement(libc::BPF_RET | libc::BPF_K, 0, 0, CONTROL_INDEX),
        statement(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: the fd is open; fprog points at `program`, which outlives
    // the call (the kernel copies it), and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The driver loop's side of the port: it reads its own socket when it
/// has one (without a sleeve, or steered), takes what the sleeve's thread
/// hands over, and sends.
pub struct ControlSocket {
    send: Sender,
    own: Option<OwnReads>,
    handed: Option<tokio::sync::Mutex<mpsc::Receiver<HandedOver>>>,
    prober: Option<Arc<Prober>>,
}

enum Sender {
    Async(Arc<tokio::net::UdpSocket>),
    /// The socket the sleeve's threads block on: O_NONBLOCK would be
    /// theirs too. UDP blocks only while the socket buffer is full, which
    /// lasts microseconds, and waiting beats dropping a heartbeat.
    Blocking(UdpSocket),
}

/// A socket the loop reads, with what is left of a coalesced read.
struct OwnReads {
    socket: Arc<tokio::net::UdpSocket>,
    batch: Mutex<Batch>,
}

/// One coalesced read: `len` bytes of datagrams of `size` each (the last
/// may be shorter), `next` of them returned.
struct Batch {
    bytes: Vec<u8>,
    len: usize,
    size: usize,
    next: usize,
    from: Option<SocketAddr>,
}

impl Batch {
    fn pop(&mut self) -> Option<(std::ops::Range<usize>, SocketAddr)> {
        let from = self.from?;
        if self.next >= self.len {
            return None;
        }
        let range = self.next..(self.next + self.size).min(self.len);
        self.next = range.end;
        Some((range, from))
    }
}

enum Next {
    Own,
    Handed(Option<HandedOver>),
}

impl ControlSocket {
    /// The loop's side of `port`. `handed`: the sleeve's hand-over, when a
    /// sleeve reads `port.main` (which the loop then only sends on,
    /// unless the kernel steers to `port.control`). The sleeve holds its
    /// own handle on `port.main`: closing the last one would leave the
    /// group with the loop's socket alone, at the sleeve's index. Must be
    /// called within a tokio runtime.
    pub fn new(
        port: Port,
        handed: Option<mpsc::Receiver<HandedOver>>,
        prober: Option<Arc<Prober>>,
    ) -> io::Result<ControlSocket> {
        let (own, send) = match (port.control, &handed) {
            (Some(control), _) => {
                let own = tokio_socket(control)?;
                (Some(own.clone()), Sender::Async(own))
            }
            (None, None) => {
                let own = tokio_socket(port.main)?;
                (Some(own.clone()), Sender::Async(own))
            }
            (None, Some(_)) => (None, Sender::Blocking(port.main)),
        };
        Ok(ControlSocket {
            send,
            own: own.map(|socket| OwnReads {
                socket,
                batch: Mutex::new(Batch {
                    bytes: vec![0; 65_536],
                    len: 0,
                    size: 0,
                    next: 0,
                    from: None,
                }),
            }),
            handed: handed.map(tokio::sync::Mutex::new),
            prober,
        })
    }

    pub async fn send_to(&self, payload: &[u8], to: SocketAddr) -> io::Result<usize> {
        match &self.send {
            Sender::Async(socket) => socket.send_to(payload, to).await,
            Sender::Blocking(socket) => socket.send_to(payload, to),
        }
    }

    /// The next control datagram, copied into `buf`.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            if let Some(own) = &self.own
                && let Some(got) = self.next_own(own, buf)
            {
                return Ok(got);
            }
            let next = tokio::select! {
                read = self.read_own() => { read?; Next::Own }
                handed = self.next_handed() => Next::Handed(handed),
            };
            if let Next::Handed(handed) = next {
                let Some((datagram, from)) = handed else {
                    // The sleeve's thread never stops; should it, nothing
                    // more is handed over, and the loop must not spin.
                    return std::future::pending().await;
                };
                let n = datagram.len().min(buf.len());
                buf[..n].copy_from_slice(&datagram[..n]);
                return Ok((n, from));
            }
        }
    }

    /// The next control datagram of the last read, answering and taking
    /// probes on the way.
    fn next_own(&self, own: &OwnReads, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        let mut batch = own.batch.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((range, from)) = batch.pop() {
            let datagram = &batch.bytes[range];
            match sort(datagram, from, self.prober.as_deref(), false) {
                Sorted::Control | Sorted::Frame(_) => {
                    let n = datagram.len().min(buf.len());
                    buf[..n].copy_from_slice(&datagram[..n]);
                    return Some((n, from));
                }
                Sorted::Taken => {}
                Sorted::Answer(reply) => {
                    let _ = own.socket.try_send_to(&reply, from);
                }
            }
        }
        None
    }

    /// Reads the loop's own socket into its batch; pending without one.
    async fn read_own(&self) -> io::Result<()> {
        let Some(own) = &self.own else {
            return std::future::pending().await;
        };
        own.socket
            .async_io(tokio::io::Interest::READABLE, || {
                let mut batch = own.batch.lock().unwrap_or_else(|e| e.into_inner());
                let (len, from, size) = udp::recv_coalesced(&*own.socket, &mut batch.bytes)?;
                batch.len = len;
                batch.size = size.unwrap_or(len).max(1);
                batch.next = 0;
                batch.from = Some(from);
                Ok(())
            })
            .await
    }

    /// What the sleeve's thread hands over next; pending without one.
    async fn next_handed(&self) -> Option<HandedOver> {
        match &self.handed {
            Some(handed) => handed.lock().await.recv().await,
            None => std::future::pending().await,
        }
    }
}

fn tokio_socket(socket: UdpSocket) -> io::Result<Arc<tokio::net::UdpSocket>> {
    socket.set_nonblocking(true)?;
    Ok(Arc::new(tokio::net::UdpSocket::from_std(socket)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{Probe, ProbeKind};
    use weft_core::PeerName;

    fn prober() -> Prober {
        Prober::new(PeerName(1), std::time::Instant::now(), 7, true)
    }

    #[test]
    fn each_kind_goes_its_own_way() {
        let from: SocketAddr = "192.168.1.12:6783".parse().unwrap();
        let prober = prober();
        let request = Probe {
            kind: ProbeKind::Request,
            nonce: 9,
            sender: PeerName(2),
        }
        .encode();
        assert!(matches!(
            sort(&request, from, Some(&prober), true),
            Sorted::Answer(_)
        ));
        // Without fastdp a probe is just a stray datagram.
        assert!(matches!(sort(&request, from, None, true), Sorted::Control));
        let frame = wire::sleeve_frame(PeerName(2), &[0x45, 0, 0, 20]);
        assert!(matches!(
            sort(&frame, from, Some(&prober), true),
            Sorted::Frame(_)
        ));
        assert!(matches!(
            sort(&frame, from, Some(&prober), false),
            Sorted::Control
        ));
        for garbage in [&b""[..], b"WEFT", b"WFTPROBE", &[0xff; 64]] {
            assert!(!matches!(
                sort(garbage, from, Some(&prober), true),
                Sorted::Answer(_) | Sorted::Frame(_)
            ));
        }
    }

    fn control_datagram(tag: u8) -> Vec<u8> {
        let mut d = b"WEFT".to_vec();
        d.extend_from_slice(&[wire::VERSION, 0]);
        d.extend_from_slice(&[tag; 40]);
        d
    }

    fn probe_request() -> Vec<u8> {
        Probe {
            kind: ProbeKind::Request,
            nonce: 9,
            sender: PeerName(2),
        }
        .encode()
        .to_vec()
    }

    /// Every datagram waiting on `socket`, in order.
    fn drain(socket: &UdpSocket) -> Vec<Vec<u8>> {
        socket.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = socket.recv_from(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    /// Waits until `socket` has something to read (loopback delivers
    /// within the send call, but this does not rely on it).
    fn wait_readable(socket: &UdpSocket) {
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        socket.peek_from(&mut byte).unwrap();
    }

    #[test]
    fn the_kernel_steers_control_datagrams_to_the_loops_socket() {
        let port = bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let control = port.control.expect("this kernel steers");
        let to = port.main.local_addr().unwrap();
        assert_eq!(control.local_addr().unwrap(), to);
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let frame = wire::sleeve_frame(PeerName(2), &[0x45, 0, 0, 20]);
        let sent = [
            control_datagram(1),
            frame.clone(),
            probe_request(),
            b"WE".to_vec(),
            control_datagram(2),
        ];
        for datagram in &sent {
            peer.send_to(datagram, to).unwrap();
        }
        wait_readable(&control);
        wait_readable(&port.main);
        assert_eq!(
            drain(&control),
            vec![control_datagram(1), control_datagram(2)]
        );
        assert_eq!(
            drain(&port.main),
            vec![frame, probe_request(), b"WE".to_vec()]
        );
    }

    #[test]
    fn a_port_in_use_is_refused_steered_or_not() {
        let port = bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = port.main.local_addr().unwrap();
        for steer in [false, true] {
            let e = bind(addr, steer).err().expect("a second agent is refused");
            assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        }
    }

    #[tokio::test]
    async fn the_loop_reads_coalesced_and_handed_over_datagrams_one_by_one() {
        let port = bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let to = port.main.local_addr().unwrap();
        // The sleeve's handle: while it lives, the group keeps its order.
        let _sleeve = port.main.try_clone().unwrap();
        let (hand_over, handed) = mpsc::channel(4);
        let socket = ControlSocket::new(port, Some(handed), None).unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Three equal datagrams in one GSO send: loopback hands them to a
        // GRO socket as one coalesced read.
        let batch: Vec<u8> = (1..=3).flat_map(control_datagram).collect();
        udp::send_segments(&peer, &batch, control_datagram(0).len() as u16, to).unwrap();
        let mut buf = [0u8; 2048];
        let wait = std::time::Duration::from_secs(5);
        for tag in 1..=3 {
            let read = tokio::time::timeout(wait, socket.recv_from(&mut buf));
            let (n, from) = read.await.expect("steered to the loop").unwrap();
            assert_eq!(
                (&buf[..n], from),
                (&control_datagram(tag)[..], peer.local_addr().unwrap())
            );
        }
        let from: SocketAddr = "192.168.1.12:6783".parse().unwrap();
        hand_over.send((control_datagram(4), from)).await.unwrap();
        let (n, got_from) = socket.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], got_from), (&control_datagram(4)[..], from));
    }
}
