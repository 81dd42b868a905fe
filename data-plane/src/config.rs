//! keycap-proxy configuration: flags, each also settable through a
//! `KEYCAP_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keycap_proto::tls::{self, Identity, Trust};

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
    /// Address for Prometheus metrics (`GET /metrics`), apart from the one
    /// agents call; unset: no metrics listener.
    #[arg(long, env = "KEYCAP_PROXY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Directory for the spend spool: every forwarded call's spend is on
    /// disk here until the control plane has applied it, and a restarted
    /// proxy delivers what its previous run left. One proxy per directory.
    /// Unset: spend waits in memory and a proxy that dies loses what it had
    /// not yet delivered.
    #[arg(long, env = "KEYCAP_SPOOL_DIR")]
    pub spool_dir: Option<std::path::PathBuf>,
    /// The control plane's gRPC/REST address. Repeat the flag (or separate
    /// URLs with commas) to name several replicas: calls go to the first
    /// until it stops answering, then move to the next.
    #[arg(
        long = "control-url",
        env = "KEYCAP_CONTROL_URL",
        default_value = "http://127.0.0.1:8081",
        value_delimiter = ',',
        value_parser = parse_control_url
    )]
    pub control_urls: Vec<String>,
    /// Token for the control plane's fleet API.
    #[arg(long, env = "KEYCAP_FLEET_TOKEN", hide_env_values = true)]
    pub fleet_token: String,
    /// This proxy's name in leases and audit entries (default: with
    /// --spool-dir, one kept in the spool directory; else random).
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
    /// PEM certificate chain for serving agents over HTTPS (with
    /// --tls-key); without both, agents are served plain HTTP.
    #[arg(long, env = "KEYCAP_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "KEYCAP_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle that is the whole trust for an `https://` control
    /// plane (default: the system's roots).
    #[arg(long, env = "KEYCAP_CONTROL_CA")]
    pub control_ca: Option<PathBuf>,
    /// PEM certificate this proxy presents to the control plane (mutual
    /// TLS, with --tls-client-key); its DNS name must be the node id.
    #[arg(long, env = "KEYCAP_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key for --tls-client-cert.
    #[arg(long, env = "KEYCAP_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// PEM CA bundle trusted for vendors in addition to the system's roots
    /// (for test vendors with a private CA).
    #[arg(long, env = "KEYCAP_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// How long a client may take to send a request's headers, in seconds;
    /// a connection that is slower (or idle that long between requests) is
    /// closed.
    #[arg(long, env = "KEYCAP_HEADER_READ_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_secs: u64,
    /// Most agent connections served at once, across all serving threads;
    /// further connections wait (unread, in the listen backlog) until one
    /// closes. Requests without a credential whose body is read before
    /// the control plane sees them (the `/vault` relay) may hold a quarter.
    #[arg(long, env = "KEYCAP_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
    /// How long a client has to send a whole request body, in seconds; a
    /// slower one is refused (408) and nothing is forwarded.
    #[arg(long, env = "KEYCAP_BODY_READ_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub body_read_timeout_secs: u64,
    /// The slowest average a request body may arrive at once
    /// --body-rate-grace-secs have passed, in bytes per second (0: no
    /// minimum, only --body-read-timeout-secs).
    #[arg(long, env = "KEYCAP_BODY_MIN_BYTES_PER_SEC", default_value_t = 1024)]
    pub body_min_bytes_per_sec: u64,
    /// Seconds a request body may take before --body-min-bytes-per-sec
    /// applies.
    #[arg(long, env = "KEYCAP_BODY_RATE_GRACE_SECS", default_value_t = 5)]
    pub body_rate_grace_secs: u64,
}

fn parse_zone(s: &str) -> Result<String, String> {
    keycap_proto::network::parse_zone(s).map_err(|e| e.to_string())
}

fn parse_control_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(s.to_string()),
        _ => Err(format!("{s:?} is not an http:// or https:// URL")),
    }
}

fn parse_trusted_proxy(s: &str) -> Result<IpNet, String> {
    keycap_proto::network::parse_cidr(s).map_err(|e| e.to_string())
}

/// The TLS configurations a proxy uses, built once at start so a bad file
/// stops the proxy before it serves anything.
pub struct ProxyTls {
    /// Serving agents; `None` serves plain HTTP.
    pub listener: Option<Arc<rustls::ServerConfig>>,
    /// Calling the control plane (fleet gRPC and the `/vault/*` relay); used for
    /// `https://` control URLs only.
    pub control: rustls::ClientConfig,
    /// Calling vendors.
    pub upstream: rustls::ClientConfig,
}

