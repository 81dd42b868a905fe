//! Which address a call comes from, for keys limited to client networks.
//!
//! The address is the TCP peer's. Only when the peer is one of the proxies
//! the operator trusts (`--trusted-proxies`) is `X-Forwarded-For` read, and
//! then from the right: each trusted hop appended the address it saw, so
//! the rightmost entry that is not itself a trusted proxy is the client.
//! Entries further left were written by the client and are never believed.
//! A header that cannot be read where it matters leaves the peer's address.
//! This module never fails a request and never logs an address.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use keycap_proto::network::{canonical_ip, contains, IpNet};

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The client's address for a call from `peer` with `headers`.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical_ip(peer);
    if !contains(trusted, peer) {
        return peer;
    }
    // Several header lines are one list, in order. Split as bytes, so
    // bytes that are not text in an entry the client wrote cannot spoil
    // the entries trusted hops appended after it.
    let entries: Vec<&[u8]> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .collect();
    let mut leftmost = None;
    for entry in entries.into_iter().rev() {
        let Some(ip) = parse_entry(entry) else {
            return peer;
        };
        if !contains(trusted, ip) {
            return ip;
        }
        leftmost = Some(ip);
    }
    // Every hop is a trusted proxy: the first of them is the client.
    leftmost.unwrap_or(peer)
}

/// One `X-Forwarded-For` entry: an address, or an address with a port
/// (`192.0.2.7:4711`, `[2001:db8::1]:4711`) as some balancers write it.
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let t = std::str::from_utf8(entry).ok()?.trim();
    t.parse::<IpAddr>()
        .or_else(|_| t.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(canonical_ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keycap_proto::network::parse_cidrs;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(X_FORWARDED_FOR, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client() {
        let h = xff(&["203.0.113.9"]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &[]), ip("127.0.0.1"));
        let trusted = parse_cidrs(&["10.0.0.0/8"]).unwrap();
        // A peer outside the trusted networks cannot speak for anyone.
        assert_eq!(
            client_ip(ip("198.51.100.1"), &h, &trusted),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn a_trusted_peer_names_the_rightmost_untrusted_hop() {
        let trusted = parse_cidrs(&["10.0.0.0/8", "127.0.0.1/32"]).unwrap();
        let peer = ip("127.0.0.1");
        // The client claims 1.1.1.1; the balancer saw 203.0.113.9.
        let h = xff(&["1.1.1.1, 203.0.113.9, 10.0.0.2"]);
        assert_eq!(client_ip(peer, &h, &trusted), ip("203.0.113.9"));
        // Split over several header lines: the same list.
        let h = xff(&["1.1.1.1", "203.0.113.9", "10.0.0.2"]);
        assert_eq!(client_ip(peer, &h, &trusted), ip("203.0.113.9"));
        // Ports and IPv4-mapped addresses are read as the address.
        let h = xff(&["[::ffff:203.0.113.9]:4711"]);
        assert_eq!(client_ip(peer, &h, &trusted), ip("203.0.113.9"));
        let h = xff(&["203.0.113.9:4711"]);
        assert_eq!(client_ip(peer, &h, &trusted), ip("203.0.113.9"));
        // No header: the trusted peer itself.
        assert_eq!(client_ip(peer, &HeaderMap::new(), &trusted), peer);
        // Every hop trusted: the first one.
        let h = xff(&["10.0.0.7, 10.0.0.2"]);
        assert_eq!(client_ip(peer, &h, &trusted), ip("10.0.0.7"));
        // A mapped peer is matched as IPv4.
        assert_eq!(
            client_ip(ip("::ffff:127.0.0.1"), &xff(&["203.0.113.9"]), &trusted),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn malformed_entries_fall_back_to_the_peer_only_where_they_matter() {
        let trusted = parse_cidrs(&["127.0.0.1/32"]).unwrap();
        let peer = ip("127.0.0.1");
        for bad in ["garbage", "", " , ", "203.0.113.9,", "unknown", "1.2.3.4.5"] {
            assert_eq!(client_ip(peer, &xff(&[bad]), &trusted), peer, "{bad:?}");
        }
        // Garbage the client wrote left of the hop the proxy added is
        // never read: it cannot turn the call into the proxy's own.
        let h = xff(&["garbage, 203.0.113.9"]);
        assert_eq!(client_ip(peer, &h, &trusted), ip("203.0.113.9"));
        // Bytes that are not text: in the entry that matters, the peer;
        // left of it, ignored.
        let raw = |b: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(X_FORWARDED_FOR, http::HeaderValue::from_bytes(b).unwrap());
            h
        };
        assert_eq!(client_ip(peer, &raw(b"203.0.113.9\xff"), &trusted), peer);
        assert_eq!(
            client_ip(peer, &raw(b"\xff\xfe, 203.0.113.9"), &trusted),
            ip("203.0.113.9")
        );
    }
}
