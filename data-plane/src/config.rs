//! keycap-proxy configuration: flags, each also settable through a
//! `KEYCAP_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use keycap_proto::network::IpNet;

#[derive(clap::Args, Clone, Debug)]
pub struct ProxyConfig {
    /// Address agents call.
    #[arg(
        long = "listen",
        env = "KEYCAP_PROXY_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,
    /// The control plane's gRPC/REST address.
    #[arg(
        long,
        env = "KEYCAP_CONTROL_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub control_url: String,
    /// Token for the control plane's fleet API.
    #[arg(long, env = "KEYCAP_FLEET_TOKEN", hide_env_values = true)]
    pub fleet_token: String,
    /// This proxy's name in leases and audit entries (default: random).
    #[arg(long, env = "KEYCAP_NODE_ID")]
    pub node_id: Option<String>,
    /// JSON price table overriding the built-in OpenAI prices.
    #[arg(long, env = "KEYCAP_OPENAI_PRICES")]
    pub openai_prices: Option<PathBuf>,
    /// JSON price table replacing the built-in Anthropic prices.
    #[arg(long, env = "KEYCAP_ANTHROPIC_PRICES")]
    pub anthropic_prices: Option<PathBuf>,
    /// JSON price table replacing the built-in Twilio prices.
    #[arg(long, env = "KEYCAP_TWILIO_PRICES")]
    pub twilio_prices: Option<PathBuf>,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "KEYCAP_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Largest priced (buffered) response body, in bytes.
    #[arg(long, env = "KEYCAP_MAX_RESPONSE_BYTES", default_value_t = 16 << 20)]
    pub max_response_bytes: usize,
    /// How long to wait for a vendor's response headers, in seconds.
    #[arg(long, env = "KEYCAP_UPSTREAM_TIMEOUT_SECS", default_value_t = 60)]
    pub upstream_timeout_secs: u64,
    /// Threads serving agents, each with its own connections and upstream
    /// pool (0: one per CPU).
    #[arg(long, env = "KEYCAP_PROXY_SERVE_THREADS", default_value_t = 0)]
    pub serve_threads: usize,
    /// The zone this proxy serves (e.g. eu): a key bound to a zone is
    /// served only by proxies of that zone. Unset: only keys without a zone.
    #[arg(long, env = "KEYCAP_ZONE", value_parser = parse_zone)]
    pub zone: Option<String>,
    /// Comma-separated CIDRs of the balancers in front of this proxy. Only
    /// a call from one of them has its client address read from
    /// X-Forwarded-For; otherwise the TCP peer is the client.
    #[arg(
        long,
        env = "KEYCAP_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_parser = parse_trusted_proxy
    )]
    pub trusted_proxies: Vec<IpNet>,
}

fn parse_zone(s: &str) -> Result<String, String> {
    keycap_proto::network::parse_zone(s).map_err(|e| e.to_string())
}

fn parse_trusted_proxy(s: &str) -> Result<IpNet, String> {
    keycap_proto::network::parse_cidr(s).map_err(|e| e.to_string())
}

impl ProxyConfig {
    pub fn node_id(&self) -> String {
        self.node_id
            .clone()
            .unwrap_or_else(|| format!("proxy-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: ProxyConfig,
    }

    fn parse(args: &[&str]) -> Result<ProxyConfig, clap::Error> {
        let base = ["keycap-proxy", "--fleet-token", "t"];
        Cli::try_parse_from(base.iter().chain(args)).map(|c| c.config)
    }

    #[test]
    fn zone_and_trusted_proxies_are_validated_at_start() {
        let c = parse(&["--zone", "eu", "--trusted-proxies", "10.0.0.0/8,127.0.0.1"]).unwrap();
        assert_eq!(c.zone.as_deref(), Some("eu"));
        let nets: Vec<String> = c.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.0.0.0/8", "127.0.0.1/32"]);
        let none = parse(&[]).unwrap();
        assert!(none.zone.is_none() && none.trusted_proxies.is_empty());
        assert!(parse(&["--zone", "EU"]).is_err());
        assert!(parse(&["--trusted-proxies", "10.0.0.1/8"]).is_err());
        assert!(parse(&["--trusted-proxies", "lb.internal"]).is_err());
    }
}
