//! Task metrics on generated answers (`eval_generate`): how a held-out question's answer compares with what it should
//! say. Every metric gives a score in [0, 1] per sample; a run reports their means.
//!
//! - `exact`: the answer equals one of the references after SQuAD's normalisation (lower case, punctuation and the
//!   articles a/an/the removed, whitespace collapsed) — SQuAD's exact match.
//! - `contains`: the share of the references (expected facts) that occur in the answer, both lower-cased with
//!   whitespace collapsed (1 when every fact is there).
//! - `regex`: the share of the references, read as regular expressions, that match the answer.
//! - `f1`: SQuAD's token F1 (bag of normalised tokens, precision/recall against each reference), the best over the
//!   references.

use std::collections::HashMap;

/// One task metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Exact,
    Contains,
    Regex,
    F1,
}

impl Metric {
    pub const ALL: [Metric; 4] = [Metric::Exact, Metric::Contains, Metric::Regex, Metric::F1];

    /// The name a config and a report use.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Exact => "exact",
            Metric::Contains => "contains",
            Metric::Regex => "regex",
            Metric::F1 => "f1",
        }
    }

    /// Its TensorBoard tag.
    pub fn tensorboard_tag(self) -> &'static str {
        match self {
            Metric::Exact => "eval/task_exact",
            Metric::Contains => "eval/task_contains",
            Metric::Regex => "eval/task_regex",
            Metric::F1 => "eval/task_f1",
        }
    }

    /// Score `answer` against `references` (at least one). A `regex` reference that does not compile is an error
    /// naming it.
    pub fn score(self, answer: &str, references: &[String]) -> Result<f64, String> {
        if references.is_empty() {
            return Err("no reference answer to score against".into());
        }
        Ok(match self {
            Metric::Exact => {
                let a = normalize_answer(answer);
                f64::from(u8::from(
                    references.iter().any(|r| normalize_answer(r) == a),
                ))
            }
            Metric::Contains => {
                let a = collapse(answer);
                share(references, |r| a.contains(&collapse(r)))
            }
            Metric::Regex => {
                let mut found = 0usize;
                for r in references {
                    let re = regex::Regex::new(r)
                        .map_err(|e| format!("regex `{r}` does not compile: {e}"))?;
                    found += usize::from(re.is_match(answer));
                }
                found as f64 / references.len() as f64
            }
            Metric::F1 => references
                .iter()
                .map(|r| token_f1(answer, r))
                .fold(0.0, f64::max),
        })
    }
}

fn share(references: &[String], hit: impl Fn(&str) -> bool) -> f64 {
    references.iter().filter(|r| hit(r)).count() as f64 / references.len() as f64
}

