//! `[[bridge]]` tables: a link from this broker to another one, and the
//! topic rules that say what crosses it (Mosquitto's `topic pattern
//! direction qos local-prefix remote-prefix`). Parsed and checked once, at
//! start; the mapping functions are what the link applies per message.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tarta_proto::mqtt::{Protocol, QoS};
use tarta_proto::topic::{matches, TopicFilter, TopicName};
use tarta_proto::ByteStr;

/// One `[[bridge]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeFile {
    pub name: String,
    pub address: OneOrMany,
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub protocol: Option<String>,
    pub clean_start: Option<bool>,
    pub keep_alive: Option<u16>,
    pub tls: Option<BridgeTls>,
    pub http_headers: Option<BTreeMap<String, String>>,
    pub http_proxy: Option<String>,
    pub max_buffer_bytes: Option<u64>,
    pub overflow: Option<Overflow>,
    pub queue_qos0: Option<bool>,
    pub reconnect_delay_ms: Option<u64>,
    pub reconnect_delay_max_ms: Option<u64>,
    pub max_inflight: Option<u16>,
    #[serde(default)]
    pub topic: Vec<TopicFile>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicFile {
    pub filter: String,
    pub direction: Option<Direction>,
    pub qos: Option<u8>,
    pub local_prefix: Option<String>,
    pub remote_prefix: Option<String>,
}

/// TLS towards the remote: the CA that signs its certificate (else the
/// system's roots from `/etc/ssl/certs`), and a client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name to verify (default: the address's host).
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Out,
    In,
    Both,
}

/// What happens to a new message for the remote when the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// The oldest buffered message is dropped (counted).
    DropOldest,
    /// The new message is refused: 5.0 publishers get 0x97, 3.x ones no
    /// acknowledgement (counted). Nothing acknowledged is lost.
    RejectNew,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Mqtt,
    Mqtts,
    Ws,
    Wss,
}

impl Scheme {
    pub fn tls(self) -> bool {
        matches!(self, Scheme::Mqtts | Scheme::Wss)
    }
    pub fn ws(self) -> bool {
        matches!(self, Scheme::Ws | Scheme::Wss)
    }
}

/// One address of the remote, from `scheme://host:port/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// The WebSocket path (`/mqtt` when the URL has none).
    pub path: String,
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self.scheme {
            Scheme::Mqtt => "mqtt",
            Scheme::Mqtts => "mqtts",
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
        };
        write!(f, "{s}://{}:{}", self.host, self.port)?;
        if self.scheme.ws() {
            f.write_str(&self.path)?;
        }
        Ok(())
    }
}

impl Remote {
    pub fn parse(url: &str) -> Result<Remote, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url}: expected scheme://host:port"))?;
        let (scheme, default_port) = match scheme {
            "mqtt" | "tcp" => (Scheme::Mqtt, 1883),
            "mqtts" | "ssl" => (Scheme::Mqtts, 8883),
            "ws" => (Scheme::Ws, 80),
            "wss" => (Scheme::Wss, 443),
            other => {
                return Err(format!(
                    "{url}: unknown scheme {other} (mqtt, mqtts, ws, wss)"
                ))
            }
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/mqtt"),
        };
        let (host, port) = split_host_port(authority, default_port)
            .ok_or_else(|| format!("{url}: invalid host or port"))?;
        Ok(Remote {
            scheme,
            host,
            port,
            path: path.to_string(),
        })
    }

    /// `host:port` as a Host header or a CONNECT target.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
pub fn split_host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        match after.strip_prefix(':') {
            Some(p) => (h, p.parse().ok()?),
            None if after.is_empty() => (h, default_port),
            None => return None,
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (s, default_port),
        }
    };
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// One topic rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub direction: Direction,
    pub qos: QoS,
    pub local_prefix: String,
    pub remote_prefix: String,
    /// `local_prefix + filter`: what the bridge subscribes to here (out).
    pub local_filter: String,
    /// `remote_prefix + filter`: what it subscribes to there (in).
    pub remote_filter: String,
}

