//! Keys at the inline boundary behave as their text: NUL bytes, lengths 22 to 24 and 1024,
//! unicode cut across the boundary, namespaces joined across it; equality, order and hashing
//! agree with the text's, in a `HashMap` and in a sorted multi-key order.

#![allow(clippy::unwrap_used)]

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use lock_core::{Key, Namespace};

fn hash(key: &Key) -> u64 {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

fn texts() -> Vec<String> {
    let mut texts = vec![
        "a".to_owned(),
        "a\0".to_owned(),
        "a\0\0".to_owned(),
        "\0".to_owned(),
        "\0a".to_owned(),
        "\0\0".to_owned(),
        "a".repeat(1024),
        format!("{}\0", "a".repeat(1023)),
    ];
    for len in [21usize, 22, 23, 24, 25] {
        texts.push("x".repeat(len));
        texts.push(format!("{}\0", "x".repeat(len - 1)));
        texts.push(format!("{}y", "x".repeat(len - 1)));
        // A 4-byte char that ends at, straddles or begins after byte 23.
        texts.push(format!("{}🔒", "x".repeat(len - 4)));
        texts.push(format!("{}🔒x", "x".repeat(len - 5)));
    }
    texts.sort();
    texts.dedup();
    texts
}

#[test]
fn keys_at_the_inline_boundary_are_their_text() {
    let texts = texts();
    let keys: Vec<Key> = texts.iter().map(|t| Key::new(t).expect("valid")).collect();
    let mut map = HashMap::new();
    for (text, key) in texts.iter().zip(&keys) {
        assert_eq!(key.as_str(), text);
        assert!(
            map.insert(key.clone(), text.clone()).is_none(),
            "{text:?} collided"
        );
    }
    for text in &texts {
        assert_eq!(map.get(&Key::new(text).expect("valid")), Some(text));
    }
    for (a_text, a) in texts.iter().zip(&keys) {
        for (b_text, b) in texts.iter().zip(&keys) {
            assert_eq!(a == b, a_text == b_text, "{a_text:?} vs {b_text:?}");
            assert_eq!(a.cmp(b), a_text.cmp(b_text), "{a_text:?} vs {b_text:?}");
            if a != b {
                assert_ne!(hash(a), hash(b), "{a_text:?} vs {b_text:?}");
            }
        }
    }
    let sorted: Vec<&str> = keys
        .iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(Key::as_str)
        .collect();
    let expected: Vec<&str> = texts.iter().map(String::as_str).collect();
    assert_eq!(sorted, expected);
}

#[test]
fn namespaced_keys_across_the_boundary_equal_their_joined_text() {
    for ns_len in [1usize, 10, 21, 22, 23, 24, 30] {
        let ns = Namespace::new("n".repeat(ns_len)).expect("valid");
        for text in texts().iter().filter(|t| t.len() < 500) {
            let joined = ns.key(text).expect("valid");
            let plain = Key::new(format!("{}:{text}", ns.as_str())).expect("valid");
            assert_eq!(joined, plain);
            assert_eq!(hash(&joined), hash(&plain));
            assert_eq!(joined.as_str(), plain.as_str());
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// The promise of `Locker`'s docs: applications whose namespaces differ and hold no `:`
    /// never share a stored key, whatever their keys (`:` included); a namespace with a `:`
    /// can (`a` with `b:c` and `a:b` with `c`), as the docs say.
    #[test]
    fn distinct_namespaces_without_a_colon_never_share_a_key(
        first in "[a-z:]{1,6}",
        second in "[a-z:]{1,6}",
        key_one in "[a-z:]{1,8}",
        key_two in "[a-z:]{1,8}",
    ) {
        let one = Namespace::new(first.clone()).unwrap();
        let two = Namespace::new(second.clone()).unwrap();
        let (stored_one, stored_two) = (one.key(&key_one).unwrap(), two.key(&key_two).unwrap());
        if first != second && !first.contains(':') && !second.contains(':') {
            proptest::prop_assert_ne!(stored_one, stored_two);
        }
    }
}

/// The other side of the promise, so that the property above cannot hold by accident: with a
/// `:` in a namespace, two applications can meet on one key.
#[test]
fn a_namespace_with_a_colon_can_meet_another_on_one_key() {
    let (a, ab) = (Namespace::new("a").unwrap(), Namespace::new("a:b").unwrap());
    assert_eq!(a.key("b:c").unwrap(), ab.key("c").unwrap());
}
