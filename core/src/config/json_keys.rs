//! Repeated keys in a JSON object. serde_json keeps the last of them
//! silently, so `{"capacity": 2, "capacity": 20}` would quietly mean 20;
//! the configuration refuses such a document instead, naming the key.

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

/// The dotted path (as configuration errors name keys) of the first key
/// repeated within one object of `text`, if any. `Err` if `text` is not JSON.
pub fn first_repeated_key(text: &str) -> Result<Option<String>, serde_json::Error> {
    let found = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    Walk {
        path: "",
        found: &found,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(found.into_inner())
}

/// Visits one value at `path`, remembering the first repeated key below it.
#[derive(Clone, Copy)]
struct Walk<'a> {
    path: &'a str,
    found: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            if !seen.insert(key) && self.found.borrow().is_none() {
                *self.found.borrow_mut() = Some(path.clone());
            }
            map.next_value_seed(Walk {
                path: &path,
                found: self.found,
            })?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::first_repeated_key;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn names_the_first_repeated_key_by_its_dotted_path() {
        let cases = [
            (r#"{"a": 1, "b": {"c": [1, {"d": 2}]}}"#, None),
            (r#"{"a": 1, "a": 2}"#, Some("a")),
            (
                r#"{"endpoints": {"/p": {"capacity": 2, "capacity": 20}}}"#,
                Some("endpoints./p.capacity"),
            ),
            (
                r#"{"endpoints": {"/p": {}, "/q": {}, "/p": {"capacity": 1}}}"#,
                Some("endpoints./p"),
            ),
            // The same key in two different objects is no repeat.
            (
                r#"{"x": {"k": 1}, "y": {"k": 1}, "z": [{"k": 1}, {"k": 2}]}"#,
                None,
            ),
            (r#"{"s": "a\"b", "s": 1}"#, Some("s")),
        ];
        for (text, want) in cases {
            assert_eq!(first_repeated_key(text).unwrap().as_deref(), want, "{text}");
        }
        assert!(first_repeated_key("{oops").is_err());
    }
}
