//! Configuration: a TOML file (serde) overlaid by command-line flags (clap),
//! parsed once into a typed, read-only [`Config`] that every shard shares.

pub mod bridge;

pub use crate::logging::LogFormat;
use clap::Parser;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use tarta_proto::cidr::Cidr;
use tarta_proto::ws::HandshakeConfig;

/// Command-line flags. Flags override the file given with `--config`.
#[derive(Debug, Parser)]
#[command(
    name = "tarta",
    version,
    about = "Tarta: a thread-per-core MQTT broker",
    after_help = "Password files: tarta passwd [-c] [-I ITERATIONS] FILE USER (see tarta passwd --help)."
)]
pub struct Cli {
    /// TOML configuration file (see docs/CONFIG.md).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// MQTT over TCP listener address (repeatable). Default 127.0.0.1:1883
    /// (when no listener is given at all).
    #[arg(long = "tcp", value_name = "ADDR")]
    pub tcp: Vec<SocketAddr>,
    /// MQTT over WebSocket listener address (repeatable). Default
    /// 127.0.0.1:8083 (when no listener is given at all).
    #[arg(long = "ws", value_name = "ADDR")]
    pub ws: Vec<SocketAddr>,
    /// MQTT over TLS listener address (repeatable; needs --cert and --key).
    #[arg(long = "mqtts", value_name = "ADDR")]
    pub mqtts: Vec<SocketAddr>,
    /// HTTP-only listener for /metrics and /health (repeatable), e.g. to
    /// keep metrics off the public ports.
    #[arg(long = "http", value_name = "ADDR")]
    pub http: Vec<SocketAddr>,
    /// MQTT over secure WebSocket listener address (repeatable; needs
    /// --cert and --key).
    #[arg(long = "wss", value_name = "ADDR")]
    pub wss: Vec<SocketAddr>,
    /// PEM certificate chain of the --mqtts/--wss listeners.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// PEM private key of the --mqtts/--wss listeners.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// PEM CA certificates that client certificates are verified against
    /// (--mqtts/--wss listeners).
    #[arg(long, value_name = "FILE")]
    pub cafile: Option<PathBuf>,
    /// Refuse TLS clients without a valid certificate (needs --cafile).
    #[arg(long = "require-certificate")]
    pub require_certificate: bool,
    /// WebSocket path (default /mqtt).
    #[arg(long = "ws-path", value_name = "PATH")]
    pub ws_path: Option<String>,
    /// Number of shards (one executor thread each). Default: CPUs available.
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// Mosquitto-format ACL file.
    #[arg(long = "acl-file", value_name = "FILE")]
    pub acl_file: Option<PathBuf>,
    /// Mosquitto-format password file (`user:$7$...`; `tarta passwd`
    /// writes one). With it, clients must authenticate unless
    /// --allow-anonymous true.
    #[arg(long = "password-file", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Whether clients without a username may connect (default: true
    /// without a password file, false with one).
    #[arg(long = "allow-anonymous", value_name = "BOOL")]
    pub allow_anonymous: Option<bool>,
    /// Largest keep-alive a client may ask for, in seconds.
    #[arg(long = "max-keepalive", value_name = "SECS")]
    pub max_keepalive: Option<u16>,
    /// Log level or tracing filter (error, warn, info, debug, trace).
    #[arg(long, value_name = "LEVEL")]
    pub log: Option<String>,
    /// Log line format: text, or json (one object per line).
    #[arg(long = "log-format", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Do not pin shards to CPUs (better when other busy processes share the cores).
    #[arg(long = "no-pin")]
    pub no_pin: bool,
    /// Seconds between `$SYS/tarta/...` statistics publications (0 = off).
    #[arg(long = "sys-interval", value_name = "SECS")]
    pub sys_interval: Option<u32>,
    /// Directory of the write-ahead logs (default `tarta-data` in the
    /// working directory).
    #[arg(long = "data-dir", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Keep everything in memory: nothing survives a restart.
    #[arg(long = "no-persistence")]
    pub no_persistence: bool,
    /// When the log is synced to disk: always (before every acknowledgement
    /// that promises durability; group commit), interval, or never.
    #[arg(long, value_name = "POLICY")]
    pub fsync: Option<FsyncPolicy>,
    /// Milliseconds between syncs with `--fsync interval`.
    #[arg(long = "fsync-interval-ms", value_name = "MS")]
    pub fsync_interval_ms: Option<u64>,
}

