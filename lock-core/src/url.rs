//! Connection URLs that may carry a password, and showing them without it.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Unexpected, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::{LockError, Result};

/// What a hidden part is shown as.
const HIDDEN: &str = "***";

/// `url` without its password, for messages and logs: the user name stays, the password
/// becomes `***` (the whole user info when it has no `:`).
///
/// # How a URL is read
/// - The scheme is the text before the first `://` when it is a valid scheme (a letter, then
///   letters, digits, `+`, `-` or `.`); otherwise the text has no scheme.
/// - The user info is everything between the scheme's `://` (or the start, without a scheme)
///   and the **last** `@` of the text, whatever it contains: a password may hold `@`, `/`, `?`,
///   `#` or `:`, raw or percent-encoded. The user name is the user info up to its first `:`.
///   When the text has a `@` beyond the host (in a query, say), more than the password is
///   hidden; never less.
/// - Without any `@` there is no user info; but a `:` in the host part followed by anything
///   but a port number is taken for a password whose `@host` is missing, and hidden with all
///   that follows it.
/// - Query parameters whose name contains `pass` (`pass=`, `sentinelPassword=`), as drivers
///   read it (percent-decoded, any case: `P%41SS=`, and without the ASCII tabs and newlines
///   WHATWG drops: `pa<TAB>ss=`), are hidden too.
///
/// Drivers (redis-rs, fred) parse URLs as WHATWG does: their host part ends at the first `/`,
/// `?` or `#`, so a raw one of these in a password would move the host into the password.
/// [`SecretUrl::check_user_info`] refuses such a URL, with a message that says how to write
/// it, before any driver sees it.
///
/// ```
/// use lock_core::raw::redact_url;
///
/// assert_eq!(redact_url("redis://app:s3cret@h:6379/0"), "redis://app:***@h:6379/0");
/// // A password may hold `/`, `@`, `?` or `#`: the user info ends at the last `@`.
/// assert_eq!(redact_url("redis://app:pa/ss@w@rd@h:6379/0"), "redis://app:***@h:6379/0");
/// assert_eq!(redact_url("redis://s3cret@h:6379"), "redis://***@h:6379");
/// assert_eq!(redact_url("app:s3cret@h:6379"), "app:***@h:6379");
/// assert_eq!(redact_url("redis://h:6379/0"), "redis://h:6379/0");
/// ```
pub fn redact_url(url: &str) -> String {
    let (prefix, rest) = url.split_at(scheme_prefix_len(url));
    match rest.rfind('@') {
        Some(at) => {
            let (user_info, host_on) = rest.split_at(at);
            let user = match user_info.split_once(':') {
                Some((user, _)) => format!("{user}:{HIDDEN}"),
                None => HIDDEN.to_owned(),
            };
            format!("{prefix}{user}{}", redact_query(host_on))
        }
        None => {
            let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match password_without_host(&rest[..host_end]) {
                Some(colon) => format!("{prefix}{}:{HIDDEN}", &rest[..colon]),
                None => format!("{prefix}{}", redact_query(rest)),
            }
        }
    }
}

/// `text` (not meant to be a URL) as [`redact_url`] shows it, or `***` whole when that still
/// shows a URL with a secret: one after an earlier `@` (`ops@acme redis://h:pw`), which
/// `redact_url` takes for the end of the user info, or after another URL.
pub(crate) fn redact_text(text: &str) -> String {
    let redacted = redact_url(text);
    if carries_secret(&redacted) {
        HIDDEN.to_owned()
    } else {
        redacted
    }
}

