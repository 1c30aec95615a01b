//! Sealing datagrams with the cluster's shared secret, and refusing replays.
//!
//! Every datagram is encrypted and authenticated with XChaCha20-Poly1305
//! under one key derived from the secret. The 24-byte nonce is (sender,
//! epoch, counter): the sender's name keeps peers' nonces apart, the counter
//! keeps one boot's datagrams apart, and the epoch changes on every boot, so
//! a restarted node (same persisted name, counter back at zero) never reuses
//! a nonce, and receivers can refuse datagrams replayed from an older boot.

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use sha2::Sha256;
use std::fmt;

/// Bytes the authentication tag adds to every sealed datagram.
pub const TAG_LEN: usize = 16;

/// The nonce of one sealed datagram; it travels in the clear in the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealNonce {
    pub sender: u64,
    pub epoch: u64,
    pub counter: u64,
}

impl SealNonce {
    pub fn to_bytes(self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.sender.to_be_bytes());
        out[8..16].copy_from_slice(&self.epoch.to_be_bytes());
        out[16..].copy_from_slice(&self.counter.to_be_bytes());
        out
    }
}

/// Seals and opens datagrams with the key derived from a shared secret.
#[derive(Clone)]
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer { key: <redacted> }")
    }
}

/// A datagram that did not authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("datagram failed authentication: wrong secret or tampered")]
pub struct OpenError;

impl Sealer {
    /// Key = HKDF-SHA256(salt "weft-seal-v1", secret, info "weft datagram key").
    pub fn new(secret: &[u8]) -> Sealer {
        let mut key = [0u8; 32];
        Hkdf::<Sha256>::new(Some(b"weft-seal-v1"), secret)
            .expand(b"weft datagram key", &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Sealer {
            cipher: XChaCha20Poly1305::new(&key.into()),
        }
    }

    /// Ciphertext || tag of `plaintext`, authenticating `header` too.
    pub fn seal(&self, header: &[u8], nonce: SealNonce, plaintext: &[u8]) -> Vec<u8> {
        let nonce = XNonce::from(nonce.to_bytes());
        self.cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: header,
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any datagram-sized input")
    }

    pub fn open(
        &self,
        header: &[u8],
        nonce: SealNonce,
        sealed: &[u8],
    ) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < TAG_LEN {
            return Err(OpenError);
        }
        let nonce = XNonce::from(nonce.to_bytes());
        self.cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: sealed,
                    aad: header,
                },
            )
            .map_err(|_| OpenError)
    }
}

/// Counters remembered below the highest one seen, as in IPsec/WireGuard:
/// datagrams may arrive out of order, but each is accepted once.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

/// Anti-replay state for one sender. Feed it only datagrams that opened
/// successfully, so a forger cannot move the window.
#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    epoch: u64,
    /// Highest counter accepted in `epoch`, if any.
    highest: Option<u64>,
    /// Bit i set: counter `highest - i` was seen.
    seen: [u64; WORDS],
}

/// Why an authentic datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Replay {
    #[error("from an earlier boot of the sender")]
    OldEpoch,
    #[error("already received")]
    Duplicate,
    #[error("older than the replay window")]
    TooOld,
}

impl ReplayWindow {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn check_and_update(&mut self, epoch: u64, counter: u64) -> Result<(), Replay> {
        if epoch < self.epoch {
            return Err(Replay::OldEpoch);
        }
        if epoch > self.epoch || self.highest.is_none() {
            *self = ReplayWindow {
                epoch,
                highest: Some(counter),
                seen: [0; WORDS],
            };
            self.seen[0] = 1;
            return Ok(());
        }
        let highest = self.highest.unwrap_or(0);
        if counter > highest {
            self.slide(counter - highest);
            self.highest = Some(counter);
            self.seen[0] |= 1;
            return Ok(());
        }
        let age = highest - counter;
        if age >= WINDOW {
            return Err(Replay::TooOld);
        }
        let (word, bit) = ((age / 64) as usize, age % 64);
        if self.seen[word] & (1 << bit) != 0 {
            return Err(Replay::Duplicate);
        }
        self.seen[word] |= 1 << bit;
        Ok(())
    }