/// When the write-ahead log reaches the disk (docs/OPERATIONS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// fdatasync before the acknowledgements that depend on a batch
    /// (survives a power loss).
    Always,
    /// Acknowledge once written to the page cache; fdatasync every
    /// `fsync_interval_ms` (a power loss may lose that window).
    Interval,
    /// Page cache only: survives a crash of the process, not of the machine.
    Never,
}

/// The TOML file. Every field is optional; see docs/CONFIG.md.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listener: Option<Vec<ListenerFile>>,
    pub trusted_proxies: Option<Vec<String>>,
    pub tcp: Option<Vec<SocketAddr>>,
    pub ws: Option<Vec<SocketAddr>>,
    pub ws_path: Option<String>,
    pub ws_require_subprotocol: Option<bool>,
    pub ws_origins: Option<Vec<String>>,
    pub ws_trusted_proxies: Option<Vec<IpAddr>>,
    pub ws_max_request: Option<usize>,
    pub shards: Option<usize>,
    pub pin: Option<bool>,
    pub acl_file: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
    pub allow_anonymous: Option<bool>,
    pub auth_failure_delay_ms: Option<u64>,
    pub metrics: Option<bool>,
    pub http: Option<Vec<SocketAddr>>,
    pub admin_token: Option<String>,
    pub dashboard: Option<bool>,
    pub max_keepalive: Option<u16>,
    pub log: Option<String>,
    pub log_format: Option<LogFormat>,
    pub max_packet_size: Option<u32>,
    pub max_inflight: Option<u16>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub max_queued_messages: Option<usize>,
    pub max_queued_bytes: Option<usize>,
    pub connect_timeout: Option<u32>,
    pub sys_interval: Option<u32>,
    pub allow_zero_length_clientid: Option<bool>,
    pub mesh_capacity: Option<usize>,
    pub io_memory: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_connections_per_address: Option<u32>,
    pub connection_rate_per_address: Option<u32>,
    pub connection_burst_per_address: Option<u32>,
    pub limits_exempt: Option<Vec<String>>,
    pub max_subscriptions_per_client: Option<usize>,
    pub max_topic_levels: Option<usize>,
    pub max_topic_length: Option<usize>,
    pub max_publish_rate: Option<u32>,
    pub max_publish_bytes_rate: Option<u64>,
    pub max_client_id_length: Option<usize>,
    pub transparent_huge_pages: Option<bool>,
    pub persistence: Option<bool>,
    pub data_dir: Option<PathBuf>,
    pub fsync: Option<FsyncPolicy>,
    pub fsync_interval_ms: Option<u64>,
    pub log_compact_bytes: Option<u64>,
    pub bridge: Option<Vec<bridge::BridgeFile>>,
}

/// What a listener speaks above TCP (and TLS, if it has it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenProtocol {
    /// MQTT directly.
    Mqtt,
    /// MQTT over WebSocket.
    Ws,
    /// HTTP only: /metrics, /health (no MQTT, no WebSocket upgrade).
    Http,
}

/// A listener's TLS settings (file paths; read at start and on SIGHUP).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that client certificates are verified against.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a valid certificate.
    #[serde(default)]
    pub require_client_cert: bool,
    /// The client certificate's subject CN is the client's username (for
    /// the ACL), whatever CONNECT says. Needs `require_client_cert`.
    #[serde(default)]
    pub identity_as_username: bool,
}

/// One `[[listener]]` table of the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub bind: SocketAddr,
    pub protocol: Option<ListenProtocol>,
    pub tls: Option<TlsFiles>,
    pub proxy_protocol: Option<bool>,
    pub trusted_proxies: Option<Vec<String>>,
    pub ws_path: Option<String>,
    pub max_connections: Option<usize>,
    pub password_file: Option<PathBuf>,
    pub allow_anonymous: Option<bool>,
    pub metrics: Option<bool>,
}

