//! Arguments of Envoy's `set_envoy_filter_state` foreign function.
//!
//! Envoy takes a serialised `SetEnvoyFilterStateArguments{path = 1,
//! value = 2, span = 3}`; three fields do not justify a protobuf runtime in
//! the module, so they are encoded here by hand.

/// The filter-state key the ORIGINAL_DST cluster connects to.
pub const ORIGINAL_DST_ADDRESS: &str = "envoy.network.transport_socket.original_dst_address";

/// The foreign function that sets it.
pub const SET_FILTER_STATE: &str = "set_envoy_filter_state";

/// `LifeSpan.DownstreamRequest`: the value lives as long as this request.
const SPAN_DOWNSTREAM_REQUEST: u64 = 1;

/// Encodes the arguments that point this request's upstream at `addr`.
pub fn original_dst_arguments(addr: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(ORIGINAL_DST_ADDRESS.len() + addr.len() + 8);
    put_bytes(&mut out, 1, ORIGINAL_DST_ADDRESS.as_bytes());
    put_bytes(&mut out, 2, addr.as_bytes());
    put_varint(&mut out, 3 << 3);
    put_varint(&mut out, SPAN_DOWNSTREAM_REQUEST);
    out
}

/// What the load-time probes of Envoy's support ask, and what an answer
/// of `NotFound` means is missing. Envoy answers `BadArgument` to each when
/// the piece exists (checked on 1.36 to 1.40): the first arguments do not
/// parse, the second name the key with a value that is not an address.
/// (A valid address cannot probe: outside a request Envoy answers
/// `NotFound` for it on every version.)
pub fn support_probes() -> [(Vec<u8>, String); 2] {
    let mut bad_value = Vec::new();
    put_bytes(&mut bad_value, 1, ORIGINAL_DST_ADDRESS.as_bytes());
    put_bytes(&mut bad_value, 2, b"not-an-address");
    [
        (
            vec![0xff],
            format!("this Envoy has no foreign function {SET_FILTER_STATE}"),
        ),
        (
            bad_value,
            format!("this Envoy does not know the filter state {ORIGINAL_DST_ADDRESS}"),
        ),
    ]
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_three_fields() {
        let bytes = original_dst_arguments("10.0.0.1:80");
        let mut expected = vec![0x0a, ORIGINAL_DST_ADDRESS.len() as u8];
        expected.extend_from_slice(ORIGINAL_DST_ADDRESS.as_bytes());
        expected.extend_from_slice(&[0x12, 11]);
        expected.extend_from_slice(b"10.0.0.1:80");
        expected.extend_from_slice(&[0x18, 0x01]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn long_lengths_use_multi_byte_varints() {
        let mut out = Vec::new();
        put_varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
    }
}