/// Whether `text` holds a Redis or Valkey URL (a `redis…` or `valkey…` scheme and `://`,
/// anywhere in it) that carries a password or another part [`redact_url`] hides: put where a
/// name belongs (a namespace), it would be stored in every key in the clear and shown in every
/// message naming one.
pub(crate) fn carries_secret(text: &str) -> bool {
    // Drivers parse URLs as WHATWG does, which first drops ASCII tabs and newlines anywhere:
    // `redis:/<TAB>/:pw@h` is `redis://:pw@h` to them.
    let text: String = text
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect();
    let text = text.as_str();
    text.match_indices("://").any(|(at, _)| {
        // The scheme: the longest run of scheme characters before `://`, from a letter on.
        let before = &text[..at];
        // By bytes: the last byte of a non-ASCII character is one too, so `end + 1` is a
        // character boundary (old: `rfind` by `char` gave its first byte, and the slice below
        // panicked inside it: `é-https://…`).
        let run = before
            .bytes()
            .rposition(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')))
            .map_or(0, |end| end + 1);
        let start = before[run..]
            .find(|c: char| c.is_ascii_alphabetic())
            .map_or(at, |first| run + first);
        let url = &text[start..];
        let scheme = url[..scheme_prefix_len(url).saturating_sub(3)].to_ascii_lowercase();
        // Only the schemes of the backends' connection URLs (`redis`, `rediss`, `valkey`,
        // `valkeys`, their `-cluster` forms, and the drivers' `redis+unix`): a connection URL put
        // where a name belongs is the mistake to catch, and other URLs make valid names
        // (`ssh://git@github.com/org/repo`, `https://mastodon.social/@alice`).
        (scheme.starts_with("redis") || scheme.starts_with("valkey")) && redact_url(url) != url
    })
}

/// The length of `scheme://` at the start of `url`, or 0.
fn scheme_prefix_len(url: &str) -> usize {
    let Some(end) = url.find("://") else {
        return 0;
    };
    let scheme = &url[..end];
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if valid { end + 3 } else { 0 }
}

/// In a host part without `@`: the index of a `:` that is followed by something other than a
/// port number (an IPv6 literal's own colons excepted).
fn password_without_host(host: &str) -> Option<usize> {
    let skip = if host.starts_with('[') {
        host.find(']').map_or(host.len(), |end| end + 1)
    } else {
        0
    };
    let colon = skip + host[skip..].find(':')?;
    let after = &host[colon + 1..];
    let port = after.chars().all(|c| c.is_ascii_digit());
    (!port).then_some(colon)
}

/// `text` (a host, path and query) with the values of password-like query parameters hidden.
fn redact_query(text: &str) -> String {
    let Some(question) = text.find('?') else {
        return text.to_owned();
    };
    let (before, query_on) = text.split_at(question + 1);
    let (query, fragment) = query_on.split_at(query_on.find('#').unwrap_or(query_on.len()));
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            // Drivers read the name percent-decoded: `p%61ss` is `pass` to them.
            Some((name, _)) if decoded_name(name).to_ascii_lowercase().contains("pass") => {
                format!("{name}={HIDDEN}")
            }
            _ => pair.to_owned(),
        })
        .collect();
    format!("{before}{}{fragment}", query.join("&"))
}