/// A resolved listener.
#[derive(Debug, Clone)]
pub struct Listener {
    pub bind: SocketAddr,
    pub protocol: ListenProtocol,
    pub tls: Option<TlsFiles>,
    /// Expect a PROXY protocol v1/v2 header before anything else.
    pub proxy_protocol: bool,
    /// Peers allowed to send a PROXY header (others are closed).
    pub trusted_proxies: Vec<Cidr>,
    /// WebSocket handshake rules (path, subprotocols, origins, proxies).
    pub ws: HandshakeConfig,
    /// Connections open at once on this listener (0 = no limit).
    pub max_connections: usize,
    /// Serves `GET /metrics` (WebSocket and HTTP listeners).
    pub metrics: bool,
    /// The password file clients of this listener authenticate against.
    pub password_file: Option<PathBuf>,
    /// Whether clients without credentials may connect here.
    pub allow_anonymous: bool,
}

impl Listener {
    /// The stacking's short name: tcp, ws, tls or wss (logs, stdout).
    pub fn name(&self) -> &'static str {
        match (self.protocol, self.tls.is_some()) {
            (ListenProtocol::Mqtt, false) => "tcp",
            (ListenProtocol::Ws, false) => "ws",
            (ListenProtocol::Mqtt, true) => "tls",
            (ListenProtocol::Ws, true) => "wss",
            (ListenProtocol::Http, false) => "http",
            (ListenProtocol::Http, true) => "https",
        }
    }
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Every listener, in the order configured.
    pub listeners: Vec<Listener>,
    pub shards: usize,
    pub pin: bool,
    pub acl_file: Option<PathBuf>,
    /// How long a refused login waits before its CONNACK (slows guessing;
    /// the shard goes on meanwhile).
    pub auth_failure_delay_ms: u64,
    /// The admin API's bearer token (None: the API is off).
    pub admin_token: Option<String>,
    /// Serve the live dashboard at `/` on WebSocket listeners.
    pub dashboard: bool,
    /// Largest keep-alive accepted (3.x clients asking for more are refused
    /// with "identifier rejected", as Mosquitto does; 0 = no limit).
    pub max_keepalive: u16,
    pub log: String,
    pub log_format: LogFormat,
    /// Largest MQTT packet accepted, in bytes (checked before buffering the body).
    pub max_packet_size: u32,
    /// QoS 1/2 messages in flight to one client before more are queued.
    pub max_inflight: u16,
    /// 5.0 Receive Maximum the broker grants clients (unacknowledged QoS 2
    /// messages from one client; more is DISCONNECT 0x93).
    pub receive_maximum: u16,
    /// 5.0 Topic Alias Maximum the broker accepts from clients.
    pub topic_alias_maximum: u16,
    /// QoS 1/2 messages queued per session (offline or over the inflight window).
    pub max_queued_messages: usize,
    /// Bytes queued for writing to one connection before QoS 0 messages to it are dropped.
    pub max_queued_bytes: usize,
    /// Seconds a new connection has to send CONNECT.
    pub connect_timeout: u32,
    /// Seconds between `$SYS` statistics (0 = off).
    pub sys_interval: u32,
    /// Whether a client may connect with an empty client id (one is assigned).
    pub allow_zero_length_clientid: bool,
    /// Batches queued between two shards before the sender holds back.
    pub mesh_capacity: usize,
    /// glommio io_memory per shard (registered buffers for DMA file I/O).
    pub io_memory: usize,
    /// Let the kernel back the heap with transparent huge pages. Off by
    /// default: the allocator asks for them (MADV_HUGEPAGE), and a mostly
    /// idle heap of small per-connection objects then costs whole 2 MiB
    /// pages (measured: +17 MB at start, +1 KB per idle connection).
    pub transparent_huge_pages: bool,
    /// The write-ahead log: None keeps everything in memory.
    pub store: Option<StoreConfig>,
    /// Limits per process, per address and per client (0 = no limit).
    pub limits: Limits,
    /// Links to other brokers (`[[bridge]]`).
    pub bridges: Vec<bridge::Bridge>,
    /// This process's identity in bridges' hop markers.
    pub hop_id: String,
}