/// Lower case, whitespace runs as one space, trimmed.
fn collapse(s: &str) -> String {
    s.to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// SQuAD's `normalize_answer`: lower case, ASCII punctuation removed, the articles a/an/the removed, whitespace
/// collapsed.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// SQuAD's token F1 between a prediction and one reference (both normalised; 0 when either is empty and they
/// differ, 1 when both are empty).
pub fn token_f1(prediction: &str, reference: &str) -> f64 {
    let p = normalize_answer(prediction);
    let r = normalize_answer(reference);
    let (pt, rt): (Vec<&str>, Vec<&str>) = (
        p.split_whitespace().collect(),
        r.split_whitespace().collect(),
    );
    if pt.is_empty() || rt.is_empty() {
        return f64::from(u8::from(pt == rt));
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &rt {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0i64;
    for t in &pt {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pt.len() as f64;
    let recall = same as f64 / rt.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// One held-out question: the prompt and what its answer should say.
#[derive(Debug, Clone, PartialEq)]
pub struct Heldout {
    pub prompt: String,
    pub references: Vec<String>,
}

/// Read held-out questions from a JSONL file: `prompt_field` a string, `answer_field` a string or a list of strings
/// (the shipped `datasets/nimbrel/heldout.jsonl`: `question` / `expected_facts`). Errors name the file and line.
pub fn read_heldout(
    path: &std::path::Path,
    prompt_field: &str,
    answer_field: &str,
) -> crate::error::Result<Vec<Heldout>> {
    use serde_json::Value;
    let text = crate::error::read_to_string(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let bad = |m: String| crate::error::Error::Data(format!("{}: {m}", at()));
        let v: Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let prompt = v.get(prompt_field).and_then(Value::as_str).ok_or_else(|| {
            bad(format!(
                "no string field `{prompt_field}` (the question; --prompt-field names it)"
            ))
        })?;
        let references: Vec<String> = match v.get(answer_field) {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => {
                a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()
            }
            _ => {
                return Err(bad(format!(
                    "field `{answer_field}` must be a string or a non-empty list of strings (the expected answer or \
                     facts; --answer-field names it)"
                )))
            }
        };
        out.push(Heldout {
            prompt: prompt.to_string(),
            references,
        });
    }
    if out.is_empty() {
        return Err(crate::error::Error::Data(format!(
            "{}: no questions",
            path.display()
        )));
    }
    Ok(out)
}

/// One question's result.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampleResult {
    pub prompt: String,
    pub answer: String,
    pub references: Vec<String>,
    /// Metric name → score in [0, 1].
    pub scores: std::collections::BTreeMap<String, f64>,
}

/// A task evaluation: every question's result and each metric's mean.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TaskReport {
    pub samples: Vec<SampleResult>,
    pub means: std::collections::BTreeMap<String, f64>,
}

/// How questions are asked.
#[derive(Debug, Clone)]
pub struct TaskOptions {
    pub metrics: Vec<Metric>,
    pub max_new_tokens: usize,
    /// Questions per generation batch.
    pub batch_size: usize,
    /// A system message before each question (chat models).
    pub system: Option<String>,
}

/// Ask every question greedily (through the chat template when the tokenizer has one), in batches, and score the
/// answers.
pub fn evaluate_task<B: crate::kernels::Kernels>(
    model: &crate::model::CausalLm<B>,
    tok: &crate::tokenizer::LoadedTokenizer,
    items: &[Heldout],
    opts: &TaskOptions,
) -> crate::error::Result<TaskReport> {
    let chat = tok.chat_template().is_ok();
    let prompts = items
        .iter()
        .map(|h| {
            super::encode_prompt(tok, &h.prompt, opts.system.as_deref(), chat).map(|(_, ids)| ids)
        })
        .collect::<crate::error::Result<Vec<_>>>()?;
    let stop = tok.generation_stop_ids();
    let mut answers = Vec::with_capacity(items.len());
    for chunk in prompts.chunks(opts.batch_size.max(1)) {
        for (ids, _) in super::generate_greedy_batch(model, chunk, opts.max_new_tokens, &stop)? {
            answers.push(tok.decode(&ids, true)?.trim().to_string());
        }
    }
    let mut samples = Vec::with_capacity(items.len());
    let mut sums: std::collections::BTreeMap<String, f64> = std::collections::BTreeMap::new();
    for (h, answer) in items.iter().zip(answers) {
        let mut scores = std::collections::BTreeMap::new();
        for m in &opts.metrics {
            let s = m
                .score(&answer, &h.references)
                .map_err(|e| crate::error::Error::Data(format!("question `{}`: {e}", h.prompt)))?;
            *sums.entry(m.name().to_string()).or_default() += s;
            scores.insert(m.name().to_string(), s);
        }
        samples.push(SampleResult {
            prompt: h.prompt.clone(),
            answer,
            references: h.references.clone(),
            scores,
        });
    }
    let n = samples.len().max(1) as f64;
    let means = sums.into_iter().map(|(k, v)| (k, v / n)).collect();
    Ok(TaskReport { samples, means })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn squad_normalisation_and_exact_match() {
        assert_eq!(normalize_answer("The  Eiffel Tower!"), "eiffel tower");
        assert_eq!(normalize_answer("an apple, a pear"), "apple pear");
        let s = |a: &str, r: &[&str]| Metric::Exact.score(a, &refs(r)).unwrap();
        assert_eq!(s("the 45 days.", &["45 days"]), 1.0);
        assert_eq!(s("45 days or so", &["45 days"]), 0.0);
        assert_eq!(s("Paris", &["London", "paris"]), 1.0);
    }

    #[test]
    fn token_f1_is_squads() {
        // prediction "45 days of delivery" vs "within 45 days": common {45, days} = 2; P = 2/4, R = 2/3,
        // F1 = 2·(1/2)·(2/3)/(1/2 + 2/3) = 4/7.
        let f = token_f1("45 days of delivery", "within 45 days");
        assert!((f - 4.0 / 7.0).abs() < 1e-12, "{f}");
        // Each occurrence counts once: "the cat cat" → [cat, cat] vs [cat]: P = 1/2, R = 1, F1 = 2/3.
        assert_eq!(token_f1("the cat cat", "cat"), 2.0 * 0.5 / 1.5);
        assert_eq!(token_f1("", ""), 1.0);
        assert_eq!(token_f1("x", ""), 0.0);
        assert_eq!(token_f1("dog", "cat"), 0.0);
        // The best reference wins.
        let m = Metric::F1
            .score("45 days", &refs(&["30 days", "45 days"]))
            .unwrap();
        assert_eq!(m, 1.0);
    }

    #[test]
    fn heldout_files_are_read_with_line_numbered_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("h.jsonl");
        std::fs::write(&p, "{\"question\": \"q1\", \"expected_facts\": [\"a\", \"b\"]}\n\n{\"question\": \"q2\", \"expected_facts\": \"c\"}\n").unwrap();
        let h = read_heldout(&p, "question", "expected_facts").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].references, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(h[1].references, vec!["c".to_string()]);
        std::fs::write(
            &p,
            "{\"question\": \"q1\", \"expected_facts\": [\"a\"]}\n{\"q\": 1}\n",
        )
        .unwrap();
        let e = read_heldout(&p, "question", "expected_facts")
            .unwrap_err()
            .to_string();
        assert!(e.contains("h.jsonl:2") && e.contains("`question`"), "{e}");
        // The shipped file reads.
        let shipped =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/nimbrel/heldout.jsonl");
        assert!(
            read_heldout(&shipped, "question", "expected_facts")
                .unwrap()
                .len()
                >= 5
        );
    }

    #[test]
    fn contains_and_regex_give_the_share_of_facts_found() {
        let c = |a: &str, r: &[&str]| Metric::Contains.score(a, &refs(r)).unwrap();
        assert_eq!(
            c(
                "Live chat is open 9 am to 2 pm on Saturdays.",
                &["9 am", "2 pm"]
            ),
            1.0
        );
        assert_eq!(c("Live chat opens at 9  AM.", &["9 am", "2 pm"]), 0.5);
        assert_eq!(c("no idea", &["45 days"]), 0.0);
        let r = |a: &str, p: &[&str]| Metric::Regex.score(a, &refs(p)).unwrap();
        assert_eq!(
            r("It costs $4.50 a month", &[r"\$4\.50", r"(?i)month"]),
            1.0
        );
        assert_eq!(r("It costs $4.5", &[r"\$4\.50\b", r"\$4\.5\b"]), 0.5);
        let err = Metric::Regex.score("x", &refs(&["(unclosed"])).unwrap_err();
        assert!(err.contains("(unclosed"), "{err}");
        assert!(Metric::Exact.score("x", &[]).is_err());
    }
}
