//! Text generation with a KV cache: greedy (temperature 0) or temperature + nucleus (top-p) sampling,
//! seeded, stopping at any end-of-sequence / end-of-turn id.

pub mod score;

use burn::tensor::{Int, Tensor, TensorData};

use crate::kernels::Kernels;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::{CausalLm, KvCache, NoDropout, TokenBatch};

/// Sampling settings.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling mass (1 = off).
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops after producing any of these ids (the id is kept in the output).
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_ids: Vec::new(),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop id was produced.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The context window is full.
    Context,
}

/// Argmax with torch's tie rule (first maximum).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Sample from logits with temperature and top-p (transformers' order: temperature, then top-p).
pub fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut ChaCha8Rng) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let scaled: Vec<f64> = logits.iter().map(|&x| x as f64 / temperature).collect();
    let m = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<(usize, f64)> = scaled
        .iter()
        .enumerate()
        .map(|(i, &x)| (i, (x - m).exp()))
        .collect();
    let z: f64 = probs.iter().map(|p| p.1).sum();
    for p in probs.iter_mut() {
        p.1 /= z;
    }
    probs.sort_by(|a, b| {
        b.1.partial_cmp(&a.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    });
    if top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (k, p) in probs.iter().enumerate() {
            cum += p.1;
            if cum >= top_p {
                keep = k + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
    }
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * total;
    for (i, p) in &probs {
        if u < *p {
            return *i as u32;
        }
        u -= p;
    }
    probs.last().map(|p| p.0 as u32).unwrap_or(0)
}

/// Logits of the last position of a forward over `ids` continuing `cache`.
fn step_logits<B: Kernels>(
    model: &CausalLm<B>,
    ids: &[u32],
    cache: &mut KvCache<B>,
) -> Result<Vec<f32>> {
    let offset = cache.len() as u32;
    let n = ids.len();
    let batch = TokenBatch {
        batch: 1,
        seq: n,
        input_ids: ids.to_vec(),
        position_ids: (offset..offset + n as u32).collect(),
        attention_mask: vec![true; n],
        segment_ids: None,
    };
    Ok(last_logits(model, &batch, cache)?.remove(0))
}

/// Logits `[vocab]` of each batch row's last position after a forward over `batch` continuing `cache`.
fn last_logits<B: Kernels>(
    model: &CausalLm<B>,
    batch: &TokenBatch,
    cache: &mut KvCache<B>,
) -> Result<Vec<Vec<f32>>> {
    let hidden = model.forward_hidden(batch, Some(cache), &mut NoDropout);
    let idx: Vec<i32> = (0..batch.batch)
        .map(|r| (r * batch.seq + batch.seq - 1) as i32)
        .collect();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [batch.batch]), &model.device);
    let last = hidden.select(0, idx);
    let v = crate::model::weights::host_f32(model.logits(last, &mut NoDropout))?;
    let vocab = v.len() / batch.batch.max(1);
    Ok(v.chunks(vocab.max(1)).map(<[f32]>::to_vec).collect())
}

/// Greedy generation for several prompts in one batch: prompts left-padded to the longest (padding masked, each row
/// with its own positions), then one token per row and step. Each row's output is what [`generate`] gives that
/// prompt alone at temperature 0 (up to float summation order; tested). Finished rows ride along masked.
pub fn generate_greedy_batch<B: Kernels>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    stop_ids: &[u32],
) -> Result<Vec<(Vec<u32>, StopReason)>> {
    let vocab = model.config.vocab_size as u32;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::Config(format!(
                "prompt {i} is empty: nothing to continue from"
            )));
        }
        if let Some(bad) = p.iter().find(|&&t| t >= vocab) {
            return Err(Error::Tokenizer(format!(
                "prompt {i}: token id {bad} is outside the model's vocabulary ({vocab})"
            )));
        }
    }
    let n = prompts.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let max_ctx = model.config.max_position_embeddings;
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut batch = TokenBatch {
        batch: n,
        seq: width,
        input_ids: Vec::with_capacity(n * width),
        position_ids: Vec::with_capacity(n * width),
        attention_mask: Vec::with_capacity(n * width),
        segment_ids: None,
    };
    for p in prompts {
        let pad = width - p.len();
        batch
            .input_ids
            .extend(std::iter::repeat_n(0, pad).chain(p.iter().copied()));
        batch
            .position_ids
            .extend(std::iter::repeat_n(0, pad).chain(0..p.len() as u32));
        batch
            .attention_mask
            .extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())));
    }
    let mut cache = KvCache::new(model.config.num_hidden_layers, n);
    let mut out: Vec<(Vec<u32>, Option<StopReason>)> = vec![(Vec::new(), None); n];
    let mut logits = last_logits(model, &batch, &mut cache)?;
    for _ in 0..max_new_tokens {
        let mut next = TokenBatch {
            batch: n,
            seq: 1,
            input_ids: vec![0; n],
            position_ids: vec![0; n],
            attention_mask: vec![false; n],
            segment_ids: None,
        };
        for (r, (ids, done)) in out.iter_mut().enumerate() {
            if done.is_some() {
                continue;
            }
            let id = argmax(&logits[r]);
            ids.push(id);
            let len = prompts[r].len() + ids.len();
            if stop_ids.contains(&id) {
                *done = Some(StopReason::Stop);
            } else if len >= max_ctx {
                *done = Some(StopReason::Context);
            } else {
                next.input_ids[r] = id;
                next.position_ids[r] = (len - 1) as u32;
                next.attention_mask[r] = true;
            }
        }
        if out.iter().all(|(_, d)| d.is_some()) {
            break;
        }
        logits = last_logits(model, &next, &mut cache)?;
    }
    Ok(out
        .into_iter()
        .map(|(ids, d)| (ids, d.unwrap_or(StopReason::Length)))
        .collect())
}

