//! What every backend on a Redis-compatible server (Redis, Valkey) shares, whatever its client
//! library: the release channel, what `PTTL` answers mean, URL schemes and TLS, `INFO` reports.
//! Pure functions over strings and integers: lock-core links no Redis client.

use std::path::Path;
use std::time::Duration;

use crate::error::{LockError, Result};
use crate::lock::Holding;
use crate::url::SecretUrl;

/// Releases of a key are announced (with `wake_on_release`) on this prefix followed by the
/// key as stored: `lock-released:<key>`.
pub const RELEASE_CHANNEL: &str = "lock-released:";

/// The head of a fair lock's waiting line is woken on this prefix followed by the 32 hex
/// digits of its client's instance, with the waiter's id as the message (see [`LINE_SCRIPT`]).
pub const TURN_CHANNEL: &str = "lock-turn:";

/// The waiting line of a fair lock (`Capabilities::fair`), as Lua helpers to put before a
/// backend's own acquire and release scripts: `line_gate(lock, owner, token, member, lease,
/// prefix[, place[, gated[, held_by]]])` in front of an acquisition, `line_leave(member)`,
/// `line_give_back(owner, member, ...)` and `line_give(lock, prefix, give[, free])` (the turn,
/// with what `give(head, left, now_us)` took for the head) after a release. The line is the
/// last two keys of the script (`KEYS[#KEYS - 1]`: waiters by arrival; `KEYS[#KEYS]`: the same
/// by the expiry of their entry); a member is a client's instance (32 hex digits) followed by
/// the waiter's id. See the script's own comments.
pub const LINE_SCRIPT: &str = include_str!("redis/line.lua");

/// The value of a key a backend gives the head of a fair line as it passes the turn, followed
/// by the head's member (see [`line_member`]): the key is reserved for that waiter, which may
/// hold it as its lock with this value as its token. No acquisition may store a token that
/// begins with it ([`refuse_reservation`]).
pub const RESERVED: &str = "lock-turn-reserved:";

/// True when `token` is a reservation's value ([`RESERVED`]), which no acquisition may store and
/// no take-back may delete.
///
/// ```
/// use lock_core::Token;
/// use lock_core::raw::redis::is_reservation;
///
/// assert!(is_reservation(&Token::from_stored("lock-turn-reserved:abc").unwrap()));
/// assert!(!is_reservation(&Token::from_stored("abc").unwrap()));
/// assert!(!is_reservation(&Token::generate().unwrap()));
/// ```
pub fn is_reservation(token: &crate::Token) -> bool {
    // A generated token's text is hex digits alone: only a stored one can be a reservation
    // (read without writing a generated token out, on every acquisition's path).
    token
        .stored_text()
        .is_some_and(|text| text.starts_with(RESERVED))
}

/// Refuses `token` when it is a reservation's value ([`is_reservation`]).
///
/// # Errors
///
/// [`LockError::InvalidInput`] naming the token.
pub fn refuse_reservation(token: &crate::Token) -> Result<()> {
    if is_reservation(token) {
        return Err(LockError::invalid(
            "token",
            "must not begin with `lock-turn-reserved:` (a fair line's reservation)",
        ));
    }
    Ok(())
}

/// The member of a waiting line that stands for the waiter `waiter` of the client `instance`
/// (32 hex digits): see [`LINE_SCRIPT`].
///
/// ```
/// let member = lock_core::raw::redis::line_member("0123456789abcdef0123456789abcdef", "42");
/// assert_eq!(member, "0123456789abcdef0123456789abcdef42");
/// ```
pub fn line_member(instance: &str, waiter: &str) -> String {
    [instance, waiter].concat()
}

/// The channel releases of `key` (the key as stored) are announced on.
///
/// ```
/// assert_eq!(lock_core::raw::redis::release_channel("lock:{a}"), "lock-released:lock:{a}");
/// ```
pub fn release_channel(key: &str) -> String {
    [RELEASE_CHANNEL, key].concat()
}

/// What a `PTTL` answer says of a key: `-2` free, `-1` held without expiry, otherwise held for
/// that many milliseconds more.
///
/// ```
/// use std::time::Duration;
/// use lock_core::Holding;
/// use lock_core::raw::redis::holding_from_pttl;
///
/// assert_eq!(holding_from_pttl(-2), Holding::Free);
/// assert_eq!(holding_from_pttl(-1), Holding::Held { ttl: None });
/// assert_eq!(holding_from_pttl(5), Holding::Held { ttl: Some(Duration::from_millis(5)) });
/// ```
pub fn holding_from_pttl(pttl: i64) -> Holding {
    match pttl {
        -2 => Holding::Free,
        -1 => Holding::Held { ttl: None },
        ms => Holding::Held {
            ttl: Some(Duration::from_millis(u64::try_from(ms).unwrap_or_default())),
        },
    }
}

