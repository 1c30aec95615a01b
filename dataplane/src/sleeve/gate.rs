//! Which received sleeve frames reach pods: only a connected peer's, from
//! the address it is connected at, sealed with our secret (and not a
//! replay) when we have one, plain when we have none. Without a secret,
//! anyone who can send UDP to port 6783 could otherwise put packets into
//! pods.
//!
//! A relay re-frames what it passes on under its own name, so a relayed
//! frame's sender is the relay, the one peer the frame's route brings it
//! from: the same rule covers direct and relayed frames.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use weft_core::seal::{ReplayWindow, Sealer};
use weft_core::wire::SleeveFrame;
use weft_core::{PeerName, Time};

/// Why the sleeve dropped a frame or a packet; a label in `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameDrop {
    /// Received from a sender with no confirmed connection to this node.
    NotConnected,
    /// From a connected peer's name, but not from its address.
    WrongAddress,
    /// Plain, but this node has a secret.
    Unencrypted,
    /// Sealed, but this node has no secret.
    NoSecret,
    /// Failed authentication: another secret, or forged.
    Authentication,
    /// Already received, or from an older boot of the sender.
    Replayed,
    /// No route to the packet's destination (or only back where it came
    /// from), or not an IPv4 packet.
    NoRoute,
    /// A packet from the TUN device that cannot be cut into frames.
    Malformed,
    /// The UDP send failed.
    SendFailed,
    /// The TUN device refused the packet.
    TunWriteFailed,
}

impl FrameDrop {
    pub const ALL: [FrameDrop; 10] = [
        FrameDrop::NotConnected,
        FrameDrop::WrongAddress,
        FrameDrop::Unencrypted,
        FrameDrop::NoSecret,
        FrameDrop::Authentication,
        FrameDrop::Replayed,
        FrameDrop::NoRoute,
        FrameDrop::Malformed,
        FrameDrop::SendFailed,
        FrameDrop::TunWriteFailed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FrameDrop::NotConnected => "not_connected",
            FrameDrop::WrongAddress => "wrong_address",
            FrameDrop::Unencrypted => "unencrypted",
            FrameDrop::NoSecret => "no_secret",
            FrameDrop::Authentication => "authentication",
            FrameDrop::Replayed => "replayed",
            FrameDrop::NoRoute => "no_route",
            FrameDrop::Malformed => "malformed",
            FrameDrop::SendFailed => "send_failed",
            FrameDrop::TunWriteFailed => "tun_write_failed",
        }
    }
}

/// Counters of the sleeve, for `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub relayed: AtomicU64,
    dropped: [AtomicU64; FrameDrop::ALL.len()],
}

impl Counters {
    pub fn count_drop(&self, reason: FrameDrop) {
        self.count_drops(reason, 1);
    }

    pub fn count_drops(&self, reason: FrameDrop, n: u64) {
        self.dropped[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn dropped(&self, reason: FrameDrop) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }
}

/// Whether a frame received from `from` comes from where its sender is
/// connected (`connected`: `None` when it is not).
pub fn check_source(from: SocketAddr, connected: Option<SocketAddr>) -> Result<(), FrameDrop> {
    match connected {
        None => Err(FrameDrop::NotConnected),
        Some(address) if address != from => Err(FrameDrop::WrongAddress),
        Some(_) => Ok(()),
    }
}

/// The receiving half of the sleeve's sealing: the key and each sender's
/// replay window.
pub struct Gate {
    sealer: Option<Sealer>,
    replay: Mutex<BTreeMap<PeerName, ReplayWindow>>,
    /// A window quiet this long lets in a lower epoch (the sender
    /// restarted with a clock that went back), as the control plane does.
    stale_after: Duration,
    /// A window quiet this long is forgotten, as the control plane
    /// forgets a peer's.
    forget_after: Duration,
}

impl Gate {
    pub fn new(sealer: Option<Sealer>, stale_after: Duration, forget_after: Duration) -> Gate {
        Gate {
            sealer,
            replay: Mutex::default(),
            stale_after,
            forget_after,
        }
    }

