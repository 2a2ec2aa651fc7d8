//! Which linear modules get an adapter: PEFT's matching rules, plus `all-linear`, regex and layer filters.

use regex::Regex;

use crate::error::{Error, Result};

/// The user's choice of target modules.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetSpec {
    /// Module names: an entry matches a module whose path equals it or ends with `.` + it (PEFT's rule),
    /// e.g. `q_proj` or `model.layers.0.self_attn.q_proj`.
    Names(Vec<String>),
    /// Every linear layer except the output head (`lm_head`), as PEFT's `all-linear`.
    AllLinear,
    /// A regular expression that must match the whole module path (PEFT's string form).
    Regex(String),
}

/// A compiled target selection.
#[derive(Debug, Clone)]
pub struct TargetMatcher {
    spec: TargetSpec,
    regex: Option<Regex>,
    layers: Option<Vec<usize>>,
}

/// The layer index of a module path `model.layers.N....` (Falcon: `transformer.h.N....`).
pub fn layer_index(path: &str) -> Option<usize> {
    let rest = crate::model::Family::ALL
        .iter()
        .find_map(|f| path.strip_prefix(f.rules().layer_prefix))?;
    rest.split('.').next()?.parse().ok()
}

/// The last component of a module path (`q_proj`).
pub fn short_name(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

impl TargetMatcher {
    /// Compile a spec; `layers` restricts adapters to those decoder layers (PEFT `layers_to_transform`).
    pub fn new(spec: TargetSpec, layers: Option<Vec<usize>>) -> Result<Self> {
        let regex = match &spec {
            TargetSpec::Regex(r) => Some(
                Regex::new(&format!("^(?:{r})$"))
                    .map_err(|e| Error::Lora(format!("invalid lora_target_modules regex `{r}`: {e}")))?,
            ),
            TargetSpec::Names(n) if n.is_empty() => {
                return Err(Error::Lora(
                    "lora_target_modules is empty: name modules (e.g. [q_proj, v_proj]) or use lora_target_linear: true"
                        .into(),
                ))
            }
            _ => None,
        };
        Ok(TargetMatcher {
            spec,
            regex,
            layers,
        })
    }

    /// The spec this matcher was built from.
    pub fn spec(&self) -> &TargetSpec {
        &self.spec
    }

    /// Layers filter.
    pub fn layers(&self) -> Option<&[usize]> {
        self.layers.as_deref()
    }

    fn name_matches(&self, path: &str) -> bool {
        match &self.spec {
            TargetSpec::AllLinear => path != "lm_head",
            TargetSpec::Names(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
            TargetSpec::Regex(_) => self.regex.as_ref().is_some_and(|r| r.is_match(path)),
        }
    }

    /// Does the module at `path` get an adapter?
    pub fn matches(&self, path: &str) -> bool {
        if !self.name_matches(path) {
            return false;
        }
        match (&self.layers, layer_index(path)) {
            (None, _) => true,
            (Some(ls), Some(i)) => ls.contains(&i),
            (Some(_), None) => false,
        }
    }

    /// Select among the model's linear paths; error when the selection (or one named entry) matches nothing.
    pub fn select(&self, paths: &[String]) -> Result<Vec<String>> {
        let available = || {
            let mut names: Vec<&str> = paths.iter().map(|p| short_name(p)).collect();
            names.dedup();
            let mut seen = Vec::new();
            for n in names {
                if !seen.contains(&n) {
                    seen.push(n);
                }
            }
            seen.join(", ")
        };
        if let TargetSpec::Names(names) = &self.spec {
            for n in names {
                if !paths
                    .iter()
                    .any(|p| p == n || p.ends_with(&format!(".{n}")))
                {
                    return Err(Error::Lora(format!(
                        "LoRA target `{n}` matches no module of this model; available: {}",
                        available()
                    )));
                }
            }
        }
        if let Some(ls) = &self.layers {
            let n_layers = paths
                .iter()
                .filter_map(|p| layer_index(p))
                .max()
                .map(|m| m + 1)
                .unwrap_or(0);
            if let Some(bad) = ls.iter().find(|&&l| l >= n_layers) {
                return Err(Error::Lora(format!(
                    "LoRA layer index {bad} is out of range: the model has {n_layers} layers (0..{})",
                    n_layers.saturating_sub(1)
                )));
            }
        }
        let chosen: Vec<String> = paths.iter().filter(|p| self.matches(p)).cloned().collect();
        if chosen.is_empty() {
            return Err(Error::Lora(format!(
                "the LoRA target selection {:?} matches no module of this model; available: {}",
                self.spec,
                available()
            )));
        }
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Vec<String> {
        let mut v = Vec::new();
        for i in 0..2 {
            for m in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ] {
                v.push(format!("model.layers.{i}.{m}"));
            }
        }
        v.push("lm_head".into());
        v
    }

    #[test]
    fn names_follow_peft_suffix_rule() {
        let m = TargetMatcher::new(
            TargetSpec::Names(vec!["q_proj".into(), "v_proj".into()]),
            None,
        )
        .unwrap();
        let s = m.select(&paths()).unwrap();
        assert_eq!(
            s,
            vec![
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.self_attn.v_proj",
                "model.layers.1.self_attn.q_proj",
                "model.layers.1.self_attn.v_proj"
            ]
        );
        // `proj` alone is not a suffix after a dot of any module.
        let m = TargetMatcher::new(TargetSpec::Names(vec!["proj".into()]), None).unwrap();
        let e = m.select(&paths()).unwrap_err().to_string();
        assert!(
            e.contains("`proj`") && e.contains("q_proj") && e.contains("lm_head"),
            "{e}"
        );
    }

    #[test]
    fn all_linear_excludes_lm_head_and_layers_filter() {
        let m = TargetMatcher::new(TargetSpec::AllLinear, Some(vec![1])).unwrap();
        let s = m.select(&paths()).unwrap();
        assert_eq!(s.len(), 7);
        assert!(s.iter().all(|p| p.starts_with("model.layers.1.")));
        let m = TargetMatcher::new(TargetSpec::AllLinear, Some(vec![5])).unwrap();
        assert!(m
            .select(&paths())
            .unwrap_err()
            .to_string()
            .contains("out of range"));
    }

    #[test]
    fn regex_must_match_whole_path() {
        let m = TargetMatcher::new(TargetSpec::Regex(r".*\.(q|v)_proj".into()), None).unwrap();
        assert_eq!(m.select(&paths()).unwrap().len(), 4);
        let m = TargetMatcher::new(TargetSpec::Regex("q_proj".into()), None).unwrap();
        assert!(m.select(&paths()).is_err());
        assert!(TargetMatcher::new(TargetSpec::Regex("(".into()), None).is_err());
    }
}