/// How long until a key whose `PTTL` is `pttl` is gone: zero when it is gone already, a
/// millisecond past its expiry when it has one (`PTTL` rounds down), `None` when it never
/// expires by itself.
///
/// ```
/// use std::time::Duration;
/// use lock_core::raw::redis::gone_in;
///
/// assert_eq!(gone_in(-2), Some(Duration::ZERO));
/// assert_eq!(gone_in(-1), None);
/// assert_eq!(gone_in(0), Some(Duration::from_millis(1)));
/// ```
pub fn gone_in(pttl: i64) -> Option<Duration> {
    match pttl {
        -2 => Some(Duration::ZERO),
        ms => u64::try_from(ms)
            .ok()
            .map(|ms| Duration::from_millis(ms.saturating_add(1))),
    }
}

/// The server and version an `INFO server` report names, as `name version` (`valkey 8.0.1`,
/// `redis 7.0.15`), for [`KeyState::server`](crate::KeyState::server).
///
/// Valkey reports `redis_version:7.2.4` whatever its release, for compatibility: its own name
/// and version are in `server_name` and `valkey_version`, which are read first.
pub fn server_from_info(info: &str) -> Option<String> {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.trim_end().strip_prefix(name)?.strip_prefix(':'))
            .map(str::to_owned)
    };
    let name = field("server_name").unwrap_or_else(|| "redis".to_owned());
    let version = field(&format!("{name}_version")).or_else(|| field("redis_version"))?;
    Some(format!("{name} {version}"))
}

/// The URLs a backend on Redis-compatible servers takes, and how it was built.
#[derive(Clone, Copy, Debug)]
pub struct UrlRules {
    /// The backend's crate, named in the message that asks for its `tls` feature.
    pub crate_name: &'static str,
    /// Whether `redis-cluster://` (and its TLS and Valkey twins) are taken.
    pub cluster: bool,
    /// Whether the backend was built with TLS (its `tls` cargo feature).
    pub tls: bool,
}

/// What a URL that passed [`UrlRules::check`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UrlScheme {
    /// `rediss://` and the like: TLS.
    pub tls: bool,
    /// `redis-cluster://` and the like: a Redis Cluster.
    pub cluster: bool,
}

impl UrlRules {
    /// Checks a URL before any driver reads it (drivers take URLs of other schemes as if they
    /// were Redis, and would read part of a password holding a raw `/`, `?` or `#` as the host):
    /// the scheme is `redis` or `valkey`, with [`UrlRules::cluster`] also `redis-cluster` or
    /// `valkey-cluster`, each with its TLS twin (`rediss`…) only when built with TLS, as is a
    /// CA file; then [`SecretUrl::check_user_info`]. Messages show the URL without password.
    ///
    /// ```
    /// use lock_core::SecretUrl;
    /// use lock_core::raw::redis::UrlRules;
    ///
    /// let rules = UrlRules { crate_name: "lock-mine", cluster: false, tls: false };
    /// assert!(rules.check(&SecretUrl::new("redis://h:6379/"), None).is_ok());
    /// assert!(rules.check(&SecretUrl::new("http://h/"), None).is_err());
    /// let error = rules.check(&SecretUrl::new(""), None).unwrap_err();
    /// assert!(error.to_string().contains("an empty URL is not a redis://"));
    /// let error = rules.check(&SecretUrl::new("rediss://u:s3cret@h/"), None).unwrap_err();
    /// assert!(error.to_string().contains("`tls` cargo feature of lock-mine"));
    /// assert!(!error.to_string().contains("s3cret"));
    /// ```
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `url` (or `tls_ca_file`).
    pub fn check(&self, url: &SecretUrl, tls_ca_file: Option<&Path>) -> Result<UrlScheme> {
        let scheme = url.scheme().unwrap_or_default();
        let (base, cluster) = match scheme.strip_suffix("-cluster") {
            Some(base) if self.cluster => (base, true),
            _ => (scheme, false),
        };
        // An empty URL (an empty string in a configuration) is named as such.
        let shown = if url.expose().is_empty() {
            "an empty URL".to_owned()
        } else {
            url.to_string()
        };
        let tls = match base {
            "redis" | "valkey" => false,
            "rediss" | "valkeys" => true,
            _ if self.cluster => {
                return Err(LockError::invalid(
                    "url",
                    format!(
                        "{shown} is not a redis://, rediss://, redis-cluster:// URL (or the same with valkey)"
                    ),
                ));
            }
            _ => {
                return Err(LockError::invalid(
                    "url",
                    format!("{shown} is not a redis://, rediss://, valkey:// or valkeys:// URL"),
                ));
            }
        };
        if tls && !self.tls {
            return Err(LockError::invalid(
                "url",
                format!(
                    "{url}: {scheme}:// needs the `tls` cargo feature of {}",
                    self.crate_name
                ),
            ));
        }
        self.check_ca_file(tls_ca_file)?;
        url.check_user_info()?;
        Ok(UrlScheme { tls, cluster })
    }

