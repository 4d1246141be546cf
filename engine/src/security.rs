//! Who may connect and what they may do: the password files and the ACL.
//!
//! Read in the main thread (never on a shard) at start and on SIGHUP into
//! one immutable [`Security`], which every shard reads through a shared
//! [`SecurityCell`]. A reload swaps the whole set at once; if any file
//! fails to read or parse, the old set stays and the error is logged.
//! Shards notice a new set by its generation number (one relaxed load per
//! packet) and re-resolve their clients' ACLs.

use crate::config::Config;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tarta_proto::acl::Acl;
use tarta_proto::passwd::PasswordFile;

/// The files as read at one moment.
#[derive(Debug, Default)]
pub struct Security {
    pub generation: u64,
    pub acl: Option<Arc<Acl>>,
    /// Per listener (index = `Config::listeners` index).
    pub listeners: Vec<ListenerAuth>,
}

/// How one listener authenticates.
#[derive(Debug, Clone, Default)]
pub struct ListenerAuth {
    pub passwords: Option<Arc<PasswordFile>>,
    pub allow_anonymous: bool,
}

/// What to do with a CONNECT's credentials.
#[derive(Debug)]
pub enum Admission {
    Accept,
    /// Check the password against this file (off the shard: hashing is slow).
    Verify(Arc<PasswordFile>),
    Refuse(Refusal),
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown user or wrong password: 3.x 0x04, 5.0 0x86.
    BadCredentials,
    /// No credentials where they are required: 3.x 0x05, 5.0 0x87.
    NotAuthorized,
}

impl Refusal {
    /// CONNACK codes (3.x, 5.0).
    pub fn codes(self) -> (u8, u8) {
        use tarta_proto::mqtt::reason;
        match self {
            Refusal::BadCredentials => (0x04, reason::BAD_USER_NAME_OR_PASSWORD),
            Refusal::NotAuthorized => (0x05, reason::NOT_AUTHORIZED),
        }
    }
}

impl ListenerAuth {
    /// Decides from the CONNECT alone, or asks for a password check.
    /// `certified`: the TLS client certificate named the client
    /// (`identity_as_username`), which authenticates it on this listener.
    pub fn admit(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
        certified: bool,
    ) -> Admission {
        if certified {
            return Admission::Accept;
        }
        match (&self.passwords, username) {
            (Some(file), Some(_)) if password.is_some() => Admission::Verify(file.clone()),
            (Some(_), Some(_)) => Admission::Refuse(Refusal::BadCredentials),
            // A username nobody can check is not an identity: without a
            // password file it authenticates only where anonymous clients
            // may connect anyway.
            (_, _) if self.allow_anonymous => Admission::Accept,
            (None, Some(_)) => Admission::Refuse(Refusal::NotAuthorized),
            (_, None) => Admission::Refuse(Refusal::NotAuthorized),
        }
    }
}

impl Security {
    /// Reads the ACL and every listener's password file (each file once).
    pub fn load(cfg: &Config, generation: u64) -> Result<Security, String> {
        let acl = match &cfg.acl_file {
            Some(path) => {
                let text = read(path, "ACL file")?;
                let acl = Acl::parse(&text)
                    .map_err(|e| format!("invalid ACL file {}: {e}", path.display()))?;
                Some(Arc::new(acl))
            }
            None => None,
        };
        let mut files: HashMap<PathBuf, Arc<PasswordFile>> = HashMap::new();
        let mut listeners = Vec::with_capacity(cfg.listeners.len());
        for l in &cfg.listeners {
            let passwords = match &l.password_file {
                Some(path) => Some(match files.get(path) {
                    Some(f) => f.clone(),
                    None => {
                        let text = read(path, "password file")?;
                        let f = Arc::new(PasswordFile::parse(&text).map_err(|e| {
                            format!("invalid password file {}: {e}", path.display())
                        })?);
                        files.insert(path.clone(), f.clone());
                        f
                    }
                }),
                None => None,
            };
            listeners.push(ListenerAuth {
                passwords,
                allow_anonymous: l.allow_anonymous,
            });
        }
        Ok(Security {
            generation,
            acl,
            listeners,
        })
    }

    /// Users in all password files (distinct files counted once), for the log.
    pub fn users(&self) -> usize {
        let mut seen: Vec<*const PasswordFile> = Vec::new();
        let mut n = 0;
        for p in self.listeners.iter().filter_map(|l| l.passwords.as_ref()) {
            if !seen.contains(&Arc::as_ptr(p)) {
                seen.push(Arc::as_ptr(p));
                n += p.len();
            }
        }
        n
    }
}

fn read(path: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// The current [`Security`], shared by every shard.
#[derive(Debug, Default)]
pub struct SecurityCell {
    current: ArcSwap<Security>,
    generation: AtomicU64,
}

impl SecurityCell {
    pub fn new(s: Security) -> SecurityCell {
        let generation = AtomicU64::new(s.generation);
        SecurityCell {
            current: ArcSwap::from_pointee(s),
            generation,
        }
    }

    pub fn load(&self) -> Arc<Security> {
        self.current.load_full()
    }

    /// Cheap: whether a shard that last saw `seen` must re-read.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Re-reads the files (SIGHUP). On error the current set stays.
    pub fn reload(&self, cfg: &Config) -> Result<Arc<Security>, String> {
        let next = self.generation() + 1;
        let s = Arc::new(Security::load(cfg, next)?);
        self.current.store(s.clone());
        self.generation.store(next, Ordering::Release);
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> Arc<PasswordFile> {
        Arc::new(PasswordFile::parse("").unwrap())
    }

    #[test]
    fn who_is_admitted() {
        let open = ListenerAuth {
            passwords: None,
            allow_anonymous: true,
        };
        let closed = ListenerAuth {
            passwords: None,
            allow_anonymous: false,
        };
        let pw = ListenerAuth {
            passwords: Some(file()),
            allow_anonymous: false,
        };
        let pw_anon = ListenerAuth {
            passwords: Some(file()),
            allow_anonymous: true,
        };
        let a = |l: &ListenerAuth, u: Option<&str>, p: Option<&[u8]>, c| match l.admit(u, p, c) {
            Admission::Accept => "accept",
            Admission::Verify(_) => "verify",
            Admission::Refuse(Refusal::BadCredentials) => "bad",
            Admission::Refuse(Refusal::NotAuthorized) => "unauthorized",
        };
        assert_eq!(a(&open, None, None, false), "accept");
        assert_eq!(a(&open, Some("u"), None, false), "accept");
        assert_eq!(a(&closed, None, None, false), "unauthorized");
        assert_eq!(a(&closed, Some("u"), Some(b"p"), false), "unauthorized");
        assert_eq!(a(&closed, None, None, true), "accept");
        assert_eq!(a(&pw, Some("u"), Some(b"p"), false), "verify");
        assert_eq!(a(&pw, Some("u"), None, false), "bad");
        assert_eq!(a(&pw, None, None, false), "unauthorized");
        assert_eq!(a(&pw, Some("u"), None, true), "accept");
        assert_eq!(a(&pw_anon, None, None, false), "accept");
        assert_eq!(a(&pw_anon, Some("u"), Some(b"p"), false), "verify");
    }
}
