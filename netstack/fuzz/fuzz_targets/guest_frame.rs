//! Arbitrary bytes as a guest ethernet frame: the parser must never panic, and whatever it
//! accepts must stay inside the input.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use netstack::frame::{parse_guest_frame, GuestPacket};

const GATEWAY_MAC: [u8; 6] = [0x02, 0x64, 0x69, 0x6e, 0x76, 0x01];

fuzz_target!(|data: &[u8]| {
    for verify in [true, false] {
        if let Ok(frame) = parse_guest_frame(data, GATEWAY_MAC, Ipv4Addr::new(10, 234, 0, 15), verify) {
            match frame.packet {
                GuestPacket::Udp { payload, .. } => assert!(payload.len() <= data.len()),
                GuestPacket::IcmpEcho { data: d, .. } => assert!(d.len() <= data.len()),
                _ => {}
            }
        }
    }
});
