//! UDP 6783 carries three kinds of datagram: fastdp probes, sleeve frames
//! and the control plane's. Whoever reads the socket (the sleeve's receive
//! thread, or the driver loop when there is no sleeve) sorts each one
//! here, so the kinds are told apart in one place.

use crate::probe::{Prober, Received};
use std::net::SocketAddr;
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
}
