//! The run's trace: one line per scenario event, router event and check,
//! plus a hash over every line and every datagram, so two runs can be
//! compared byte for byte.

use weft_core::Time;

#[derive(Default)]
pub struct Trace {
    /// Keep the lines (for `--trace`); the hash is always kept.
    pub keep: bool,
    pub lines: Vec<String>,
    hash: u64,
}

impl Trace {
    pub fn line(&mut self, now: Time, node: &str, what: &str) {
        let line = format!("{:>10.3} {node:<8} {what}", now.since_epoch().as_secs_f64());
        self.absorb(line.as_bytes());
        if self.keep {
            self.lines.push(line);
        }
    }

    pub fn datagram(&mut self, bytes: &[u8]) {
        self.absorb(bytes);
    }

    fn absorb(&mut self, bytes: &[u8]) {
        // FNV-1a: fixed and the same on every machine.
        let mut h = if self.hash == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.hash
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
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