    /// The packet of `frame` if it may reach pods; see the module docs.
    /// `connected`: where the frame's sender is connected, if it is.
    pub fn admit<'a>(
        &self,
        now: Time,
        frame: SleeveFrame<'a>,
        from: SocketAddr,
        connected: Option<SocketAddr>,
    ) -> Result<Cow<'a, [u8]>, FrameDrop> {
        check_source(from, connected)?;
        match (frame, &self.sealer) {
            (SleeveFrame::Plain { packet, .. }, None) => Ok(Cow::Borrowed(packet)),
            (SleeveFrame::Plain { .. }, Some(_)) => Err(FrameDrop::Unencrypted),
            (SleeveFrame::Sealed { .. }, None) => Err(FrameDrop::NoSecret),
            (
                SleeveFrame::Sealed {
                    nonce,
                    header,
                    sealed,
                },
                Some(sealer),
            ) => {
                let packet = sealer
                    .open(header, nonce, sealed)
                    .map_err(|_| FrameDrop::Authentication)?;
                // Only authentic frames touch the windows, so a forger
                // cannot move or refresh one.
                let mut replay = self.replay.lock().unwrap_or_else(|p| p.into_inner());
                let sender = PeerName(nonce.sender);
                if !replay.contains_key(&sender) {
                    let forget = self.forget_after;
                    replay.retain(|_, w| !w.is_stale(now, forget));
                }
                replay
                    .entry(sender)
                    .or_default()
                    .accept(now, self.stale_after, nonce.epoch, nonce.counter)
                    .map_err(|_| FrameDrop::Replayed)?;
                Ok(Cow::Owned(packet))
            }
        }
    }

    /// Senders whose replay windows are kept.
    #[cfg(test)]
    fn windows(&self) -> usize {
        self.replay.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::seal::SealNonce;
    use weft_core::wire::{self, parse_sleeve};

    const PEER: PeerName = PeerName(7);
    const STALE: Duration = Duration::from_secs(5);
    const FORGET: Duration = Duration::from_secs(60);

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn at(s: u64) -> Time {
        Time::from_millis(s * 1000)
    }

    fn sealer() -> Sealer {
        Sealer::new(b"s3cret/weft-sleeve")
    }

    fn sealed(sender: PeerName, epoch: u64, counter: u64) -> Vec<u8> {
        let nonce = SealNonce {
            sender: sender.0,
            epoch,
            counter,
        };
        wire::sealed_sleeve_frame(&sealer(), nonce, b"\x45packet")
    }

    #[test]
    fn only_a_connected_peer_at_its_address_is_a_source() {
        let peer = addr("192.168.1.12:6783");
        assert_eq!(check_source(peer, Some(peer)), Ok(()));
        assert_eq!(
            check_source(addr("8.8.8.8:6783"), None),
            Err(FrameDrop::NotConnected)
        );
        // A peer's name sent from elsewhere (another port counts too).
        assert_eq!(
            check_source(addr("8.8.8.8:6783"), Some(peer)),
            Err(FrameDrop::WrongAddress)
        );
        assert_eq!(
            check_source(addr("192.168.1.12:9999"), Some(peer)),
            Err(FrameDrop::WrongAddress)
        );
    }

    #[test]
    fn without_a_secret_plain_frames_of_connected_peers_only_get_in() {
        let gate = Gate::new(None, STALE, FORGET);
        let peer = addr("192.168.1.12:6783");
        let frame = wire::sleeve_frame(PEER, b"\x45packet");
        let admit = |from, connected| {
            gate.admit(at(0), parse_sleeve(&frame).unwrap(), from, connected)
                .map(|p| p.into_owned())
        };
        assert_eq!(admit(peer, Some(peer)), Ok(b"\x45packet".to_vec()));
        assert_eq!(
            admit(addr("8.8.8.8:6783"), None),
            Err(FrameDrop::NotConnected)
        );
        assert_eq!(
            admit(addr("8.8.8.8:6783"), Some(peer)),
            Err(FrameDrop::WrongAddress)
        );
        let sealed = sealed(PEER, 1, 0);
        assert_eq!(
            gate.admit(at(0), parse_sleeve(&sealed).unwrap(), peer, Some(peer)),
            Err(FrameDrop::NoSecret)
        );
    }

    #[test]
    fn with_a_secret_frames_are_authentic_and_fresh() {
        let gate = Gate::new(Some(sealer()), STALE, FORGET);
        let peer = addr("192.168.1.12:6783");
        let admit = |t, bytes: &[u8]| {
            gate.admit(at(t), parse_sleeve(bytes).unwrap(), peer, Some(peer))
                .map(|p| p.into_owned())
        };
        let plain = wire::sleeve_frame(PEER, b"\x45packet");
        assert_eq!(admit(0, &plain), Err(FrameDrop::Unencrypted));
        let forged = wire::sealed_sleeve_frame(
            &Sealer::new(b"guess"),
            SealNonce {
                sender: PEER.0,
                epoch: 9,
                counter: 0,
            },
            b"\x45packet",
        );
        assert_eq!(admit(0, &forged), Err(FrameDrop::Authentication));
        assert_eq!(admit(0, &sealed(PEER, 9, 0)), Ok(b"\x45packet".to_vec()));
        assert_eq!(admit(1, &sealed(PEER, 9, 0)), Err(FrameDrop::Replayed));
        // A lower epoch waits until the old boot is quiet for 5 s.
        assert_eq!(admit(2, &sealed(PEER, 3, 0)), Err(FrameDrop::Replayed));
        assert_eq!(admit(5, &sealed(PEER, 3, 1)), Ok(b"\x45packet".to_vec()));
        // An authentic frame from an unconnected source is still refused.
        let frame = sealed(PEER, 3, 2);
        assert_eq!(
            gate.admit(at(5), parse_sleeve(&frame).unwrap(), peer, None),
            Err(FrameDrop::NotConnected)
        );
    }

    #[test]
    fn windows_of_long_quiet_senders_are_forgotten() {
        let gate = Gate::new(Some(sealer()), STALE, FORGET);
        let peer = addr("192.168.1.12:6783");
        for (t, sender) in [(0, 1), (30, 2), (61, 3)] {
            let frame = sealed(PeerName(sender), 1, 0);
            let frame = parse_sleeve(&frame).unwrap();
            assert!(gate.admit(at(t), frame, peer, Some(peer)).is_ok());
        }
        // Sender 1 was quiet for 61 s when sender 3 arrived.
        assert_eq!(gate.windows(), 2);
    }
}