/// Limits that keep one client or one address from harming the others
/// (docs/CONFIG.md "Limits" gives the defaults and why). 0 = no limit.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections open at once, all listeners.
    pub max_connections: usize,
    /// Connections open at once from one client address.
    pub max_connections_per_address: u32,
    /// New connections per second from one address (token bucket refill)...
    pub connection_rate_per_address: u32,
    /// ...and how many may come at once (bucket size).
    pub connection_burst_per_address: u32,
    /// Addresses the per-address limits do not apply to.
    pub exempt: Vec<Cidr>,
    pub max_subscriptions_per_client: usize,
    /// Levels and bytes of a topic name or filter.
    pub max_topic_levels: usize,
    pub max_topic_length: usize,
    /// Inbound PUBLISH packets per second per client (QoS 1/2 publishers
    /// are paused, QoS 0 beyond it is dropped).
    pub max_publish_rate: u32,
    /// Inbound PUBLISH payload bytes per second per client.
    pub max_publish_bytes_rate: u64,
    pub max_client_id_length: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 0,
            max_connections_per_address: 1000,
            connection_rate_per_address: 50,
            connection_burst_per_address: 200,
            exempt: ["127.0.0.0/8", "::1/128"]
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect(),
            max_subscriptions_per_client: 10_000,
            max_topic_levels: 128,
            max_topic_length: 4096,
            max_publish_rate: 0,
            max_publish_bytes_rate: 0,
            max_client_id_length: 1024,
        }
    }
}

impl Limits {
    /// Whether a topic name or filter is within the level and length limits.
    pub fn topic_ok(&self, topic: &str) -> bool {
        let len = topic.len();
        if self.max_topic_length != 0 && len > self.max_topic_length {
            return false;
        }
        // Fewer bytes than allowed levels cannot hold too many levels.
        self.max_topic_levels == 0
            || len < self.max_topic_levels
            || topic.bytes().filter(|b| *b == b'/').count() < self.max_topic_levels
    }
}

/// Where and how the write-ahead logs are kept.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub fsync: FsyncPolicy,
    pub fsync_interval_ms: u64,
    /// A shard's log is compacted (live state rewritten, older segments
    /// deleted) once it has grown by this many bytes and by more than
    /// its last snapshot.
    pub compact_bytes: u64,
}

