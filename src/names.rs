//! Closed sets of names a user may write (schedulers, dataset types, file kinds, dtypes, …): [`named_enum!`]
//! declares each as an enum in the module that owns the concept, with its canonical names, aliases and the names
//! refused with a reason. The YAML config, the CLI flags and the files loratune writes all parse and print them
//! through it.

/// Declares a name enum: `Variant = "canonical" | "alias" …`, optional `reject { "name" => "why" }` entries
/// for names we know but refuse with a specific explanation.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $primary:literal $(| $alias:literal)* ),+ $(,)?
        }
        reject { $($rej:literal => $msg:literal),* $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// The canonical names, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($primary),+];

            /// The canonical name (what the resolved config writes).
            pub fn as_str(&self) -> &'static str {
                match self { $( $name::$variant => $primary ),+ }
            }

            /// Parse a name (case-insensitive; aliases accepted). The error lists the supported names.
            pub fn parse(s: &str) -> Result<Self, String> {
                let lower = s.trim().to_ascii_lowercase();
                $(
                    if lower == $primary $(|| lower == $alias)* {
                        return Ok($name::$variant);
                    }
                )+
                $(
                    if lower == $rej {
                        return Err(format!("{} `{}` is not supported: {}", $what, s, $msg));
                    }
                )*
                let aliases: &[&str] = &[$($($alias,)*)+];
                let mut msg = format!("unknown {} `{}`; supported: {}", $what, s, Self::NAMES.join(", "));
                if !aliases.is_empty() {
                    msg.push_str(&format!(" (also accepted: {})", aliases.join(", ")));
                }
                if let Some(best) = $crate::config::suggest::did_you_mean(&lower, Self::NAMES.iter().copied().chain(aliases.iter().copied())) {
                    msg.push_str(&format!("; did you mean `{best}`?"));
                }
                Err(msg)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::parse(s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        write!(f, "one of {}", $name::NAMES.join(", "))
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::parse(v).map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

pub(crate) use named_enum;
