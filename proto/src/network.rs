//! A key's network limits: the client networks it may be used from, the
//! zone of proxies that may serve it, and its request rate; and which
//! addresses a vendor's calls may go to (`is_public_upstream`).
//!
//! Parsed by the control plane when a key is minted and again by the proxy
//! when the key arrives in its policy, with the same rules, so a key the
//! control plane accepts is never one a proxy would drop. Matching happens
//! in the proxy. Nothing here does I/O.

use std::net::IpAddr;

pub use ipnet::IpNet;

/// Most CIDRs one key may list.
pub const MAX_ALLOWED_CIDRS: usize = 64;
/// Highest per-key rate a key may state: 10,000 calls a second. Anything
/// above is a typo rather than a limit.
pub const MAX_RATE_LIMIT_PER_MINUTE: u32 = 600_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error("{0:?} is not a CIDR like \"10.0.0.0/8\" or an IP address")]
    NotCidr(String),
    #[error("{given:?} has host bits set; did you mean {network} (or {given_host}/{max_len} for one address)?")]
    HostBits {
        given: String,
        network: IpNet,
        given_host: IpAddr,
        max_len: u8,
    },
    #[error("at most {MAX_ALLOWED_CIDRS} CIDRs")]
    TooManyCidrs,
    #[error("zones are 1-64 characters of a-z, 0-9 and '-', not starting with '-'")]
    BadZone,
    #[error("must be at most {MAX_RATE_LIMIT_PER_MINUTE} requests per minute")]
    RateTooHigh,
}

/// One allowed network: `10.0.0.0/8`, `2001:db8::/32`, or a single address
/// (`192.0.2.7`, taken as `/32` or `/128`). A network with host bits set
/// (`10.0.0.1/8`) is refused rather than silently widened or narrowed: it
/// is usually a typo for one or the other. IPv4-mapped IPv6 networks are
/// stored as the IPv4 network they name.
pub fn parse_cidr(s: &str) -> Result<IpNet, NetworkError> {
    let t = s.trim();
    let net = match t.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match t.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => return Err(NetworkError::NotCidr(crate::clip(s, 64))),
        },
    };
    if net.trunc() != net {
        return Err(NetworkError::HostBits {
            given: t.to_string(),
            network: net.trunc(),
            given_host: net.addr(),
            max_len: net.max_prefix_len(),
        });
    }
    Ok(canonical_net(net))
}

/// A key's allowed networks, at most `MAX_ALLOWED_CIDRS`, duplicates
/// removed, in the order given.
pub fn parse_cidrs<S: AsRef<str>>(list: &[S]) -> Result<Vec<IpNet>, NetworkError> {
    if list.len() > MAX_ALLOWED_CIDRS {
        return Err(NetworkError::TooManyCidrs);
    }
    let mut out: Vec<IpNet> = Vec::with_capacity(list.len());
    for s in list {
        let net = parse_cidr(s.as_ref())?;
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

/// A zone name: what a proxy is started with (`--zone`) and a key may be
/// bound to. 1-64 characters of a-z, 0-9 and '-'.
pub fn parse_zone(s: &str) -> Result<String, NetworkError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(NetworkError::BadZone)
    }
}

/// A key's rate limit in requests per minute: 0 means none.
pub fn parse_rate_limit(per_minute: u32) -> Result<Option<u32>, NetworkError> {
    match per_minute {
        0 => Ok(None),
        n if n > MAX_RATE_LIMIT_PER_MINUTE => Err(NetworkError::RateTooHigh),
        n => Ok(Some(n)),
    }
}

/// `ip` in the form networks are compared in: an IPv4-mapped IPv6 address
/// (`::ffff:192.0.2.7`, what a dual-stack listener reports for an IPv4
/// client) becomes the IPv4 address.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

/// Whether `ip` is inside any of `nets`.
pub fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical_ip(ip);
    nets.iter().any(|n| n.contains(&ip))
}

/// Whether a vendor's calls may be sent to `ip` without the control
/// plane's `--allow-private-upstreams`: a globally routable unicast
/// address. Refused: loopback, private (10/8, 172.16/12, 192.168/16,
/// fc00::/7), link-local (169.254/16 with cloud metadata services, fe80::/10),
/// CGNAT 100.64/10, unspecified and "this network" 0/8, broadcast,
/// multicast, reserved and benchmarking ranges, documentation ranges, and
/// IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64, 6to4)
/// when that address is refused. Checked by the control plane when a vendor
/// is registered and by the proxy on every address it connects to.
pub fn is_public_upstream(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: std::net::Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b))
        || (a == 169 && b == 254)
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 168)
        || (a == 192 && b == 0 && (c == 0 || c == 2))
        || (a == 198 && (b == 18 || b == 19))
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
        || a >= 224)
}