    /// Checks that a CA file, when one is set, can be used: the backend was built with TLS.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `tls_ca_file`.
    pub fn check_ca_file(&self, tls_ca_file: Option<&Path>) -> Result<()> {
        if tls_ca_file.is_some() && !self.tls {
            return Err(LockError::invalid(
                "tls_ca_file",
                format!("needs the `tls` cargo feature of {}", self.crate_name),
            ));
        }
        Ok(())
    }
}

/// Text from a configuration that is not meant to be a URL (a key prefix, a path, a backend's
/// name) as messages show it: unchanged, or, when it looks like a URL with user info (it holds
/// an `@` or a `://`), without its password, so that one put there by mistake stays hidden
/// (all of it when a URL with a password would still show: `ops@acme redis://h:pw`).
pub fn shown_text(text: &str) -> String {
    if text.contains('@') || text.contains("://") || crate::url::carries_secret(text) {
        crate::url::redact_text(text)
    } else {
        text.to_owned()
    }
}

/// What a server puts before the arguments it echoes of a command it does not know.
const ECHOED_ARGS: &str = "with args beginning with:";

/// A client library's or a server's error as messages and logs show it. A server that does not
/// know a command echoes its first arguments (`unknown command 'HELLO', with args beginning
/// with: '3' 'AUTH' 'user' 'password'`), and the command may be the one that carries the
/// password: `HELLO 3 AUTH` for a RESP3 URL on a server without `HELLO` (Redis 5, or one that
/// renamed it), `AUTH` renamed away. The echoed arguments are left out.
///
/// ```
/// use lock_core::raw::redis::shown_error;
///
/// let error = "ResponseError: unknown command 'HELLO', with args beginning with: '3' 'AUTH' 'u' 's3cret' ";
/// assert_eq!(
///     shown_error(&error),
///     "ResponseError: unknown command 'HELLO', with args beginning with: (not shown)"
/// );
/// assert_eq!(shown_error(&"Connection refused"), "Connection refused");
/// ```
pub fn shown_error(error: &dyn std::fmt::Display) -> String {
    let mut text = error.to_string();
    if let Some(at) = text.to_ascii_lowercase().find(ECHOED_ARGS) {
        text.truncate(at + ECHOED_ARGS.len());
        text.push_str(" (not shown)");
    }
    text
}

/// A path from a backend's configuration (a TLS CA file) as messages show it ([`shown_text`]).
pub fn shown_path(path: &Path) -> String {
    shown_text(&path.display().to_string())
}

/// The most a TLS CA file ([`read_ca_file`]) may hold: 1 MiB, far more than a CA bundle (the
/// system's whole bundle is about 200 KiB).
pub const MAX_CA_FILE_BYTES: u64 = 1 << 20;

