//! Lock tokens: the random value that proves who holds a lock.

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::error::{LockError, Result};

/// Random bytes in a token: 128 bits, enough that two holders never draw the same one.
pub const TOKEN_BYTES: usize = 16;

/// A random, unguessable lock value drawn from a CSPRNG keyed by the operating system.
///
/// Release and extend compare it with the stored value, so a holder whose lock expired cannot
/// touch the next holder's lock. A fresh token is drawn for every attempt. `Debug` and `Display`
/// hide it; call [`Token::expose`] where the value itself is needed (backends, interop).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token(Repr);

/// Generated tokens are two words, inline (no allocation, cheap to copy and compare) and
/// written out as hex only when a store needs the text; tokens read back from a store that are
/// not in that form may have any length and are shared.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    Words([u64; 2]),
    Stored(Arc<str>),
}

impl Token {
    /// Draws a new token: 16 bytes from a CSPRNG, shown as 32 lower-case hex characters.
    ///
    /// The generator is ChaCha12 (`rand`'s `StdRng`), one per thread, keyed from the OS
    /// random source and rekeyed every 4096 tokens, so that a token costs no system call on
    /// the hot path. A process that forks without `exec` and draws tokens on the same thread
    /// in parent and child would repeat them; draw tokens only in processes started normally.
    ///
    /// # Errors
    /// [`LockError::Backend`] if the operating system has no entropy source to give.
    #[inline]
    pub fn generate() -> Result<Self> {
        Ok(Self(Repr::Words(random_words()?)))
    }

    /// Wraps a token read back from a store (e.g. to release a lock taken by another process).
    /// A value of 32 lower-case hex digits, as [`Token::generate`] writes, equals the generated
    /// token it came from.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `token` when it is empty.
    pub fn from_stored(value: impl Into<String>) -> Result<Self> {
        let value = value.into();
        if value.is_empty() {
            return Err(LockError::invalid("token", "must not be empty"));
        }
        if let Some(words) = parse_words(&value) {
            return Ok(Self(Repr::Words(words)));
        }
        Ok(Self(Repr::Stored(Arc::from(value))))
    }

    /// The placeholder held by a guard after release; never stored anywhere (real tokens are
    /// drawn from 2^128 values, so it cannot match one in practice).
    pub(crate) fn released() -> &'static Token {
        static RELEASED: Token = Token(Repr::Words([0, 0]));
        &RELEASED
    }

    /// The value of a token that is not in the generated form (32 lower-case hex digits), which
    /// only [`Token::from_stored`] makes; `None` for a generated one.
    pub(crate) fn stored_text(&self) -> Option<&str> {
        match &self.0 {
            Repr::Words(_) => None,
            Repr::Stored(value) => Some(value),
        }
    }

    /// The token's value, as stored (32 lower-case hex digits for a generated token). Keep it
    /// out of logs: whoever has it can release the lock.
    pub fn expose(&self) -> TokenText<'_> {
        match &self.0 {
            Repr::Words([high, low]) => {
                let mut hex = [0u8; TOKEN_BYTES * 2];
                hex[..16].copy_from_slice(&hex_word(*high));
                hex[16..].copy_from_slice(&hex_word(*low));
                TokenText(Text::Hex(hex))
            }
            Repr::Stored(value) => TokenText(Text::Stored(value)),
        }
    }

    /// The first 8 characters, enough to tell holders apart in output without revealing the token.
    pub fn fingerprint(&self) -> String {
        let value = self.expose();
        value.get(..8).unwrap_or(&value).to_owned()
    }
}

/// A token's value as text, from [`Token::expose`]; use it as a `&str` (`&*text`).
pub struct TokenText<'a>(Text<'a>);

enum Text<'a> {
    Hex([u8; TOKEN_BYTES * 2]),
    Stored(&'a str),
}

impl TokenText<'_> {
    /// The value.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Only ASCII hex digits are ever written into `Hex`.
            Text::Hex(hex) => std::str::from_utf8(hex).unwrap_or_default(),
            Text::Stored(value) => value,
        }
    }

    /// The value's bytes, without the check that [`TokenText::as_str`] makes: what a store's
    /// commands carry.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Text::Hex(hex) => hex,
            Text::Stored(value) => value.as_bytes(),
        }
    }
}

impl std::ops::Deref for TokenText<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for TokenText<'_> {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for TokenText<'_> {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for TokenText<'_> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Debug for TokenText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenText(<redacted>)")
    }
}

