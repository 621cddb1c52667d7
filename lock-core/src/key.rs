//! Validated lock keys and namespaces.

use std::fmt;
use std::sync::Arc;

use crate::error::{LockError, Result};

/// The longest key accepted, in bytes: longer keys are almost always a bug (a payload used as a key).
pub const MAX_KEY_LEN: usize = 1024;

/// The separator between a namespace and a key, as in the original facade (`namespace:key`).
pub const NAMESPACE_SEPARATOR: char = ':';

/// A lock key that has passed validation: non-empty and at most [`MAX_KEY_LEN`] bytes.
///
/// Any other content (unicode, spaces, quotes, Lua syntax) is allowed: backends pass keys as data,
/// never as code. Cloning is cheap: keys of up to 23 bytes live inline (no allocation on the
/// hot path), longer ones are shared.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Repr);

/// A key's text: inline in three machine words (copied, compared and hashed as words, where
/// a byte-wise inline string stalls the CPU's store forwarding on every copy) or shared. Each
/// text has one form (up to [`INLINE`] bytes inline), so equal keys have equal forms.
#[derive(Clone, PartialEq, Eq)]
enum Repr {
    Inline(Inline),
    Shared(Arc<str>),
}

/// The longest key kept inline, in bytes.
const INLINE: usize = 23;

/// Up to [`INLINE`] bytes of text, then zeros, and the length in the last byte.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, align(8))]
struct Inline([u8; INLINE + 1]);

impl Inline {
    /// `parts` joined, if they fit.
    #[inline]
    fn new(parts: &[&str]) -> Option<Self> {
        let len: usize = parts.iter().map(|part| part.len()).sum();
        if len > INLINE {
            return None;
        }
        let mut bytes = [0; INLINE + 1];
        let mut at = 0;
        for part in parts {
            bytes[at..at + part.len()].copy_from_slice(part.as_bytes());
            at += part.len();
        }
        bytes[INLINE] = len as u8;
        Some(Self(bytes))
    }

    #[inline]
    fn as_bytes(&self) -> &[u8] {
        &self.0[..usize::from(self.0[INLINE])]
    }
}

impl Repr {
    /// `parts` joined: inline if they fit, shared otherwise.
    #[inline]
    fn new(parts: &[&str]) -> Self {
        match Inline::new(parts) {
            Some(inline) => Self::Inline(inline),
            None => Self::Shared(Arc::from(parts.concat())),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Inline(inline) => inline.as_bytes(),
            Self::Shared(text) => text.as_bytes(),
        }
    }
}

impl std::hash::Hash for Key {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match &self.0 {
            // Length included, zero-padded: as distinct as the text.
            Repr::Inline(inline) => {
                for word in inline.0.chunks_exact(8) {
                    let mut bytes = [0; 8];
                    bytes.copy_from_slice(word);
                    state.write_u64(u64::from_ne_bytes(bytes));
                }
            }
            Repr::Shared(text) => text.hash(state),
        }
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The order of the texts (byte-wise, as `str` orders).
impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.as_bytes().cmp(other.0.as_bytes())
    }
}

impl Key {
    /// Validates `key`.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `key` when it is empty or longer than [`MAX_KEY_LEN`].
    #[inline]
    pub fn new(key: impl AsRef<str>) -> Result<Self> {
        let key = key.as_ref();
        if key.is_empty() {
            return Err(LockError::invalid("key", "must not be empty"));
        }
        Self::checked_len(key.len())?;
        Ok(Self(Repr::new(&[key])))
    }

    #[inline]
    fn checked_len(len: usize) -> Result<()> {
        if len > MAX_KEY_LEN {
            return Err(LockError::invalid(
                "key",
                format!("is {len} bytes long; the limit is {MAX_KEY_LEN}"),
            ));
        }
        Ok(())
    }

    /// The empty placeholder a released guard shows; never stored anywhere.
    pub(crate) fn released() -> Self {
        Self(Repr::new(&[""]))
    }

    /// The key as stored by the backend.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Built from `str`s, cut at their end: always UTF-8.
            Repr::Inline(inline) => std::str::from_utf8(inline.as_bytes()).unwrap_or_default(),
            Repr::Shared(text) => text,
        }
    }

    /// The key's bytes (its text's UTF-8), without the check that [`Key::as_str`] makes: what
    /// a store's commands carry.
    ///
    /// ```
    /// let key = lock_core::Key::new("orders:42")?;
    /// assert_eq!(key.as_bytes(), b"orders:42");
    /// # Ok::<(), lock_core::LockError>(())
    /// ```
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

/// A prefix that keeps the locks of one application (or test) apart from every other's.
///
/// `Namespace::new("app")?.key("job")` is the key `app:job`, as the original facade's `lockNs`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Namespace(String);