impl Rule {
    pub fn out(&self) -> bool {
        self.direction != Direction::In
    }
    pub fn inbound(&self) -> bool {
        self.direction != Direction::Out
    }
}

/// A bridge, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    pub addresses: Vec<Remote>,
    /// The client id at the remote.
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub protocol: Protocol,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub tls: Option<BridgeTls>,
    pub http_headers: Vec<(String, String)>,
    /// An HTTP CONNECT proxy: (host, port, `Proxy-Authorization` value).
    pub http_proxy: Option<(String, u16, Option<String>)>,
    pub max_buffer_bytes: u64,
    pub overflow: Overflow,
    pub queue_qos0: bool,
    pub reconnect_delay_ms: u64,
    pub reconnect_delay_max_ms: u64,
    pub rules: Vec<Rule>,
    /// Messages in flight to the remote at most (and at most its Receive
    /// Maximum): over a WAN link the window, not the CPU, bounds the rate.
    pub max_inflight: u16,
    /// This broker's identity in hop markers (random per process).
    pub hop_id: String,
}

/// The local client id of a bridge's session (a prefix clients may not use).
pub const SESSION_PREFIX: &str = "$bridge/";

/// The 5.0 user property that lists the brokers a bridged message passed
/// (their `hop_id`s, comma-separated): a broker drops a message that
/// already passed it, so bridges in a cycle exchange each message once.
pub const HOPS: &str = "tarta-hops";

/// Whether `hops` (a `HOPS` value) names `id`.
pub fn passed(hops: &str, id: &str) -> bool {
    hops.split(',').any(|h| h == id)
}

impl Bridge {
    pub fn session_id(&self) -> String {
        format!("{SESSION_PREFIX}{}", self.name)
    }

    /// The remote topic for a local one (first out rule that matches).
    pub fn map_out(&self, local: &str) -> Option<String> {
        let r = self
            .rules
            .iter()
            .find(|r| r.out() && matches(&r.local_filter, local))?;
        let rest = local.strip_prefix(r.local_prefix.as_str())?;
        Some(format!("{}{rest}", r.remote_prefix))
    }

    /// The local topic for a remote one (first in rule that matches).
    pub fn map_in(&self, remote: &str) -> Option<String> {
        let r = self
            .rules
            .iter()
            .find(|r| r.inbound() && matches(&r.remote_filter, remote))?;
        let rest = remote.strip_prefix(r.remote_prefix.as_str())?;
        Some(format!("{}{rest}", r.local_prefix))
    }

    /// Whether a local topic goes over this bridge.
    pub fn goes_out(&self, local: &str) -> bool {
        self.rules
            .iter()
            .any(|r| r.out() && matches(&r.local_filter, local))
    }
}

fn prefix_ok(p: &str) -> bool {
    !p.contains(['+', '#', '\0'])
}

