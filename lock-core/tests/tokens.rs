//! A million tokens from the OS CSPRNG, all distinct and well formed.

use std::collections::HashSet;

use lock_core::Token;

#[test]
fn one_million_tokens_are_unique() {
    let mut seen = HashSet::with_capacity(1_000_000);
    for _ in 0..1_000_000 {
        let token = Token::generate().expect("entropy");
        let value = token.expose();
        assert!(
            value.len() == 32 && value.bytes().all(|b| b.is_ascii_hexdigit()),
            "{}",
            value.as_str()
        );
        assert!(seen.insert(token), "a token repeated");
    }
    println!("tokens: 1000000 generated, {} unique", seen.len());
}