fn is_public_v6(ip: std::net::Ipv6Addr) -> bool {
    let seg = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| {
        std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
    };
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    match seg {
        // :: and ::1, and the deprecated IPv4-compatible ::a.b.c.d.
        [0, 0, 0, 0, 0, 0, hi, lo] => hi != 0 && is_public_v4(embedded_v4(hi, lo)),
        // NAT64 (64:ff9b::/96) reaches the IPv4 address it carries.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => is_public_v4(embedded_v4(hi, lo)),
        // 6to4 (2002::/16) likewise.
        [0x2002, hi, lo, ..] => is_public_v4(embedded_v4(hi, lo)),
        // Teredo, documentation, ORCHID and benchmarking ranges.
        [0x2001, 0, ..] | [0x2001, 0xdb8, ..] | [0x2001, 0x2, 0, ..] => false,
        [0x2001, s, ..] if (0x10..0x30).contains(&s) => false,
        // Unique local fc00::/7, link-local fe80::/10, site-local fec0::/10,
        // multicast ff00::/8.
        [s, ..] if (s & 0xfe00) == 0xfc00 || (s & 0xffc0) == 0xfe80 => false,
        [s, ..] if (s & 0xffc0) == 0xfec0 || (s & 0xff00) == 0xff00 => false,
        // Only 2000::/3 is allocated global unicast.
        [s, ..] => (s & 0xe000) == 0x2000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_to_networks_and_refuse_typos() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            parse_cidr(" 192.0.2.7 ").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            parse_cidr("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        assert_eq!(parse_cidr("::1").unwrap().to_string(), "::1/128");
        assert_eq!(
            parse_cidr("::ffff:10.0.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
        let e = parse_cidr("10.0.0.1/8").unwrap_err().to_string();
        assert!(e.contains("10.0.0.0/8") && e.contains("10.0.0.1/32"), "{e}");
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0/8",
            "example.com",
            "10.0.0.0/-1",
            "*",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        let many: Vec<String> = (0..=MAX_ALLOWED_CIDRS)
            .map(|i| format!("10.0.{i}.0/24"))
            .collect();
        assert_eq!(parse_cidrs(&many), Err(NetworkError::TooManyCidrs));
        assert_eq!(parse_cidrs(&["10.0.0.0/8", "10.0.0.0/8"]).unwrap().len(), 1);
    }

    #[test]
    fn membership_treats_mapped_ipv4_as_ipv4() {
        let nets = parse_cidrs(&["127.0.0.0/8", "2001:db8::/32"]).unwrap();
        assert!(contains(&nets, "127.0.0.1".parse().unwrap()));
        assert!(contains(&nets, "::ffff:127.0.0.1".parse().unwrap()));
        assert!(contains(&nets, "2001:db8::5".parse().unwrap()));
        assert!(!contains(&nets, "10.0.0.1".parse().unwrap()));
        assert!(!contains(&nets, "::1".parse().unwrap()));
    }

    #[test]
    fn zones_and_rates() {
        assert_eq!(parse_zone("eu-west-1").unwrap(), "eu-west-1");
        for bad in ["", "EU", "eu west", "-eu", &"a".repeat(65)] {
            assert!(parse_zone(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_rate_limit(0), Ok(None));
        assert_eq!(parse_rate_limit(60), Ok(Some(60)));
        assert_eq!(
            parse_rate_limit(MAX_RATE_LIMIT_PER_MINUTE + 1),
            Err(NetworkError::RateTooHigh)
        );
    }

    #[test]
    fn only_globally_routable_addresses_are_public_upstreams() {
        for public in [
            "93.184.216.34",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.0.1",
            "172.32.0.1",
            "169.253.1.1",
            "2606:4700::1111",
            "2a00:1450:4001:80b::200e",
            "::ffff:93.184.216.34",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public_upstream(public.parse().unwrap()), "{public}");
        }
        for private in [
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "100.64.0.1",
            "100.127.255.255",
            "127.0.0.1",
            "127.255.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "192.0.0.170",
            "192.0.2.1",
            "198.18.0.1",
            "198.51.100.1",
            "203.0.113.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::127.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::1",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "2001::1",
            "100::1",
        ] {
            assert!(!is_public_upstream(private.parse().unwrap()), "{private}");
        }
    }
}