/// A query parameter's name as drivers read it (`url`'s `query_pairs`): an ASCII tab, line feed
/// or carriage return removed (WHATWG drops them anywhere in a URL before parsing: `pa<TAB>ss`
/// is `pass`), then `%XX` escapes decoded (an invalid one kept as written), the bytes read as
/// UTF-8 with invalid ones replaced.
fn decoded_name(name: &str) -> String {
    let bytes: Vec<u8> = name
        .bytes()
        .filter(|byte| !matches!(byte, b'\t' | b'\n' | b'\r'))
        .collect();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|pair| pair.iter().all(u8::is_ascii_hexdigit))
            .and_then(|pair| std::str::from_utf8(pair).ok())
            .and_then(|pair| u8::from_str_radix(pair, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A connection URL (`redis://user:password@host:port/db`) that may carry a password.
///
/// Shown ([`Display`](fmt::Display) and [`Debug`]) as [`redact_url`] shows it, and deserialized
/// with errors that never quote it (a URL where a list was expected is "invalid type: string",
/// not the string): a configuration's password cannot reach a message or a log line by
/// accident. [`SecretUrl::expose`] hands the whole text to a driver.
///
/// Serializing writes the whole URL, password included: that is how a configuration is saved.
///
/// ```
/// use lock_core::SecretUrl;
///
/// let url = SecretUrl::new("redis://app:s3cret@db:6379/0");
/// assert_eq!(url.to_string(), "redis://app:***@db:6379/0");
/// assert_eq!(format!("{url:?}"), r#""redis://app:***@db:6379/0""#);
/// assert_eq!(url.expose(), "redis://app:s3cret@db:6379/0");
/// assert_eq!((url.scheme(), url.host()), (Some("redis"), "db:6379"));
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps `url`; nothing is checked yet (see [`SecretUrl::check_user_info`]).
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The whole URL, password included: for a driver, never for a message.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The scheme (`redis`, `rediss`…), when the URL starts with a valid one and `://`.
    pub fn scheme(&self) -> Option<&str> {
        let len = scheme_prefix_len(&self.0);
        (len > 0).then(|| &self.0[..len - 3])
    }

    /// The host and port (`host:port`), after the user info and before any path, query or
    /// fragment; empty when the URL names no host.
    pub fn host(&self) -> &str {
        let rest = &self.0[scheme_prefix_len(&self.0)..];
        let host_on = rest.rfind('@').map_or(rest, |at| &rest[at + 1..]);
        &host_on[..host_on.find(['/', '?', '#']).unwrap_or(host_on.len())]
    }

    /// Refuses a user info with a raw `/`, `?` or `#`: a driver would end the host part there
    /// and read part of the password as the host or port (a raw `@` is fine: the user info ends
    /// at the last one).
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] for `url`, showing the URL without its password and saying
    /// how to write these characters.
    pub fn check_user_info(&self) -> Result<()> {
        let rest = &self.0[scheme_prefix_len(&self.0)..];
        let user_info = rest.rfind('@').map_or("", |at| &rest[..at]);
        if user_info.contains(['/', '?', '#']) {
            return Err(LockError::invalid(
                "url",
                format!(
                    "{self}: the user name or password holds a `/`, `?` or `#`; \
                     percent-encode them as %2F, %3F and %23"
                ),
            ));
        }
        Ok(())
    }

    /// Deserializes a list of URLs, or a single URL string as a list of one, with errors that
    /// never quote a value: for `#[serde(deserialize_with = "SecretUrl::deserialize_list")]`
    /// on a `Vec<SecretUrl>`.
    ///
    /// # Errors
    /// The deserializer's, when the value is neither a string nor a list of strings; what was
    /// found instead is described, not quoted.
    pub fn deserialize_list<'de, D>(deserializer: D) -> Result<Vec<Self>, D::Error>
    where
        D: Deserializer<'de>,
    {
        // `deserialize_any`, not `deserialize_seq`: serde_json answers the latter with an error
        // it writes itself, quoting a string it found instead of a list.
        deserializer.deserialize_any(ListVisitor)
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> Self {
        Self(url.to_owned())
    }
}

impl From<&String> for SecretUrl {
    fn from(url: &String) -> Self {
        Self(url.clone())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&redact_url(&self.0), f)
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_string(UrlVisitor)
    }
}

/// Accepts a string; describes anything else without quoting it.
struct UrlVisitor;

impl Visitor<'_> for UrlVisitor {
    type Value = SecretUrl;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a URL string")
    }

    fn visit_str<E: de::Error>(self, url: &str) -> Result<SecretUrl, E> {
        Ok(SecretUrl::from(url))
    }

    fn visit_string<E: de::Error>(self, url: String) -> Result<SecretUrl, E> {
        Ok(SecretUrl(url))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<SecretUrl, E> {
        Err(E::invalid_type(Unexpected::Other("bytes"), &self))
    }
}

/// Accepts a list of URL strings; describes anything else without quoting it.
struct ListVisitor;