/// The prompt as the model reads it: the text (rendered with the chat template as a user message, after an optional
/// system message, with the generation prompt, when `chat`) and its token ids.
pub fn encode_prompt(
    tok: &crate::tokenizer::LoadedTokenizer,
    prompt: &str,
    system: Option<&str>,
    chat: bool,
) -> Result<(String, Vec<u32>)> {
    if !chat {
        return Ok((prompt.to_string(), tok.encode(prompt, tok.add_bos)?));
    }
    let template = tok.chat_template()?;
    let mut msgs = Vec::new();
    if let Some(s) = system {
        msgs.push(crate::tokenizer::Message::new("system", s.to_string()));
    }
    msgs.push(crate::tokenizer::Message::new("user", prompt.to_string()));
    let text = template.render(&msgs, true)?;
    let ids = tok.encode_templated(&text)?;
    Ok((text, ids))
}

/// Generate after `prompt_ids`. `on_token` sees each new id as it is produced (for streaming).
pub fn generate<B: Kernels>(
    model: &CausalLm<B>,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(u32),
) -> Result<(Vec<u32>, StopReason)> {
    if prompt_ids.is_empty() {
        return Err(Error::Config(
            "the prompt is empty: nothing to continue from".into(),
        ));
    }
    let vocab = model.config.vocab_size as u32;
    if let Some(bad) = prompt_ids.iter().find(|&&i| i >= vocab) {
        return Err(Error::Tokenizer(format!(
            "prompt token id {bad} is outside the model's vocabulary ({vocab})"
        )));
    }
    let max_ctx = model.config.max_position_embeddings;
    let mut cache = KvCache::new(model.config.num_hidden_layers, 1);
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut out = Vec::new();
    let mut logits = step_logits(model, prompt_ids, &mut cache)?;
    for _ in 0..opts.max_new_tokens {
        let id = sample(&logits, opts.temperature, opts.top_p, &mut rng);
        out.push(id);
        on_token(id);
        if opts.stop_ids.contains(&id) {
            return Ok((out, StopReason::Stop));
        }
        if cache.len() + 1 >= max_ctx {
            return Ok((out, StopReason::Context));
        }
        logits = step_logits(model, &[id], &mut cache)?;
    }
    Ok((out, StopReason::Length))
}

/// Incremental detokenisation for streaming: prints only complete UTF-8 text.
pub struct StreamDecoder {
    ids: Vec<u32>,
    printed: usize,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder {
            ids: Vec::new(),
            printed: 0,
        }
    }

    /// Add an id; returns the newly completed text, if any.
    pub fn push(&mut self, id: u32, tok: &crate::tokenizer::LoadedTokenizer) -> Option<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true).ok()?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= self.printed
            || !text.is_char_boundary(self.printed)
        {
            return None;
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Some(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        // p ≈ [0.665, 0.245, 0.090]: top_p 0.6 keeps only the first token.
        for _ in 0..50 {
            assert_eq!(sample(&[2.0, 1.0, 0.0], 1.0, 0.6, &mut rng), 0);
        }
        // Without top-p, all three appear; the frequencies follow the softmax.
        let mut counts = [0usize; 3];
        for _ in 0..20000 {
            counts[sample(&[2.0, 1.0, 0.0], 1.0, 1.0, &mut rng) as usize] += 1;
        }
        let f0 = counts[0] as f64 / 20000.0;
        assert!((f0 - 0.665).abs() < 0.02, "{counts:?}");
        assert!(counts[2] > 1000, "{counts:?}");
    }

    #[test]
    fn same_seed_same_samples() {
        let l = [0.5f32, 0.4, 0.3, 0.2, 0.1];
        let a: Vec<u32> = {
            let mut r = ChaCha8Rng::seed_from_u64(7);
            (0..20).map(|_| sample(&l, 0.8, 0.9, &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = ChaCha8Rng::seed_from_u64(7);
            (0..20).map(|_| sample(&l, 0.8, 0.9, &mut r)).collect()
        };
        assert_eq!(a, b);
    }
}
