//! keycap-proxy configuration: flags, each also settable through a
//! `KEYCAP_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// How long a client may take to send a request's headers, in seconds;
    /// a connection that is slower (or idle that long between requests) is
    /// closed.
    #[arg(long, env = "KEYCAP_HEADER_READ_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_secs: u64,
    /// Most agent connections served at once, across all serving threads;
    /// further connections wait (unread, in the listen backlog) until one
    /// closes.
    #[arg(long, env = "KEYCAP_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
}

impl ProxyConfig {
    pub fn node_id(&self) -> String {
        self.node_id
            .clone()
            .unwrap_or_else(|| format!("proxy-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
    }
}