/// Checks the tables (names unique, addresses, rules).
pub fn parse(files: Vec<BridgeFile>, hop_id: &str) -> Result<Vec<Bridge>, String> {
    let mut out: Vec<Bridge> = Vec::new();
    for f in files {
        let name = f.name;
        let bad = |what: String| format!("bridge {name:?}: {what}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(bad(
                "the name must be letters, digits, '-', '_' or '.'".into()
            ));
        }
        if out.iter().any(|b| b.name == name) {
            return Err(bad("a second bridge of this name".into()));
        }
        let urls = match f.address {
            OneOrMany::One(u) => vec![u],
            OneOrMany::Many(v) => v,
        };
        if urls.is_empty() {
            return Err(bad("no address".into()));
        }
        let addresses = urls
            .iter()
            .map(|u| Remote::parse(u))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        let protocol = match f.protocol.as_deref().unwrap_or("5") {
            "5" | "5.0" | "mqttv5" => Protocol::V5,
            "3.1.1" | "4" | "mqttv311" => Protocol::V311,
            other => return Err(bad(format!("protocol {other:?}: \"3.1.1\" or \"5\""))),
        };
        let password = match (f.password, f.password_file) {
            (Some(_), Some(_)) => return Err(bad("password and password_file both set".into())),
            (Some(p), None) => Some(p),
            (None, Some(path)) => Some(
                std::fs::read_to_string(&path)
                    .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            (None, None) => None,
        };
        if password.is_some() && f.username.is_none() && protocol != Protocol::V5 {
            return Err(bad("a password needs a username before MQTT 5".into()));
        }
        if f.topic.is_empty() {
            return Err(bad("no [[bridge.topic]] rule".into()));
        }
        let mut rules = Vec::new();
        for t in f.topic {
            let local_prefix = t.local_prefix.unwrap_or_default();
            let remote_prefix = t.remote_prefix.unwrap_or_default();
            if !prefix_ok(&local_prefix) || !prefix_ok(&remote_prefix) {
                return Err(bad(format!(
                    "topic {}: prefixes cannot hold wildcards",
                    t.filter
                )));
            }
            let local_filter = format!("{local_prefix}{}", t.filter);
            let remote_filter = format!("{remote_prefix}{}", t.filter);
            for filter in [&local_filter, &remote_filter] {
                match TopicFilter::new(ByteStr::from(filter.clone())) {
                    Ok(f) if f.share().is_none() => {}
                    _ => return Err(bad(format!("topic {filter:?} is not a valid filter"))),
                }
            }
            let qos = QoS::from_u8(t.qos.unwrap_or(1))
                .ok_or_else(|| bad(format!("topic {}: qos must be 0, 1 or 2", t.filter)))?;
            rules.push(Rule {
                direction: t.direction.unwrap_or(Direction::Out),
                qos,
                local_prefix,
                remote_prefix,
                local_filter,
                remote_filter,
            });
        }
        let http_proxy = match f.http_proxy {
            None => None,
            Some(u) => Some(parse_proxy(&u).map_err(bad)?),
        };
        let tls_needed = addresses.iter().any(|a| a.scheme.tls());
        if f.tls.is_some() && !tls_needed {
            return Err(bad("tls settings but no mqtts:// or wss:// address".into()));
        }
        let client_id = f.client_id.unwrap_or_else(|| {
            let host = hostname().unwrap_or_else(|| "tarta".into());
            format!("{host}.{name}")
        });
        if client_id.is_empty() || client_id.len() > 65535 {
            return Err(bad("invalid client_id".into()));
        }
        if TopicName::new(ByteStr::from(format!(
            "$SYS/broker/connection/{name}/state"
        )))
        .is_err()
        {
            return Err(bad("the name does not make a valid topic".into()));
        }
        let delay = f.reconnect_delay_ms.unwrap_or(1000).max(10);
        out.push(Bridge {
            addresses,
            client_id,
            username: f.username,
            password,
            protocol,
            clean_start: f.clean_start.unwrap_or(false),
            keep_alive: f.keep_alive.unwrap_or(60),
            tls: f.tls,
            http_headers: f.http_headers.unwrap_or_default().into_iter().collect(),
            http_proxy,
            max_buffer_bytes: f.max_buffer_bytes.unwrap_or(256 << 20),
            overflow: f.overflow.unwrap_or(Overflow::RejectNew),
            queue_qos0: f.queue_qos0.unwrap_or(false),
            reconnect_delay_ms: delay,
            reconnect_delay_max_ms: f.reconnect_delay_max_ms.unwrap_or(30_000).max(delay),
            rules,
            name,
            hop_id: hop_id.to_string(),
            max_inflight: f.max_inflight.unwrap_or(1024).max(1),
        });
    }
    Ok(out)
}