impl<'de> Visitor<'de> for ListVisitor {
    type Value = Vec<SecretUrl>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a URL string or a list of them, such as [\"redis://host:6379/\"]")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut urls = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(url) = seq.next_element::<SecretUrl>()? {
            urls.push(url);
        }
        Ok(urls)
    }

    /// One URL where a list belongs is a list of one (as the single-node backends take it).
    fn visit_str<E: de::Error>(self, url: &str) -> Result<Self::Value, E> {
        Ok(vec![SecretUrl::new(url)])
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
        Err(E::invalid_type(Unexpected::Other("bytes"), &self))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn passwords_are_hidden() {
        for (url, shown) in [
            ("redis://u:pw@h:1/2", "redis://u:***@h:1/2"),
            ("redis://:pw@h:1", "redis://:***@h:1"),
            ("redis://pw@h:1", "redis://***@h:1"),
            ("redis://h:1/", "redis://h:1/"),
            ("nonsense", "nonsense"),
            ("127.0.0.1:6379", "127.0.0.1:6379"),
            ("redis://[::1]:6379/", "redis://[::1]:6379/"),
            // Delimiters inside the password: the user info runs to the last `@`.
            ("redis://app:pa/ss@h:1/", "redis://app:***@h:1/"),
            ("redis://app:p?a#s@s@h:1/0", "redis://app:***@h:1/0"),
            ("redis://app:a://b@h:1", "redis://app:***@h:1"),
            ("redis://app:%2F%40x@h:1", "redis://app:***@h:1"),
            // No scheme, a broken scheme, a bad port: still hidden.
            ("app:pw@h:1/", "app:***@h:1/"),
            ("redis ://app:pw@h:1/", "redis :***@h:1/"),
            ("redis://app:pw@h:99999/", "redis://app:***@h:99999/"),
            ("redis://app:pw@/", "redis://app:***@/"),
            // A password whose `@host` is missing.
            ("redis://:s3cret", "redis://:***"),
            ("redis://app:pa/ss", "redis://app:***"),
            ("app:s3cret", "app:***"),
            // A `@` beyond the host hides more, never less.
            ("redis://h:1/?x=a@b", "redis://h:***@b"),
            // Password-like query parameters.
            (
                "redis+unix:///run/redis.sock?db=1&pass=pw",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            (
                "redis-sentinel://u:pw@h:1/0?sentinelPassword=sp#x",
                "redis-sentinel://u:***@h:1/0?sentinelPassword=***#x",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn the_host_follows_the_last_at() {
        for (url, scheme, host) in [
            ("redis://u:pw@h:1/0", Some("redis"), "h:1"),
            ("rediss://u:p@ss/w@h:1?x#y", Some("rediss"), "h:1"),
            ("redis://h:1", Some("redis"), "h:1"),
            ("redis://u:pw@/0", Some("redis"), ""),
            ("redis ://h:1", None, "redis :"),
            ("u:pw@h:1", None, "h:1"),
        ] {
            let url = SecretUrl::new(url);
            assert_eq!(
                (url.scheme(), url.host()),
                (scheme, host),
                "{}",
                url.expose()
            );
        }
    }

    #[test]
    fn raw_delimiters_in_the_user_info_are_refused_without_showing_it() {
        for url in [
            "redis://u:x9/y8z@h:1/",
            "redis://u:x9?y8z@h:1/",
            "redis://u:x9#y8z@h:1/",
        ] {
            let error = SecretUrl::new(url).check_user_info().unwrap_err();
            assert!(!error.to_string().contains("y8z"), "{error}");
            assert!(error.to_string().contains("%2F"), "{error}");
        }
        for url in [
            "redis://u:p@ss@h:1/",
            "redis://u:pa%2Fss@h:1/?x=/",
            "redis://h:1/a?b#c",
        ] {
            SecretUrl::new(url).check_user_info().unwrap();
        }
    }

    #[derive(Debug, Deserialize)]
    struct Config {
        #[serde(deserialize_with = "SecretUrl::deserialize_list")]
        urls: Vec<SecretUrl>,
        #[serde(default)]
        url: Option<SecretUrl>,
    }

    #[test]
    fn deserialize_errors_never_quote_the_url() {
        for json in [
            r#"{"urls": [["redis://u:s3cret@h:1/"]]}"#,
            r#"{"urls": 7, "x": "redis://u:s3cret@h:1/"}"#,
            r#"{"urls": [{"x": "redis://u:s3cret@h:1/"}]}"#,
            r#"{"urls": [], "url": ["redis://u:s3cret@h:1/"]}"#,
        ] {
            let error = serde_json::from_str::<Config>(json).unwrap_err();
            assert!(!error.to_string().contains("s3cret"), "{error}");
        }
        let error = toml::from_str::<Config>(r#"urls = [["redis://u:s3cret@h:1/"]]"#).unwrap_err();
        assert!(!error.message().contains("s3cret"), "{error}");
        // One URL where the list belongs is a list of one, in both formats.
        let config: Config = serde_json::from_str(r#"{"urls": "redis://u:s3cret@h:1/"}"#).unwrap();
        assert_eq!(config.urls.len(), 1);
        assert_eq!(config.urls[0].expose(), "redis://u:s3cret@h:1/");
        let config: Config = toml::from_str(r#"urls = "redis://u:s3cret@h:3/""#).unwrap();
        assert_eq!(config.urls[0].host(), "h:3");
        assert!(!format!("{config:?}").contains("s3cret"));

        let config: Config = serde_json::from_str(
            r#"{"urls": ["redis://u:s3cret@h:1/"], "url": "redis://u:s3cret@h:2/"}"#,
        )
        .unwrap();
        assert_eq!(config.urls[0].expose(), "redis://u:s3cret@h:1/");
        assert_eq!(config.url.as_ref().map(SecretUrl::host), Some("h:2"));
        assert!(!format!("{config:?}").contains("s3cret"));
        assert_eq!(
            serde_json::to_string(&config.urls).unwrap(),
            r#"["redis://u:s3cret@h:1/"]"#
        );
    }
}
