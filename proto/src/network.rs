//! A key's network limits: the client networks it may be used from, the
//! zone of proxies that may serve it, and its request rate.
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
}