impl Namespace {
    /// Validates `namespace`: non-empty, short enough to leave room for keys, and not a URL
    /// that carries a password (a connection URL put there by mistake: it would be stored in
    /// every key in the clear and shown in every message naming one).
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `namespace` (a URL shown without its password).
    pub fn new(namespace: impl Into<String>) -> Result<Self> {
        let namespace = namespace.into();
        if namespace.is_empty() {
            return Err(LockError::invalid(
                "namespace",
                "must not be empty; leave it unset for no namespace",
            ));
        }
        crate::raw::validate::name("namespace", &namespace)?;
        if namespace.len() >= MAX_KEY_LEN / 2 {
            return Err(LockError::invalid(
                "namespace",
                format!(
                    "is {} bytes long; the limit is {}",
                    namespace.len(),
                    MAX_KEY_LEN / 2 - 1
                ),
            ));
        }
        Ok(Self(namespace))
    }

    /// The namespace itself, without separator.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `namespace:key`, validated as a [`Key`].
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] when `key` is empty or the result is too long.
    pub fn key(&self, key: &str) -> Result<Key> {
        if key.is_empty() {
            return Err(LockError::invalid("key", "must not be empty"));
        }
        Key::checked_len(self.0.len() + NAMESPACE_SEPARATOR.len_utf8() + key.len())?;
        let mut separator = [0; 4];
        let separator: &str = NAMESPACE_SEPARATOR.encode_utf8(&mut separator);
        Ok(Key(Repr::new(&[self.0.as_str(), separator, key])))
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// The first key of `keys` that appears again later, if any.
fn first_repeated(keys: &[Key]) -> Option<&Key> {
    if keys.len() <= 8 {
        return keys
            .iter()
            .enumerate()
            .find(|(i, key)| keys[i + 1..].contains(key))
            .map(|(_, key)| key);
    }
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    keys.iter().find(|key| !seen.insert(*key))
}

/// One or more keys locked together; never empty. Cloning is cheap, and a single key costs no
/// extra allocation.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeySet(KeySetRepr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum KeySetRepr {
    One(Key),
    Many(Arc<[Key]>),
}

impl KeySet {
    /// A set of one key.
    #[inline]
    pub fn one(key: Key) -> Self {
        Self(KeySetRepr::One(key))
    }

    /// A set of several keys, taken all or none.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `keys` when there is none, or when a key appears
    /// more than once (after namespacing): a lock cannot hold the same key twice, and a
    /// repeated key would otherwise meet itself as "held by someone else".
    pub fn many(keys: Vec<Key>) -> Result<Self> {
        if let Some(repeated) = first_repeated(&keys) {
            return Err(LockError::invalid(
                "keys",
                format!("`{repeated}` appears more than once; name each key once"),
            ));
        }
        match keys.len() {
            0 => Err(LockError::invalid("keys", "name at least one key to lock")),
            1 => Ok(Self::one(
                keys.into_iter()
                    .next()
                    .ok_or_else(|| LockError::invalid("keys", "empty"))?,
            )),
            _ => Ok(Self(KeySetRepr::Many(Arc::from(keys)))),
        }
    }

    /// The first key, used to name the lock in messages and spans.
    #[inline]
    pub fn primary(&self) -> &Key {
        match &self.0 {
            KeySetRepr::One(key) => key,
            // `many` never builds an empty set.
            KeySetRepr::Many(keys) => &keys[0],
        }
    }

    /// The keys as a slice.
    pub fn as_slice(&self) -> &[Key] {
        match &self.0 {
            KeySetRepr::One(key) => std::slice::from_ref(key),
            KeySetRepr::Many(keys) => keys,
        }
    }
}

impl std::ops::Deref for KeySet {
    type Target = [Key];

