//! Arbitrary datagrams into a running router: must never panic, and the
//! router must keep producing valid outputs.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use weft_core::{Config, Router, Time};

fuzz_target!(|data: &[u8]| {
    let addr: SocketAddr = "192.168.1.11:6783".parse().unwrap();
    let from: SocketAddr = "192.168.1.12:6783".parse().unwrap();
    let mut router = Router::new(Config::new("fuzz", addr), None, [0; 32], Time::ZERO).unwrap();
    router.handle_timeout(Time::ZERO);
    // Several datagrams, split at 0xFF 0xFE markers.
    for (i, chunk) in data.split(|b| *b == 0xfe).enumerate() {
        let now = Time::from_millis(i as u64 * 100);
        router.handle_datagram(now, from, chunk);
        router.handle_timeout(now);
        while router.poll_transmit().is_some() {}
        while router.poll_event().is_some() {}
    }
    let _ = router.status(Time::from_millis(10_000));
});