impl ProxyConfig {
    pub fn tls(&self) -> anyhow::Result<ProxyTls> {
        let listener = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(tls::server_config(
                Identity::load(cert, key)?,
                None,
            )?)),
            _ => None,
        };
        let identity = match (&self.tls_client_cert, &self.tls_client_key) {
            (Some(cert), Some(key)) => Some(Identity::load(cert, key)?),
            _ => None,
        };
        self.check_control_urls()?;
        if identity.is_some() {
            for url in self
                .control_urls
                .iter()
                .filter(|u| !u.starts_with("https://"))
            {
                tracing::warn!(
                    %url,
                    "--tls-client-cert is set but this --control-url is not https://: the certificate is never presented"
                );
            }
        }
        Ok(ProxyTls {
            listener,
            control: tls::client_config(Trust::OnlyOrSystem(self.control_ca.as_deref()), identity)?,
            upstream: tls::client_config(Trust::SystemAnd(self.upstream_ca.as_deref()), None)?,
        })
    }

    /// Replicas are interchangeable, so they are reached the same way: a
    /// mix of `https://` and `http://` would send the fleet token, and the
    /// vendor credentials the policy stream carries, in the clear whenever
    /// the proxy fails over to a plain one.
    fn check_control_urls(&self) -> anyhow::Result<()> {
        let urls = &self.control_urls;
        anyhow::ensure!(!urls.is_empty(), "--control-url names no control plane");
        let tls = urls.iter().filter(|u| u.starts_with("https://")).count();
        anyhow::ensure!(
            tls == 0 || tls == urls.len(),
            "--control-url mixes https:// and http:// replicas; reach every replica over TLS or none"
        );
        for (i, url) in urls.iter().enumerate() {
            anyhow::ensure!(!urls[..i].contains(url), "--control-url names {url} twice");
        }
        Ok(())
    }

    /// The pace every request body must keep.
    pub fn body_pace(&self) -> crate::body::BodyPace {
        crate::body::BodyPace {
            total: Duration::from_secs(self.body_read_timeout_secs),
            grace: Duration::from_secs(self.body_rate_grace_secs),
            min_bytes_per_sec: self.body_min_bytes_per_sec,
        }
    }

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

    #[test]
    fn request_bodies_have_a_pace_by_default_and_a_deadline_always() {
        let pace = parse(&[]).unwrap().body_pace();
        assert_eq!(pace.total, Duration::from_secs(30));
        assert_eq!(pace.grace, Duration::from_secs(5));
        assert_eq!(pace.min_bytes_per_sec, 1024);
        let no_minimum = parse(&["--body-min-bytes-per-sec", "0"]).unwrap();
        assert_eq!(no_minimum.body_pace().min_bytes_per_sec, 0);
        assert!(parse(&["--body-read-timeout-secs", "0"]).is_err());
    }

    #[test]
    fn control_urls_are_repeated_or_comma_separated() {
        let one = parse(&[]).unwrap();
        assert_eq!(one.control_urls, ["http://127.0.0.1:8081"]);
        let c = parse(&[
            "--control-url",
            "http://a:8081,http://b:8081",
            "--control-url",
            "http://c:8081",
        ])
        .unwrap();
        assert_eq!(
            c.control_urls,
            ["http://a:8081", "http://b:8081", "http://c:8081"]
        );
        c.check_control_urls().unwrap();
        assert!(parse(&["--control-url", "a:8081"]).is_err());
        assert!(parse(&["--control-url", "ftp://a:8081"]).is_err());
        assert!(parse(&["--control-url", "http://a:8081,"]).is_err());
    }

    #[test]
    fn replicas_are_all_reached_over_tls_or_none() {
        let mixed = parse(&["--control-url", "https://a:8081,http://b:8081"]).unwrap();
        let e = mixed.check_control_urls().unwrap_err().to_string();
        assert!(e.contains("mixes"), "{e}");
        let twice = parse(&["--control-url", "https://a:8081,https://a:8081"]).unwrap();
        assert!(twice.check_control_urls().is_err());
        let tls = parse(&["--control-url", "https://a:8081,https://b:8081"]).unwrap();
        tls.check_control_urls().unwrap();
    }
}