    fn deref(&self) -> &[Key] {
        self.as_slice()
    }
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// The full key for `key` under an optional namespace: the seed facade's `getKey(namespace)`.
///
/// # Errors
/// [`LockError::InvalidInput`] for an empty or too long key.
#[inline]
pub fn key_for(namespace: Option<&Namespace>, key: &str) -> Result<Key> {
    match namespace {
        Some(namespace) => namespace.key(key),
        None => Key::new(key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_and_oversized_keys() {
        assert!(
            matches!(Key::new(""), Err(LockError::InvalidInput { field, .. }) if field == "key")
        );
        assert!(Key::new("x".repeat(MAX_KEY_LEN)).is_ok());
        assert!(Key::new("x".repeat(MAX_KEY_LEN + 1)).is_err());
    }

    #[test]
    fn accepts_unicode_and_hostile_keys_verbatim() {
        for raw in ["clé🔒", "x'); redis.call('flushall') --", "a b\tc", "\u{0}"] {
            assert_eq!(
                Key::new(raw).map(|k| k.to_string()).ok().as_deref(),
                Some(raw)
            );
        }
    }

    #[test]
    fn key_sets_are_never_empty() {
        assert!(KeySet::many(Vec::new()).is_err());
        let one = KeySet::many(vec![Key::new("a").expect("valid")]).expect("one key");
        assert_eq!(one.primary().as_str(), "a");
        let two = KeySet::many(vec![
            Key::new("a").expect("valid"),
            Key::new("b").expect("valid"),
        ])
        .expect("two");
        assert_eq!(two.len(), 2);
        assert_eq!(two.primary().as_str(), "a");
    }

    /// A connection URL with a password given as the namespace is refused, shown without the
    /// password (old: accepted, and `lockrun status` printed every key with the password);
    /// names that only look like URLs, and URLs without secrets, stay valid.
    #[test]
    fn a_url_with_a_password_is_no_namespace() {
        for url in [
            "redis://:s3cret@10.0.0.1:6379/",
            "redis://app:s3cret@h",
            "rediss://s3cret@h:6380/0",
            "valkey://h:6379/?password=s3cret",
            "redis://h:s3cret",
            " redis://:s3cret@h",
            "billing redis://:s3cret@h",
            "billing:REDIS://:s3cret@h",
            "9redis://:s3cret@h",
            "redis-cluster://u:s3cret@h",
            "Valkeys-Cluster://s3cret@h",
            "redis+unix:///run/redis.sock?pass=s3cret",
        ] {
            match Namespace::new(url) {
                Err(LockError::InvalidInput { field, reason }) => {
                    assert_eq!(field, "namespace");
                    assert!(!reason.contains("s3cret"), "{reason}");
                    assert!(reason.contains("URL with a password"), "{reason}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        for name in [
            "billing",
            "svc:jobs:v2",
            "user@host",
            "a:b@c",
            "redis://10.0.0.1:6379/0",
            "https://example.com/orders",
            "://:s3cret@h",
            "é-https://example.com/orders",
            "svc://",
            // Not a connection URL of a backend: valid names (a password in them is not one
            // of ours).
            "ssh://git@github.com/org/repo",
            "https://mastodon.social/@alice",
            "https://registry.npmjs.org/@types/node",
            "app://orders:v2",
            "https://user:pw@example.com/",
        ] {
            assert!(Namespace::new(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn namespace_joins_with_a_colon() {
        let ns = Namespace::new("app").expect("valid namespace");
        assert_eq!(ns.key("job").expect("valid key").as_str(), "app:job");
        assert!(ns.key("").is_err());
        assert!(Namespace::new("").is_err());
        assert_eq!(key_for(None, "job").expect("valid").as_str(), "job");
        assert_eq!(
            key_for(Some(&ns), "job").expect("valid").as_str(),
            "app:job"
        );
    }

    /// Keys of 23 bytes live inline and of 24 shared: on both sides of the line (and across
    /// it, as a namespace joins), keys read back, compare, order and hash as their text does.
    #[test]
    fn inline_and_shared_keys_behave_as_their_text() {
        use std::collections::hash_map::DefaultHasher;
        use std::hash::{Hash, Hasher};
        let hash = |key: &Key| {
            let mut hasher = DefaultHasher::new();
            key.hash(&mut hasher);
            hasher.finish()
        };
        let ns = Namespace::new("ns").expect("valid");
        let texts: Vec<String> = (1..=30)
            .flat_map(|len| {
                [
                    "a".repeat(len),
                    format!("{}b", "a".repeat(len - 1)),
                    "é".repeat(len),
                ]
            })
            .collect();
        let keys: Vec<Key> = texts
            .iter()
            .map(|text| Key::new(text).expect("valid"))
            .collect();
        for (text, key) in texts.iter().zip(&keys) {
            assert_eq!(key.as_str(), text);
            assert_eq!(key.to_string(), *text);
            assert_eq!(format!("{key:?}"), format!("{text:?}"));
            let joined = ns.key(text).expect("valid");
            assert_eq!(joined.as_str(), format!("ns:{text}"));
            assert_eq!(joined, Key::new(format!("ns:{text}")).expect("valid"));
            assert_eq!(
                hash(&joined),
                hash(&Key::new(format!("ns:{text}")).expect("valid"))
            );
        }
        for (a_text, a) in texts.iter().zip(&keys) {
            for (b_text, b) in texts.iter().zip(&keys) {
                assert_eq!(a == b, a_text == b_text, "{a_text} vs {b_text}");
                assert_eq!(a.cmp(b), a_text.cmp(b_text), "{a_text} vs {b_text}");
                if a == b {
                    assert_eq!(hash(a), hash(b));
                }
            }
        }
        let distinct: std::collections::HashSet<u64> = keys.iter().map(hash).collect();
        assert_eq!(
            distinct.len(),
            keys.len(),
            "no two of these texts hash alike"
        );
    }
}
