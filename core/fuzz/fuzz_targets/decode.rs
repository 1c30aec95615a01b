//! Arbitrary bytes through the datagram decoder: must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weft_core::seal::Sealer;
use weft_core::wire::{Frame, Message};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::parse(data) {
        let _ = frame.plain_message();
        let _ = frame.open_message(&Sealer::new(b"fuzz"));
    }
    let _ = Message::decode(data);
});