/// `http://[user:pass@]host:port` -> (host, port, Proxy-Authorization).
fn parse_proxy(url: &str) -> Result<(String, u16, Option<String>), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("http_proxy {url}: expected http://host:port"))?;
    let rest = rest.trim_end_matches('/');
    let (auth, hostport) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let (host, port) = split_host_port(hostport, 3128)
        .ok_or_else(|| format!("http_proxy {url}: invalid host or port"))?;
    let auth = auth.map(|a| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(a)
        )
    });
    Ok((host, port, auth))
}

fn hostname() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim();
    (!h.is_empty()).then(|| h.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(toml_text: &str) -> Result<Bridge, String> {
        #[derive(Deserialize)]
        struct F {
            bridge: Vec<BridgeFile>,
        }
        let f: F = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        parse(f.bridge, "h1").map(|mut v| v.remove(0))
    }

    #[test]
    fn addresses_parse_with_their_defaults() {
        let r = Remote::parse("wss://cloud.example/mqtt").unwrap();
        assert_eq!(
            (r.scheme, r.port, r.path.as_str()),
            (Scheme::Wss, 443, "/mqtt")
        );
        let r = Remote::parse("mqtts://[::1]:8884").unwrap();
        assert_eq!((r.host.as_str(), r.port), ("::1", 8884));
        assert_eq!(r.authority(), "[::1]:8884");
        let r = Remote::parse("ws://127.0.0.1:9001").unwrap();
        assert_eq!(r.path, "/mqtt");
        assert!(Remote::parse("http://x:1").is_err());
        assert!(Remote::parse("mqtt://x:notaport").is_err());
    }

    #[test]
    fn topics_map_like_mosquitto_rules() {
        let b = one(r#"
            [[bridge]]
            name = "cloud"
            address = ["mqtt://127.0.0.1:1883", "ws://127.0.0.1:8080/mqtt"]
            [[bridge.topic]]
            filter = "sensors/#"
            remote_prefix = "plant7/"
            [[bridge.topic]]
            filter = "cmd/+"
            direction = "in"
            qos = 2
            local_prefix = "from-cloud/"
            remote_prefix = "plant7/"
            "#)
        .unwrap();
        assert_eq!(b.addresses.len(), 2);
        assert_eq!(b.protocol, Protocol::V5);
        assert_eq!(b.overflow, Overflow::RejectNew);
        assert_eq!(
            b.map_out("sensors/a/b").as_deref(),
            Some("plant7/sensors/a/b")
        );
        assert_eq!(b.map_out("cmd/x"), None, "in-only rule");
        assert_eq!(
            b.map_in("plant7/cmd/x").as_deref(),
            Some("from-cloud/cmd/x")
        );
        assert_eq!(b.map_in("plant7/sensors/a"), None, "out-only rule");
        assert!(b.goes_out("sensors/1") && !b.goes_out("other"));
        assert_eq!(b.rules[1].qos, QoS::ExactlyOnce);
        assert_eq!(b.session_id(), "$bridge/cloud");
    }

    #[test]
    fn mistakes_are_named() {
        let base = "[[bridge]]\nname = \"x\"\naddress = \"mqtt://h:1\"\n";
        let e = one(base).unwrap_err();
        assert!(e.contains("no [[bridge.topic]]"), "{e}");
        let e = one(&format!("{base}[[bridge.topic]]\nfilter = \"a/#/b\"\n")).unwrap_err();
        assert!(e.contains("not a valid filter"), "{e}");
        let e = one(&format!(
            "{base}protocol = \"4.0\"\n[[bridge.topic]]\nfilter = \"a\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("protocol"), "{e}");
        let e = one(&format!(
            "{base}http_proxy = \"socks://p\"\n[[bridge.topic]]\nfilter = \"a\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("http_proxy"), "{e}");
        let p = parse_proxy("http://u:p@proxy:3128").unwrap();
        assert_eq!(p, ("proxy".into(), 3128, Some("Basic dTpw".into())));
    }
}