/// The two words written as 32 lower-case hex digits, if `value` is exactly that.
fn parse_words(value: &str) -> Option<[u64; 2]> {
    let lower_hex = |text: &str| {
        text.bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
    };
    if value.len() != TOKEN_BYTES * 2 || !lower_hex(value) {
        return None;
    }
    let high = u64::from_str_radix(value.get(..16)?, 16).ok()?;
    let low = u64::from_str_radix(value.get(16..)?, 16).ok()?;
    Some([high, low])
}

/// The 16 lower-case hex digits of `word`, most significant first, without a table: each
/// nibble is spread into a byte of its own, then moved to `'0'..='9'` or `'a'..='f'`.
fn hex_word(word: u64) -> [u8; 16] {
    let spread = |half: u32| -> u64 {
        // 8 nibbles -> 8 bytes, each holding one nibble (most significant nibble first).
        let mut x = u64::from(half);
        x = ((x & 0xffff_0000) << 16) | (x & 0x0000_ffff);
        x = ((x & 0x0000_ff00_0000_ff00) << 8) | (x & 0x0000_00ff_0000_00ff);
        x = ((x & 0x00f0_00f0_00f0_00f0) << 4) | (x & 0x000f_000f_000f_000f);
        // Bytes holding 10..=15 get 'a' - 10 added instead of '0'.
        let letters = ((x + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        x + 0x3030_3030_3030_3030 + letters * u64::from(b'a' - b'0' - 10)
    };
    let mut hex = [0u8; 16];
    #[allow(clippy::cast_possible_truncation)]
    let (high, low) = ((word >> 32) as u32, word as u32);
    hex[..8].copy_from_slice(&spread(high).to_be_bytes());
    hex[8..].copy_from_slice(&spread(low).to_be_bytes());
    hex
}

/// Tokens drawn from one seed before the generator is reseeded from the OS.
const TOKENS_PER_SEED: u32 = 4096;

thread_local! {
    static GENERATOR: RefCell<Option<Seeded>> = const { RefCell::new(None) };
}

/// A per-thread ChaCha12 stream keyed from the OS random source, rekeyed every
/// [`TOKENS_PER_SEED`] tokens so that a leak of its state exposes few tokens.
struct Seeded {
    rng: StdRng,
    tokens_left: u32,
}

#[inline]
fn random_words() -> Result<[u64; 2]> {
    GENERATOR.with(|generator| {
        let mut generator = generator.borrow_mut();
        let seeded = match generator.as_mut() {
            Some(seeded) if seeded.tokens_left > 0 => seeded,
            _ => generator.insert(Seeded {
                rng: StdRng::try_from_os_rng().map_err(|e| {
                    LockError::backend("core", format!("the OS random source failed: {e}"))
                })?,
                tokens_left: TOKENS_PER_SEED,
            }),
        };
        seeded.tokens_left -= 1;
        Ok([seeded.rng.next_u64(), seeded.rng.next_u64()])
    })
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn hex_words_match_the_formatter() {
        for word in [
            0,
            u64::MAX,
            0x0123_4567_89ab_cdef,
            0xfedc_ba98_7654_3210,
            0xa0b0_c0d0_e0f0_0a09,
        ] {
            assert_eq!(hex_word(word), format!("{word:016x}").as_bytes());
        }
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..10_000 {
            let word = rng.next_u64();
            assert_eq!(hex_word(word), format!("{word:016x}").as_bytes());
        }
    }

    #[test]
    fn tokens_are_128_bit_hex_and_unique() {
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            let token = Token::generate().expect("entropy");
            assert_eq!(token.expose().len(), 32);
            assert!(token.expose().bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(seen.insert(token), "duplicate token");
        }
    }

    #[test]
    fn debug_and_display_hide_the_value() {
        let token = Token::generate().expect("entropy");
        let value = token.expose();
        assert!(!format!("{token:?}").contains(&*value));
        assert!(!token.to_string().contains(&*value));
        assert!(!format!("{value:?}").contains(&*value));
        assert_eq!(token.fingerprint(), &value[..8]);
    }

    #[test]
    fn a_stored_value_equals_the_token_it_came_from() {
        let token = Token::generate().expect("entropy");
        let stored = Token::from_stored(token.expose().to_owned()).expect("stored");
        assert_eq!(stored, token);
        assert_eq!(stored.expose(), token.expose().as_str());
        let mut set = HashSet::new();
        set.insert(token);
        assert!(set.contains(&stored), "equal tokens must hash alike");
        for other in ["A0B1C2D3E4F5A6B7C8D9E0F1A2B3C4D5", "short", "x"] {
            let stored = Token::from_stored(other).expect("stored");
            assert_eq!(stored.expose(), other, "kept as read");
        }
        assert!(Token::from_stored("").is_err());
    }
}
