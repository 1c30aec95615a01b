//! The run's trace: one line per scenario event, router event and check,
//! plus a hash over every line and every datagram, so two runs can be
//! compared byte for byte.

use std::fmt::Write as _;
use weft_core::Time;

#[derive(Default)]
pub struct Trace {
    /// Keep the lines (for `--trace`); the hash is always kept.
    pub keep: bool,
    pub lines: Vec<String>,
    hash: u64,
    scratch: String,
}

impl Trace {
    pub fn line(&mut self, now: Time, node: &str, what: &str) {
        // One buffer for every line: a 1,000-node run tells millions.
        let mut line = std::mem::take(&mut self.scratch);
        line.clear();
        let _ = write!(
            line,
            "{:>10.3} {node:<8} {what}",
            now.since_epoch().as_secs_f64()
        );
        self.absorb(line.as_bytes());
        if self.keep {
            self.lines.push(line.clone());
        }
        self.scratch = line;
    }

    pub fn datagram(&mut self, bytes: &[u8]) {
        self.absorb(bytes);
    }

    fn absorb(&mut self, bytes: &[u8]) {
        // FNV-1a's constants, eight bytes a step with the high half folded
        // down: fixed and the same on every machine, and fast enough for
        // the gigabytes a 1,000-node run sends (a byte a step was a tenth
        // of the work that cannot run on two threads).
        const PRIME: u64 = 0x0100_0000_01b3;
        let mut h = if self.hash == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.hash
        };
        let mut mix = |word: u64| {
            h = (h ^ word).wrapping_mul(PRIME);
            h ^= h >> 32;
        };
        let words = bytes.chunks_exact(8);
        let tail = words.remainder();
        for word in words {
            mix(u64::from_le_bytes(word.try_into().unwrap_or_default()));
        }
        let mut last = [0u8; 8];
        last[..tail.len()].copy_from_slice(tail);
        mix(u64::from_le_bytes(last));
        mix(bytes.len() as u64);
        self.hash = h;
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn text(&self) -> String {
        let mut out = self.lines.join("\n");
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Trace;

    fn hash_of(datagrams: &[&[u8]]) -> u64 {
        let mut trace = Trace::default();
        for d in datagrams {
            trace.datagram(d);
        }
        trace.hash()
    }

    #[test]
    fn any_changed_bit_changes_the_hash() {
        let datagram: Vec<u8> = (0..21).collect();
        let original = hash_of(&[&datagram]);
        for byte in 0..datagram.len() {
            for bit in 0..8 {
                let mut changed = datagram.clone();
                changed[byte] ^= 1 << bit;
                assert_ne!(hash_of(&[&changed]), original, "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn where_datagrams_split_counts() {
        assert_ne!(hash_of(&[b"ab", b"c"]), hash_of(&[b"a", b"bc"]));
        assert_ne!(hash_of(&[b"a"]), hash_of(&[b"a\0"]));
        assert_ne!(hash_of(&[b"", b"a"]), hash_of(&[b"a"]));
    }
}
