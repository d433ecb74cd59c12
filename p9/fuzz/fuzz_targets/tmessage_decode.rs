//! Fuzz the 9P2000.L codec: any byte string either fails to decode or
//! decodes to a message that re-encodes to exactly the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p9::wire::{Rmessage, Tmessage};

fuzz_target!(|data: &[u8]| {
    if let Ok((tag, m)) = Tmessage::decode_frame(data) {
        let mut out = Vec::new();
        m.encode(tag, &mut out)
            .expect("a decoded message re-encodes");
        // Tfsync may omit `datasync`; the encoder always writes it.
        if !matches!(m, Tmessage::Fsync { .. }) {
            assert_eq!(out, data);
        }
        assert_eq!(Tmessage::decode_frame(&out).expect("re-decodes").1, m);
    }
    if let Ok((tag, m)) = Rmessage::decode_frame(data) {
        let mut out = Vec::new();
        m.encode(tag, &mut out)
            .expect("a decoded message re-encodes");
        assert_eq!(out, data);
    }
});
