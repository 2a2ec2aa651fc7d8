//! What loading and validation share: the options, where a config came from, and problems before and after they
//! are given a position in the file.

use std::path::PathBuf;

use super::yaml::{locate, KeyPath, Override, Pos, Target};
use super::ConfigIssue;

/// What the config is loaded for: a whole training run, or only its data (`loratune data stats|preview`, which
/// need no learning rate or run length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Purpose {
    #[default]
    Train,
    Data,
}

/// Options for loading a config.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Check that files named in the config exist (dataset paths and globs, a local `base_model`,
    /// `resume_from_checkpoint`, a `chat_template_jinja` file). Default: `true`. Turn off to check a config
    /// on a machine that does not have the data (e.g. the example-config tests).
    pub check_files: bool,
    /// Folder that relative paths in the config are resolved against. Default: unset = the working
    /// directory (Axolotl's behaviour).
    pub base_dir: Option<PathBuf>,
    /// What the config is for. Default: a training run (every required key must be there).
    pub purpose: Purpose,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            check_files: true,
            base_dir: None,
            purpose: Purpose::Train,
        }
    }
}

/// Where a loaded config came from.
#[derive(Debug)]
pub(crate) struct Origin {
    pub label: String,
    pub source: String,
    pub overrides: Vec<Override>,
    pub base_dir: Option<PathBuf>,
}

/// A problem before it is given a position.
#[derive(Debug, Clone)]
pub(crate) struct Issue {
    pub path: KeyPath,
    pub target: Target,
    pub what: String,
    pub detail: Option<String>,
}

impl Issue {
    pub fn key(path: KeyPath, what: impl Into<String>, detail: Option<String>) -> Issue {
        Issue {
            path,
            target: Target::Key,
            what: what.into(),
            detail,
        }
    }

    pub fn value(path: KeyPath, what: impl Into<String>, detail: impl Into<String>) -> Issue {
        Issue {
            path,
            target: Target::Value,
            what: what.into(),
            detail: Some(detail.into()),
        }
    }

    /// A warning that a key changes nothing ("`key` has no effect"): grouped with the other ignored keys into one
    /// warning line when the config is loaded.
    pub fn is_no_effect(&self) -> bool {
        self.what.ends_with("` has no effect")
    }

    /// "invalid `key`" at the value, with a reason.
    pub fn invalid(path: KeyPath, detail: impl Into<String>) -> Issue {
        let what = format!("invalid `{path}`");
        Issue::value(path, what, detail)
    }

    /// "missing required key `key`" (no position: it is not in the file).
    pub fn missing(path: KeyPath, detail: impl Into<String>) -> Issue {
        let what = format!("missing required key `{path}`");
        Issue {
            path,
            target: Target::Key,
            what,
            detail: Some(detail.into()),
        }
    }
}

/// Give issues their positions (or the `--set` argument they came from) and sort them in file order.
pub(crate) fn finalize(
    issues: Vec<Issue>,
    source: &str,
    overrides: &[Override],
) -> Vec<ConfigIssue> {
    let mut out: Vec<ConfigIssue> = issues
        .into_iter()
        .map(|i| {
            let mut from_override = overrides
                .iter()
                .rev()
                .find(|o| i.path.starts_with(&o.path))
                .map(|o| o.raw.clone());
            let pos = if from_override.is_some() || i.path.is_root() {
                None
            } else {
                locate(source, &i.path, i.target)
            };
            if pos.is_none() && from_override.is_none() && !i.path.is_root() {
                // e.g. a dataset entry appended by `--set datasets.1.path=…` that lacks `type`
                from_override = overrides
                    .iter()
                    .rev()
                    .find(|o| {
                        o.path.starts_with(&i.path)
                            || parent_of(&i.path).is_some_and(|p| o.path.starts_with(&p))
                    })
                    .map(|o| o.raw.clone());
            }
            ConfigIssue {
                key: i.path.to_string(),
                pos,
                from_override,
                what: i.what,
                detail: i.detail,
            }
        })
        .collect();
    out.sort_by_key(|i| (i.pos.is_none(), i.pos.unwrap_or(Pos { line: 0, column: 0 })));
    out
}

fn parent_of(p: &KeyPath) -> Option<KeyPath> {
    if p.0.len() >= 2 {
        Some(KeyPath(p.0[..p.0.len() - 1].to_vec()))
    } else {
        None
    }
}
