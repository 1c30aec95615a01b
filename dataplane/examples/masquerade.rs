//! Installs weft's masquerade table for RANGE in this network namespace,
//! COUNT times (default 1), and prints the mean time of one install: the
//! measurement behind the README's "nfnetlink vs nft" numbers.
//!
//!     ip netns exec NS cargo run --release -p weft-dataplane --example masquerade -- 10.32.0.0/12 1000

use std::time::Instant;

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let range = args
        .next()
        .ok_or("usage: masquerade RANGE [COUNT]")?
        .parse()
        .map_err(|e| format!("RANGE: {e}"))?;
    let count: u32 = match args.next() {
        Some(n) => n.parse().map_err(|e| format!("COUNT: {e}"))?,
        None => 1,
    };
    let start = Instant::now();
    for _ in 0..count {
        weft_dataplane::nftables::install_masquerade(range).map_err(|e| e.to_string())?;
    }
    println!(
        "{count} installs, {:.1} µs each",
        start.elapsed().as_secs_f64() * 1e6 / f64::from(count.max(1))
    );
    Ok(())
}
