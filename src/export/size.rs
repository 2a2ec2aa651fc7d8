//! Byte sizes as users write them (`2GB`, `500MB`, `1.5GiB`, `4096`): the config's `merged_shard_size` and the
//! `--shard-size` flags.

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A byte size with transformers' `convert_file_size_to_int` units (GB = 10⁹, GiB = 2³⁰; a lower-case `b` as in
/// `5Gb` means bits), decimals allowed (`1.5GiB`), `B` or no unit for bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ByteSize {
    /// The text as written (what the resolved config writes back).
    pub text: String,
    /// The size in bytes.
    pub bytes: u64,
}

impl ByteSize {
    /// Parse a size string; the error says what forms are accepted.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
        let (num, unit) = (t[..split].trim(), t[split..].trim());
        let n: f64 = num.parse().map_err(|_| {
            format!("invalid size `{s}`; use a number followed by a unit, e.g. 2GB, 500MB, 1GiB")
        })?;
        let (mult, bits) = match unit.to_ascii_uppercase().as_str() {
            "" | "B" => (1.0, false),
            "KB" => (1e3, unit.ends_with('b')),
            "MB" => (1e6, unit.ends_with('b')),
            "GB" => (1e9, unit.ends_with('b')),
            "KIB" => (1024.0, false),
            "MIB" => (1024.0 * 1024.0, false),
            "GIB" => (1024.0 * 1024.0 * 1024.0, false),
            _ => {
                return Err(format!(
                    "invalid size `{s}`: unknown unit `{unit}`; use B, KB, MB, GB, KiB, MiB or GiB (e.g. 2GB)"
                ))
            }
        };
        if !(n.is_finite() && n >= 0.0) {
            return Err(format!("invalid size `{s}`: it must be a positive number"));
        }
        let bytes = n * mult / if bits { 8.0 } else { 1.0 };
        if bytes < 1.0 {
            return Err(format!("size `{s}` must be greater than zero"));
        }
        if bytes >= u64::MAX as f64 {
            return Err(format!("size `{s}` is too large"));
        }
        Ok(ByteSize {
            text: t.to_string(),
            bytes: bytes as u64,
        })
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 2GB, 500MB or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                ByteSize::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_size_follows_transformers() {
        assert_eq!(ByteSize::parse("2GB").unwrap().bytes, 2_000_000_000);
        assert_eq!(ByteSize::parse("1GiB").unwrap().bytes, 1 << 30);
        assert_eq!(ByteSize::parse("500MB").unwrap().bytes, 500_000_000);
        assert_eq!(ByteSize::parse("8Gb").unwrap().bytes, 1_000_000_000);
        assert_eq!(ByteSize::parse("12345").unwrap().bytes, 12345);
        assert!(ByteSize::parse("2 gigs").is_err());
        assert!(ByteSize::parse("0GB").is_err());
        assert!(ByteSize::parse("-1GB").is_err());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(ByteSize::parse("2GB").unwrap().bytes, 2_000_000_000);
        assert_eq!(ByteSize::parse("1.5 GiB").unwrap().bytes, 1_610_612_736);
        assert_eq!(ByteSize::parse("4096").unwrap().bytes, 4096);
        assert!(ByteSize::parse("2XB").unwrap_err().contains("unit"));
        assert!(ByteSize::parse("-1GB").is_err());
    }
}