/// 16 hex digits from the kernel's random source.
fn random_id() -> String {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if n != 8 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        b = (t ^ u64::from(std::process::id())).to_ne_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Config {
    /// Reads `--config` (if any) and overlays the flags.
    pub fn load(cli: Cli) -> Result<Config, String> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| format!("invalid config {}: {e}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let cpus = crate::runtime::available_cpus().len().max(1);
        let defaults = HandshakeConfig::default();
        let ws = HandshakeConfig {
            path: cli
                .ws_path
                .clone()
                .or(file.ws_path)
                .unwrap_or(defaults.path),
            require_subprotocol: file.ws_require_subprotocol.unwrap_or(false),
            origins: file.ws_origins.unwrap_or_default(),
            trusted_proxies: file.ws_trusted_proxies.unwrap_or_default(),
            max_request: file.ws_max_request.unwrap_or(defaults.max_request),
        };
        let trusted = parse_cidrs(file.trusted_proxies.as_deref().unwrap_or_default())?;
        let password_file = cli.password_file.clone().or(file.password_file);
        let metrics_default = file.metrics.unwrap_or(true);
        let allow_anonymous = cli.allow_anonymous.or(file.allow_anonymous);
        let plain = |bind, protocol| Listener {
            bind,
            protocol,
            tls: None,
            proxy_protocol: false,
            trusted_proxies: trusted.clone(),
            ws: ws.clone(),
            max_connections: 0,
            metrics: metrics_default,
            password_file: password_file.clone(),
            allow_anonymous: allow_anonymous.unwrap_or(password_file.is_none()),
        };
        // Listeners: flags replace the file's; the defaults apply only when
        // no listener is configured anywhere.
        let mut listeners = Vec::new();
        let flags = !(cli.tcp.is_empty()
            && cli.ws.is_empty()
            && cli.mqtts.is_empty()
            && cli.wss.is_empty());
        if flags {
            let tls = cli_tls(&cli)?;
            listeners.extend(cli.tcp.iter().map(|a| plain(*a, ListenProtocol::Mqtt)));
            listeners.extend(cli.ws.iter().map(|a| plain(*a, ListenProtocol::Ws)));
            for (addrs, protocol) in [
                (&cli.mqtts, ListenProtocol::Mqtt),
                (&cli.wss, ListenProtocol::Ws),
            ] {
                for a in addrs {
                    let mut l = plain(*a, protocol);
                    l.tls = tls.clone();
                    listeners.push(l);
                }
            }
        } else {
            for a in file.tcp.unwrap_or_default() {
                listeners.push(plain(a, ListenProtocol::Mqtt));
            }
            for a in file.ws.unwrap_or_default() {
                listeners.push(plain(a, ListenProtocol::Ws));
            }
            for t in file.listener.unwrap_or_default() {
                let mut l = plain(t.bind, t.protocol.unwrap_or(ListenProtocol::Mqtt));
                l.tls = t.tls;
                l.proxy_protocol = t.proxy_protocol.unwrap_or(false);
                if let Some(list) = &t.trusted_proxies {
                    l.trusted_proxies = parse_cidrs(list)?;
                }
                if let Some(path) = t.ws_path {
                    l.ws.path = path;
                }
                l.max_connections = t.max_connections.unwrap_or(0);
                l.metrics = t.metrics.unwrap_or(metrics_default);
                if let Some(pw) = t.password_file {
                    l.password_file = Some(pw);
                }
                // Per listener, else the global setting, else "only
                // without a password file".
                l.allow_anonymous = t
                    .allow_anonymous
                    .or(allow_anonymous)
                    .unwrap_or(l.password_file.is_none());
                listeners.push(l);
            }
        }
        // HTTP-only listeners (metrics off the public ports) come with
        // either set of listeners.
        let http = if cli.http.is_empty() {
            file.http.unwrap_or_default()
        } else {
            cli.http.clone()
        };
        let only_http = listeners.is_empty();
        for a in http {
            let mut l = plain(a, ListenProtocol::Http);
            // No WebSocket path: nothing upgrades here.
            l.ws.path = String::new();
            l.metrics = true;
            listeners.push(l);
        }
        if only_http {
            listeners.push(plain(
                SocketAddr::from(([127, 0, 0, 1], 1883)),
                ListenProtocol::Mqtt,
            ));
            listeners.push(plain(
                SocketAddr::from(([127, 0, 0, 1], 8083)),
                ListenProtocol::Ws,
            ));
            // Defaults first, as without --http.
            listeners.rotate_right(2);
        }
        let d = Limits::default();
        let limits = Limits {
            max_connections: file.max_connections.unwrap_or(d.max_connections),
            max_connections_per_address: file
                .max_connections_per_address
                .unwrap_or(d.max_connections_per_address),
            connection_rate_per_address: file
                .connection_rate_per_address
                .unwrap_or(d.connection_rate_per_address),
            connection_burst_per_address: file
                .connection_burst_per_address
                .unwrap_or(d.connection_burst_per_address),
            exempt: match &file.limits_exempt {
                Some(list) => list
                    .iter()
                    .map(|s| s.parse::<Cidr>().map_err(|e| format!("limits_exempt: {e}")))
                    .collect::<Result<_, _>>()?,
                None => d.exempt,
            },
            max_subscriptions_per_client: file
                .max_subscriptions_per_client
                .unwrap_or(d.max_subscriptions_per_client),
            max_topic_levels: file.max_topic_levels.unwrap_or(d.max_topic_levels),
            max_topic_length: file.max_topic_length.unwrap_or(d.max_topic_length),
            max_publish_rate: file.max_publish_rate.unwrap_or(d.max_publish_rate),
            max_publish_bytes_rate: file
                .max_publish_bytes_rate
                .unwrap_or(d.max_publish_bytes_rate),
            max_client_id_length: file.max_client_id_length.unwrap_or(d.max_client_id_length),
        };
        let hop_id = random_id();
        let cfg = Config {
            bridges: bridge::parse(file.bridge.unwrap_or_default(), &hop_id)?,
            hop_id,
            limits,
            listeners,
            shards: cli.shards.or(file.shards).unwrap_or(cpus),
            pin: !cli.no_pin && file.pin.unwrap_or(true),
            acl_file: cli.acl_file.or(file.acl_file),
            auth_failure_delay_ms: file.auth_failure_delay_ms.unwrap_or(1000),
            admin_token: file.admin_token.filter(|t| !t.is_empty()),
            dashboard: file.dashboard.unwrap_or(true),
            max_keepalive: cli.max_keepalive.or(file.max_keepalive).unwrap_or(65535),
            log: cli.log.or(file.log).unwrap_or_else(|| "info".into()),
            log_format: cli
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            max_packet_size: file.max_packet_size.unwrap_or(16 * 1024 * 1024),
            max_inflight: file.max_inflight.unwrap_or(64),
            receive_maximum: file.receive_maximum.unwrap_or(1024),
            topic_alias_maximum: file.topic_alias_maximum.unwrap_or(64),
            max_queued_messages: file.max_queued_messages.unwrap_or(10_000),
            max_queued_bytes: file.max_queued_bytes.unwrap_or(4 * 1024 * 1024),
            connect_timeout: file.connect_timeout.unwrap_or(10),
            sys_interval: cli.sys_interval.or(file.sys_interval).unwrap_or(10),
            allow_zero_length_clientid: file.allow_zero_length_clientid.unwrap_or(true),
            mesh_capacity: file.mesh_capacity.unwrap_or(1024),
            io_memory: file.io_memory.unwrap_or(512 * 1024),
            transparent_huge_pages: file.transparent_huge_pages.unwrap_or(false),
            store: (!cli.no_persistence && file.persistence.unwrap_or(true)).then(|| StoreConfig {
                data_dir: cli
                    .data_dir
                    .or(file.data_dir)
                    .unwrap_or_else(|| PathBuf::from("tarta-data")),
                fsync: cli.fsync.or(file.fsync).unwrap_or(FsyncPolicy::Always),
                fsync_interval_ms: cli
                    .fsync_interval_ms
                    .or(file.fsync_interval_ms)
                    .unwrap_or(100),
                compact_bytes: file.log_compact_bytes.unwrap_or(64 << 20),
            }),
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        if self.shards == 0 || self.shards > 1024 {
            return Err(format!("shards must be 1..=1024, got {}", self.shards));
        }
        for l in &self.listeners {
            let name = format!("listener {} ({})", l.bind, l.name());
            if l.protocol == ListenProtocol::Http && l.tls.is_some() {
                return Err(format!("{name}: HTTP listeners do not take tls"));
            }
            if l.protocol == ListenProtocol::Ws && !l.ws.path.starts_with('/') {
                return Err(format!(
                    "{name}: ws_path must start with '/', got {:?}",
                    l.ws.path
                ));
            }
            if l.proxy_protocol && l.trusted_proxies.is_empty() {
                return Err(format!(
                    "{name}: proxy_protocol = true needs trusted_proxies (the addresses or CIDRs of the proxies allowed to send a PROXY header)"
                ));
            }
            if let Some(t) = &l.tls {
                if t.require_client_cert && t.client_ca.is_none() {
                    return Err(format!(
                        "{name}: require_client_cert needs client_ca (the CA file client certificates are verified against)"
                    ));
                }
                if t.identity_as_username && !t.require_client_cert {
                    return Err(format!(
                        "{name}: identity_as_username needs require_client_cert = true"
                    ));
                }
            }
        }
        if self.receive_maximum == 0 {
            return Err("receive_maximum must be at least 1".into());
        }
        if self.max_inflight == 0 {
            return Err("max_inflight must be at least 1".into());
        }
        if self.max_packet_size < 64 {
            return Err("max_packet_size must be at least 64".into());
        }
        if let Some(s) = &self.store {
            if s.fsync == FsyncPolicy::Interval && s.fsync_interval_ms == 0 {
                return Err("fsync_interval_ms must be at least 1".into());
            }
        }
        let l = &self.limits;
        if l.connection_burst_per_address > 1_000_000 {
            return Err("connection_burst_per_address must be at most 1000000".into());
        }
        if l.connection_rate_per_address != 0 && l.connection_burst_per_address == 0 {
            return Err("connection_burst_per_address must be at least 1 when connection_rate_per_address is set".into());
        }
        if self.admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err("admin_token must be at least 16 characters".into());
        }
        if self.mesh_capacity == 0 {
            return Err("mesh_capacity must be at least 1".into());
        }
        Ok(())
    }
}

fn parse_cidrs(list: &[String]) -> Result<Vec<Cidr>, String> {
    list.iter()
        .map(|s| {
            s.parse::<Cidr>()
                .map_err(|e| format!("trusted_proxies: {e}"))
        })
        .collect()
}

/// The TLS settings of the --mqtts/--wss listeners, from the flags.
fn cli_tls(cli: &Cli) -> Result<Option<TlsFiles>, String> {
    let wants = !cli.mqtts.is_empty() || !cli.wss.is_empty();
    match (&cli.cert, &cli.key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: cli.cafile.clone(),
            require_client_cert: cli.require_certificate,
            identity_as_username: false,
        })),
        _ if wants => Err("--mqtts and --wss need --cert FILE and --key FILE".into()),
        _ => Ok(None),
    }
}