    /// Shifts the bitmap left by `by` positions (older counters move up).
    fn slide(&mut self, by: u64) {
        if by >= WINDOW {
            self.seen = [0; WORDS];
            return;
        }
        let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
        for i in (0..WORDS).rev() {
            let from = i.checked_sub(words);
            let hi = from.map_or(0, |j| self.seen[j] << bits);
            let lo = match from.and_then(|j| j.checked_sub(1)) {
                Some(k) if bits > 0 => self.seen[k] >> (64 - bits),
                _ => 0,
            };
            self.seen[i] = hi | lo;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const NONCE: SealNonce = SealNonce {
        sender: 1,
        epoch: 2,
        counter: 3,
    };

    #[test]
    fn sealed_data_opens_with_the_same_secret_only() {
        let s = Sealer::new(b"s3cret");
        let sealed = s.seal(b"hdr", NONCE, b"hello");
        assert_eq!(sealed.len(), 5 + TAG_LEN);
        assert_eq!(s.open(b"hdr", NONCE, &sealed).unwrap(), b"hello");
        assert_eq!(
            Sealer::new(b"other").open(b"hdr", NONCE, &sealed),
            Err(OpenError)
        );
    }

    #[test]
    fn any_change_fails_authentication() {
        let s = Sealer::new(b"s3cret");
        let sealed = s.seal(b"hdr", NONCE, b"hello");
        for i in 0..sealed.len() * 8 {
            let mut t = sealed.clone();
            t[i / 8] ^= 1 << (i % 8);
            assert!(s.open(b"hdr", NONCE, &t).is_err());
        }
        assert!(s.open(b"hdR", NONCE, &sealed).is_err());
        for n in [
            SealNonce { sender: 9, ..NONCE },
            SealNonce { epoch: 9, ..NONCE },
            SealNonce {
                counter: 9,
                ..NONCE
            },
        ] {
            assert!(s.open(b"hdr", n, &sealed).is_err());
        }
        assert!(s.open(b"hdr", NONCE, &sealed[..TAG_LEN - 1]).is_err());
    }

    #[test]
    fn debug_output_hides_the_key() {
        assert_eq!(
            format!("{:?}", Sealer::new(b"k")),
            "Sealer { key: <redacted> }"
        );
    }

    #[test]
    fn replay_window_rules() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.check_and_update(1, 0), Ok(()));
        assert_eq!(w.check_and_update(1, 0), Err(Replay::Duplicate));
        assert_eq!(w.check_and_update(1, 5), Ok(()));
        assert_eq!(
            w.check_and_update(1, 3),
            Ok(()),
            "late but within the window"
        );
        assert_eq!(w.check_and_update(1, 3), Err(Replay::Duplicate));
        assert_eq!(w.check_and_update(1, 5 + WINDOW), Ok(()));
        assert_eq!(w.check_and_update(1, 5), Err(Replay::TooOld));
        assert_eq!(
            w.check_and_update(1, u64::MAX),
            Ok(()),
            "huge jumps are fine"
        );
        assert_eq!(w.check_and_update(0, 100), Err(Replay::OldEpoch));
        assert_eq!(w.check_and_update(2, 0), Ok(()), "a new boot starts over");
        assert_eq!(w.check_and_update(1, 1_000_000), Err(Replay::OldEpoch));
    }

    /// A plain model: every (epoch, counter) seen, and the highest counter.
    #[derive(Default)]
    struct Model {
        epoch: u64,
        highest: Option<u64>,
        seen: BTreeSet<u64>,
    }

    impl Model {
        fn check(&mut self, epoch: u64, counter: u64) -> Result<(), Replay> {
            if epoch < self.epoch {
                return Err(Replay::OldEpoch);
            }
            if epoch > self.epoch || self.highest.is_none() {
                self.epoch = epoch;
                self.highest = Some(counter);
                self.seen = BTreeSet::from([counter]);
                return Ok(());
            }
            let highest = self.highest.unwrap();
            if counter <= highest && highest - counter >= WINDOW {
                return Err(Replay::TooOld);
            }
            if !self.seen.insert(counter) {
                return Err(Replay::Duplicate);
            }
            self.highest = Some(highest.max(counter));
            Ok(())
        }
    }

    proptest! {
        #[test]
        fn window_matches_the_model(ops in proptest::collection::vec((0u64..3, 0u64..3000), 1..400)) {
            let (mut w, mut m) = (ReplayWindow::new(), Model::default());
            let mut accepted = BTreeSet::new();
            for (epoch, counter) in ops {
                let got = w.check_and_update(epoch, counter);
                prop_assert_eq!(got, m.check(epoch, counter), "at ({}, {})", epoch, counter);
                if got.is_ok() {
                    prop_assert!(accepted.insert((epoch, counter)), "accepted twice");
                }
            }
        }

        #[test]
        fn opening_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200),
                                             header in proptest::collection::vec(any::<u8>(), 0..40)) {
            prop_assert!(Sealer::new(b"k").open(&header, NONCE, &bytes).is_err());
        }
    }
}
