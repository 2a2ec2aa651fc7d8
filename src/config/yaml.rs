//! YAML plumbing for the config: key paths, finding the line/column of a key or value in the source text,
//! and applying `--set key=value` overrides to a parsed document.
//!
//! Positions come from yaml_serde itself: to locate `datasets.0.path` we deserialise the source once more
//! with a seed that walks down that path and fails on purpose when it reaches the node; yaml_serde stamps the
//! failure with the mark (line, column) of the event it was reading, which is exactly the node's start.

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_yaml::{Mapping, Value};

/// The scalar `visit_*` methods of a walker that only looks at mappings and sequences: every scalar is accepted
/// and ignored.
macro_rules! ignore_scalars {
    () => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E: de::Error>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_none<E: de::Error>(self) -> Result<(), E> {
            Ok(())
        }
    };
}
use std::fmt;

/// One step of a key path: a mapping key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Seg {
    /// A mapping key.
    Key(String),
    /// A sequence index.
    Index(usize),
}

/// A key path such as `datasets.0.path` (the syntax `--set` uses).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    /// The empty path (the document root).
    pub fn root() -> Self {
        KeyPath(Vec::new())
    }

    /// This path extended by a key.
    pub fn key(&self, k: &str) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Key(k.to_string()));
        KeyPath(v)
    }

    /// This path extended by an index.
    pub fn index(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        KeyPath(v)
    }

    /// Whether `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &KeyPath) -> bool {
        self.0.len() >= other.0.len() && self.0[..other.0.len()] == other.0[..]
    }

    /// Whether this is the root path.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            match s {
                Seg::Key(k) => f.write_str(k)?,
                Seg::Index(n) => write!(f, "{n}")?,
            }
        }
        Ok(())
    }
}

/// A 1-based line and column in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

/// What to locate at a path: the key itself (for unknown-key errors) or the value under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The key text of the last path segment (for an index: the element itself).
    Key,
    /// The value node at the path.
    Value,
}

const FOUND: &str = "\u{0}loratune-config-locate-found";

/// Find the line/column of the key or value at `path` in `source`. `None` when the path does not occur in
/// the text (a key added by `--set`) or the text does not parse.
pub fn locate(source: &str, path: &KeyPath, target: Target) -> Option<Pos> {
    let de = serde_yaml::Deserializer::from_str(source);
    let seed = Locate {
        path: &path.0,
        target,
    };
    match seed.deserialize(de) {
        Ok(()) => None,
        Err(e) => {
            if e.to_string().contains(FOUND) {
                e.location().map(|l| Pos {
                    line: l.line(),
                    column: l.column(),
                })
            } else {
                None
            }
        }
    }
}

struct Locate<'a> {
    path: &'a [Seg],
    target: Target,
}

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.path.is_empty() {
            d.deserialize_any(Found)
        } else {
            d.deserialize_any(self)
        }
    }
}

/// A visitor that fails on whatever it sees, so the deserializer attaches that node's position.
struct Found;

impl<'de> Visitor<'de> for Found {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("anything")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
}

/// Deserialises one mapping key: reports whether it equals the wanted key, or fails (to be located) when
/// it does and the key itself is the target.
struct KeySeed<'a> {
    want: &'a str,
    fail_on_match: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        if v == self.want {
            if self.fail_on_match {
                return Err(E::custom(FOUND));
            }
            return Ok(true);
        }
        Ok(false)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.visit_str(if v { "true" } else { "false" })
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