/// Reads the TLS CA file at `path` (PEM), at most [`MAX_CA_FILE_BYTES`]: a device such as
/// `/dev/zero` or a huge file is refused at once rather than read until memory runs out.
///
/// # Errors
/// [`LockError::InvalidInput`] naming `tls_ca_file` with the path as messages show it
/// ([`shown_path`]) when the file cannot be read or is larger than the limit.
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let invalid = |reason: String| {
        LockError::invalid(
            "tls_ca_file",
            format!("cannot read {}: {reason}", shown_path(path)),
        )
    };
    let file = std::fs::File::open(path).map_err(|e| invalid(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_CA_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| invalid(e.to_string()))?;
    if bytes.len() as u64 > MAX_CA_FILE_BYTES {
        return Err(invalid(format!(
            "it is larger than {MAX_CA_FILE_BYTES} bytes (1 MiB), the most a CA file may hold"
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_ca_file_is_read_up_to_its_limit() {
        let error = read_ca_file(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("tls_ca_file") && error.contains("1 MiB"),
            "{error}"
        );
        let dir = std::env::temp_dir().join(format!("lock-core-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let at_limit = dir.join("at-limit.pem");
        std::fs::write(&at_limit, vec![b'#'; MAX_CA_FILE_BYTES as usize]).unwrap();
        assert_eq!(
            read_ca_file(&at_limit).unwrap().len() as u64,
            MAX_CA_FILE_BYTES
        );
        let over = dir.join("over.pem");
        std::fs::write(&over, vec![b'#'; MAX_CA_FILE_BYTES as usize + 1]).unwrap();
        assert!(read_ca_file(&over).is_err());
        let missing = read_ca_file(&dir.join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("cannot read"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn field(result: Result<UrlScheme>) -> String {
        match result {
            Err(LockError::InvalidInput { field, .. }) => field,
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn schemes() {
        let single = UrlRules {
            crate_name: "lock-a",
            cluster: false,
            tls: true,
        };
        let cluster = UrlRules {
            cluster: true,
            ..single
        };
        let check = |rules: UrlRules, url: &str| rules.check(&SecretUrl::new(url), None);
        for url in ["redis://h/", "valkey://h/"] {
            let plain = UrlScheme {
                tls: false,
                cluster: false,
            };
            assert_eq!(check(single, url).ok(), Some(plain));
            assert_eq!(check(cluster, url).ok(), Some(plain));
        }
        for url in ["rediss://h/", "valkeys://h/"] {
            assert_eq!(check(single, url).ok().map(|s| s.tls), Some(true));
        }
        for url in ["redis-cluster://h", "valkeys-cluster://h"] {
            assert_eq!(check(cluster, url).ok().map(|s| s.cluster), Some(true));
            assert_eq!(field(check(single, url)), "url");
        }
        for url in [
            "http://h/",
            "h:6379",
            "redis-sentinel://h",
            "-cluster://h",
            "redis ://h",
        ] {
            assert_eq!(field(check(single, url)), "url", "{url}");
            assert_eq!(field(check(cluster, url)), "url", "{url}");
        }
    }

    #[test]
    fn tls_needs_the_feature() {
        let rules = UrlRules {
            crate_name: "lock-a",
            cluster: true,
            tls: false,
        };
        for url in ["rediss://u:s3cret@h/", "valkeys-cluster://u:s3cret@h"] {
            let error = rules
                .check(&SecretUrl::new(url), None)
                .expect_err("needs the feature");
            assert!(error.to_string().contains("`tls` cargo feature of lock-a"));
            assert!(!error.to_string().contains("s3cret"), "{error}");
        }
        let ca = Some(Path::new("ca.pem"));
        assert_eq!(
            field(rules.check(&SecretUrl::new("redis://h/"), ca)),
            "tls_ca_file"
        );
        let built = UrlRules { tls: true, ..rules };
        assert!(built.check(&SecretUrl::new("redis://h/"), ca).is_ok());
    }

    #[test]
    fn pttl_answers() {
        assert_eq!(holding_from_pttl(-2), Holding::Free);
        assert_eq!(holding_from_pttl(-1), Holding::Held { ttl: None });
        assert_eq!(
            holding_from_pttl(1500),
            Holding::Held {
                ttl: Some(Duration::from_millis(1500))
            }
        );
        assert_eq!(gone_in(-2), Some(Duration::ZERO));
        assert_eq!(gone_in(-1), None);
        assert_eq!(gone_in(1500), Some(Duration::from_millis(1501)));
    }

    #[test]
    fn text_is_shown_without_a_password_only_when_it_looks_like_a_url() {
        assert_eq!(shown_text("app:locks:"), "app:locks:");
        assert_eq!(shown_text("redis://u:s3cret@h:1/"), "redis://u:***@h:1/");
        assert_eq!(shown_text("u:s3cret@h"), "u:***@h");
        let shown = shown_path(Path::new("/etc/redis://u:s3cret@h/ca.pem"));
        assert!(
            !shown.contains("s3cret") && shown.contains("***@h/ca.pem"),
            "{shown}"
        );
        assert_eq!(shown_path(Path::new("/etc/ssl/ca.pem")), "/etc/ssl/ca.pem");
    }
}