impl<'de> Visitor<'de> for Locate<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping or sequence")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (want, rest) = match self.path.split_first() {
            Some((Seg::Key(k), rest)) => (k.as_str(), rest),
            _ => {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                return Ok(());
            }
        };
        let fail_on_match = rest.is_empty() && self.target == Target::Key;
        while let Some(matched) = map.next_key_seed(KeySeed {
            want,
            fail_on_match,
        })? {
            if matched {
                map.next_value_seed(Locate {
                    path: rest,
                    target: self.target,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (want, rest) = match self.path.split_first() {
            Some((Seg::Index(i), rest)) => (*i, rest),
            _ => {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                return Ok(());
            }
        };
        let mut i = 0usize;
        loop {
            if i == want {
                if seq
                    .next_element_seed(Locate {
                        path: rest,
                        target: self.target,
                    })?
                    .is_none()
                {
                    break;
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            i += 1;
        }
        Ok(())
    }

    ignore_scalars!();
}

/// Find the first key that appears twice in one mapping: its text and the position of the second occurrence.
/// (yaml_serde reports duplicates at the start of the mapping; this points at the repeated key itself.)
pub fn locate_duplicate_key(source: &str) -> Option<(String, Pos)> {
    let de = serde_yaml::Deserializer::from_str(source);
    match DupWalk.deserialize(de) {
        Ok(()) => None,
        Err(e) => {
            let msg = e.to_string();
            let start = msg.find(FOUND)? + FOUND.len();
            let rest = &msg[start..];
            let key = rest.split('\u{0}').next().unwrap_or("").to_string();
            e.location().map(|l| {
                (
                    key,
                    Pos {
                        line: l.line(),
                        column: l.column(),
                    },
                )
            })
        }
    }
}

struct DupWalk;

impl<'de> DeserializeSeed<'de> for DupWalk {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DupWalk {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while map.next_key_seed(DupKey { seen: &mut seen })?.is_some() {
            map.next_value_seed(DupWalk)?;
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(DupWalk)?.is_some() {}
        Ok(())
    }
    ignore_scalars!();
}

struct DupKey<'a> {
    seen: &'a mut std::collections::HashSet<String>,
}

impl<'de> DeserializeSeed<'de> for DupKey<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DupKey<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if self.seen.insert(v.to_string()) {
            Ok(())
        } else {
            Err(E::custom(format!("{FOUND}{v}\u{0}")))
        }
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.visit_str(if v { "true" } else { "false" })
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.visit_str(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.visit_str(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// A parsed `--set key=value` override.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The argument as the user wrote it (for messages).
    pub raw: String,
    /// The key path.
    pub path: KeyPath,
    /// The value, parsed as YAML.
    pub value: Value,
}

impl Override {
    /// Parse `key=value`: the key is a dotted path (`datasets.0.path`; numeric steps index sequences), the
    /// value is parsed as YAML (`16`, `true`, `2e-4`, `[q_proj, v_proj]`, `"quoted text"`; `null` or empty removes
    /// the key).
    pub fn parse(raw: &str) -> Result<Override, String> {
        let Some((key, value)) = raw.split_once('=') else {
            return Err(format!(
                "--set `{raw}`: expected key=value, e.g. --set lora_r=16"
            ));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("--set `{raw}`: the key before `=` is empty"));
        }
        let mut segs = Vec::new();
        for part in key.split('.') {
            if part.is_empty() {
                return Err(format!("--set `{raw}`: empty step in key path `{key}`"));
            }
            match part.parse::<usize>() {
                Ok(i) => segs.push(Seg::Index(i)),
                Err(_) => segs.push(Seg::Key(part.to_string())),
            }
        }
        if let Some(Seg::Index(_)) = segs.first() {
            return Err(format!(
                "--set `{raw}`: a key path starts with a key name, not an index"
            ));
        }
        let value: Value = if value.trim().is_empty() {
            Value::Null
        } else {
            serde_yaml::from_str(value).map_err(|e| {
                format!("--set `{raw}`: the value is not valid YAML ({e}); quote it, e.g. --set 'key=\"text\"'")
            })?
        };
        Ok(Override {
            raw: raw.to_string(),
            path: KeyPath(segs),
            value,
        })
    }

    /// Apply to a document (whose root must be a mapping). Missing mapping keys are created; a sequence
    /// index must exist or be one past the end (which appends). A null value (`key=null`, `key=~`, `key=`)
    /// removes a mapping key, so the key takes its default as if the file did not have it.
    pub fn apply(&self, doc: &mut Value) -> Result<(), String> {
        if self.value.is_null() {
            if let Some((Seg::Key(last), parent)) = self.path.0.split_last() {
                let mut node = Some(&mut *doc);
                for seg in parent {
                    node = match (node, seg) {
                        (Some(Value::Mapping(m)), Seg::Key(k)) => m.get_mut(k.as_str()),
                        (Some(Value::Sequence(s)), Seg::Index(j)) => s.get_mut(*j),
                        _ => None,
                    };
                }
                if let Some(Value::Mapping(m)) = node {
                    m.remove(last.as_str());
                }
                return Ok(());
            }
        }
        let mut node = doc;
        let mut walked = KeyPath::root();
        let n = self.path.0.len();
        let mut i = 0;
        while i < n {
            let seg = &self.path.0[i];
            let last = i + 1 == n;
            let fresh = || {
                if last {
                    Value::Null
                } else {
                    Value::Mapping(Mapping::new())
                }
            };
            match node {
                Value::Mapping(m) => {
                    let name = match seg {
                        Seg::Key(k) => k.clone(),
                        Seg::Index(j) => j.to_string(),
                    };
                    let key = Value::String(name.clone());
                    if !m.contains_key(&key) {
                        m.insert(key.clone(), fresh());
                    }
                    walked = walked.key(&name);
                    node = match m.get_mut(&key) {
                        Some(v) => v,
                        None => {
                            return Err(format!("--set `{}`: cannot create `{walked}`", self.raw))
                        }
                    };
                }
                Value::Sequence(s) => {
                    let Seg::Index(j) = seg else {
                        return Err(format!(
                            "--set `{}`: `{walked}` is a list; use an index (0..{}) instead of `{}`",
                            self.raw,
                            s.len(),
                            KeyPath(vec![seg.clone()])
                        ));
                    };
                    if *j == s.len() {
                        s.push(fresh());
                    } else if *j > s.len() {
                        return Err(format!(
                            "--set `{}`: `{walked}` has {} entries, so index {j} does not exist (use 0..{} or {} to append)",
                            self.raw,
                            s.len(),
                            s.len().saturating_sub(1),
                            s.len()
                        ));
                    }
                    walked = walked.index(*j);
                    node = &mut s[*j];
                }
                Value::Null if !walked.is_root() => {
                    // An empty key (`special_tokens:` with nothing under it) becomes a mapping or a list;
                    // the same step then runs again on it.
                    *node = match seg {
                        Seg::Key(_) => Value::Mapping(Mapping::new()),
                        Seg::Index(_) => Value::Sequence(Vec::new()),
                    };
                    continue;
                }
                other => {
                    return Err(format!(
                        "--set `{}`: `{walked}` is {}, not a mapping or list, so `{}` cannot be set under it",
                        self.raw,
                        describe(other),
                        self.path
                    ));
                }
            }
            i += 1;
        }
        *node = self.value.clone();
        Ok(())
    }
}

/// A short description of a YAML value's type, for messages.
pub fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "empty (null)",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
base_model: org/model   # comment
datasets:
  - path: a.jsonl
    type: alpaca
  - {path: b.jsonl, type: chat_template}
lora_r: 16
nested:
  inner:
    deep: [1, 2, 3]
";

    fn p(s: &str) -> KeyPath {
        Override::parse(&format!("{s}=1")).unwrap().path
    }

    #[test]
    fn locates_keys_and_values() {
        let at = |path: &str, t| locate(DOC, &p(path), t).map(|p| (p.line, p.column));
        assert_eq!(at("base_model", Target::Key), Some((1, 1)));
        assert_eq!(at("base_model", Target::Value), Some((1, 13)));
        assert_eq!(at("lora_r", Target::Key), Some((6, 1)));
        assert_eq!(at("lora_r", Target::Value), Some((6, 9)));
        assert_eq!(at("datasets.0.type", Target::Key), Some((4, 5)));
        assert_eq!(at("datasets.0.type", Target::Value), Some((4, 11)));
        assert_eq!(at("datasets.1.path", Target::Value), Some((5, 12)));
        assert_eq!(at("datasets.1.type", Target::Key), Some((5, 21)));
        assert_eq!(at("datasets.1", Target::Value), Some((5, 5)));
        assert_eq!(at("nested.inner.deep.2", Target::Value), Some((9, 18)));
        assert_eq!(at("datasets.2.path", Target::Value), None);
        assert_eq!(at("missing", Target::Key), None);
    }

    #[test]
    fn overrides_parse_and_apply() {
        let mut doc: Value = serde_yaml::from_str(DOC).unwrap();
        Override::parse("lora_r=32")
            .unwrap()
            .apply(&mut doc)
            .unwrap();
        Override::parse("datasets.1.path=c.jsonl")
            .unwrap()
            .apply(&mut doc)
            .unwrap();
        Override::parse("datasets.2.path=d.jsonl")
            .unwrap()
            .apply(&mut doc)
            .unwrap();
        Override::parse("special_tokens.pad_token=<pad>")
            .unwrap()
            .apply(&mut doc)
            .unwrap();
        Override::parse("lora_target_modules=[q_proj, v_proj]")
            .unwrap()
            .apply(&mut doc)
            .unwrap();
        Override::parse("learning_rate=2e-4")
            .unwrap()
            .apply(&mut doc)
            .unwrap();
        assert_eq!(doc["lora_r"], Value::from(32));
        assert_eq!(doc["datasets"][1]["path"], Value::from("c.jsonl"));
        assert_eq!(doc["datasets"][2]["path"], Value::from("d.jsonl"));
        assert_eq!(doc["special_tokens"]["pad_token"], Value::from("<pad>"));
        assert_eq!(doc["lora_target_modules"][1], Value::from("v_proj"));
        assert_eq!(doc["learning_rate"].as_f64(), Some(2e-4));

        let e = Override::parse("datasets.5.path=x")
            .unwrap()
            .apply(&mut doc)
            .unwrap_err();
        assert!(
            e.contains("--set `datasets.5.path=x`") && e.contains("has 3 entries"),
            "{e}"
        );
        let e = Override::parse("lora_r.x=1")
            .unwrap()
            .apply(&mut doc)
            .unwrap_err();
        assert!(e.contains("`lora_r` is a number"), "{e}");
        let e = Override::parse("datasets.path=x")
            .unwrap()
            .apply(&mut doc)
            .unwrap_err();
        assert!(e.contains("`datasets` is a list"), "{e}");
        assert!(Override::parse("lora_r")
            .unwrap_err()
            .contains("expected key=value"));
        assert!(Override::parse("=3").is_err());
        assert!(Override::parse("a..b=3").is_err());
        assert_eq!(Override::parse("x=").unwrap().value, Value::Null);
    }
}
