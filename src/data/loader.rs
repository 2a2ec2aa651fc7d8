//! Order, splits, packing and batches over a complete token cache.
//!
//! Everything here is a pure function of the cache contents and the options: the validation split is a seeded
//! permutation of the samples; epoch `e`'s order is a Fisher–Yates shuffle driven by ChaCha8 (seed, stream e);
//! packing is a first-fit over a window of open rows in that order; batches are consecutive rows. A position in
//! the stream is therefore just (epoch, batch index), and [`LoaderState`] restores it exactly.

use std::collections::VecDeque;
use std::sync::Arc;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::cache::TokenCache;
use super::options::DataOptions;
use crate::error::{Error, Result};
use crate::model::TokenBatch;

/// Label value ignored by the loss.
pub const IGNORE_INDEX: i64 = -100;
/// Open rows considered by the first-fit packer.
const PACK_WINDOW: usize = 64;
/// Rows sorted together by length when bucketing unpacked batches (in units of `micro_batch_size`).
const BUCKET_BATCHES: usize = 32;

/// RNG streams for the different uses of the seed.
const STREAM_SPLIT: u64 = u64::MAX;
const STREAM_WEIGHTS: u64 = u64::MAX - 1;
const STREAM_BUCKETS: u64 = u64::MAX - 2;

/// A seeded ChaCha8 stream (portable: the same numbers on every platform).
pub fn rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

/// A uniform integer in `0..n` (n > 0) without modulo bias (Lemire's method with rejection).
pub fn uniform_below(r: &mut ChaCha8Rng, n: u64) -> u64 {
    debug_assert!(n > 0);
    let threshold = n.wrapping_neg() % n;
    loop {
        let x = r.next_u64();
        let m = (x as u128) * (n as u128);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// In-place Fisher–Yates shuffle.
pub fn shuffle<T>(v: &mut [T], r: &mut ChaCha8Rng) {
    for i in (1..v.len()).rev() {
        let j = uniform_below(r, i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// One micro-batch: the model input, the labels, and counts for loss normalisation and logging.
#[derive(Debug, Clone)]
pub struct Batch {
    pub tokens: TokenBatch,
    /// `[batch·seq]`: the token id where it is trained, else -100 (padding, prompts, each sample's first token).
    pub labels: Vec<i64>,
    /// Label positions that are loss targets after the shift (= labels ≠ -100).
    pub trained_tokens: usize,
    /// Real (non-padding) tokens.
    pub real_tokens: usize,
    /// Samples in the batch.
    pub samples: usize,
    /// Epoch and index of this batch within it.
    pub epoch: u64,
    pub index: u64,
}

/// The position of a training loader: the next batch it yields. Serialise it with a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    pub next_batch: u64,
    /// Identifies the data and the order options; a restore with another fingerprint is refused.
    pub fingerprint: String,
}

/// Rows of an epoch: sample ids row by row, then batches of rows.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochPlan {
    pub epoch: u64,
    /// Sample ids, row after row.
    pub samples: Vec<u32>,
    /// Row `r` holds `samples[row_starts[r]..row_starts[r+1]]`.
    pub row_starts: Vec<usize>,
    pub micro_batch_size: usize,
}

impl EpochPlan {
    pub fn rows(&self) -> usize {
        self.row_starts.len().saturating_sub(1)
    }

    pub fn batches(&self) -> usize {
        self.rows().div_ceil(self.micro_batch_size)
    }

    /// The rows (as sample-id slices) of batch `b`.
    pub fn batch_rows(&self, b: usize) -> Vec<&[u32]> {
        let r0 = b * self.micro_batch_size;
        let r1 = ((b + 1) * self.micro_batch_size).min(self.rows());
        (r0..r1)
            .filter_map(|r| self.samples.get(self.row_starts[r]..self.row_starts[r + 1]))
            .collect()
    }
}

/// First-fit packing of samples (in `order`) into rows of at most `cap` tokens, considering the `window` most
/// recently opened rows that still have room. Rows are returned in the order they were opened.
pub fn pack_first_fit(
    order: &[u32],
    len_of: impl Fn(u32) -> usize,
    cap: usize,
    window: usize,
) -> Vec<Vec<u32>> {
    let mut rows: Vec<(usize, Vec<u32>)> = Vec::new();
    let mut open: VecDeque<usize> = VecDeque::new();
    for &s in order {
        let l = len_of(s).min(cap);
        let mut placed = false;
        for k in 0..open.len() {
            let r = open[k];
            if rows[r].0 + l <= cap {
                rows[r].0 += l;
                rows[r].1.push(s);
                if rows[r].0 == cap {
                    open.remove(k);
                }
                placed = true;
                break;
            }
        }
        if !placed {
            if open.len() >= window {
                open.pop_front();
            }
            rows.push((l, vec![s]));
            if l < cap {
                open.push_back(rows.len() - 1);
            }
        }
    }
    rows.into_iter().map(|(_, v)| v).collect()
}

/// The prepared data: caches, split, and the options that shape order and batches.
#[derive(Debug)]
pub struct Prepared {
    pub train_cache: Arc<TokenCache>,
    /// The cache eval samples come from (the train cache for a split, or the eval datasets' cache).
    pub eval_cache: Option<Arc<TokenCache>>,
    /// Training sample ids (ascending).
    pub train_ids: Vec<u32>,
    /// Eval sample ids in `eval_cache` (ascending).
    pub eval_ids: Vec<u32>,
    /// Weight of each training dataset entry.
    pub weights: Vec<f64>,
    pub options: DataOptions,
    pub pad_id: u32,
    pub fingerprint: String,
}

impl Prepared {
    /// Split the train cache (when `eval_cache` is None and a split is asked for) and fix the fingerprint.
    pub fn new(
        train_cache: Arc<TokenCache>,
        eval_cache: Option<Arc<TokenCache>>,
        weights: Vec<f64>,
        options: DataOptions,
        pad_id: u32,
    ) -> Result<Self> {
        let n = train_cache.len();
        let split = options.val_split_kind()?;
        let (train_ids, eval_ids, eval_cache) = match eval_cache {
            Some(ec) => {
                let ids = (0..ec.len() as u32).collect();
                ((0..n as u32).collect(), ids, Some(ec))
            }
            None => {
                let n_val = split.count(n);
                if n_val == 0 {
                    ((0..n as u32).collect(), Vec::new(), None)
                } else {
                    if n_val >= n {
                        return Err(Error::Data(format!(
                            "val_set_size {} takes {n_val} of the {n} samples, leaving none to train on; lower \
                             val_set_size (e.g. 0.05) or add data",
                            options.val_set_size
                        )));
                    }
                    let mut perm: Vec<u32> = (0..n as u32).collect();
                    shuffle(&mut perm, &mut rng(options.seed, STREAM_SPLIT));
                    let mut val = perm[..n_val].to_vec();
                    let mut train = perm[n_val..].to_vec();
                    val.sort_unstable();
                    train.sort_unstable();
                    (train, val, Some(train_cache.clone()))
                }
            }
        };
        if train_ids.is_empty() {
            let c = &train_cache.meta.counts;
            return Err(Error::Data(format!(
                "no training samples: {} records read, {} skipped as bad, {} longer than sequence_len {} dropped, \
                 {} left without labels; check the datasets (loratune data stats) or raise sequence_len",
                c.records,
                c.skipped.values().sum::<u64>(),
                c.dropped_too_long,
                options.sequence_len,
                c.dropped_no_labels
            )));
        }
        let fp = serde_json::json!({
            "train": train_cache.meta.content_digest,
            "eval": eval_cache.as_ref().map(|c| c.meta.content_digest.clone()),
            "seed": options.seed,
            "shuffle": options.shuffle,
            "packing": options.sample_packing,
            "micro_batch_size": options.micro_batch_size,
            "sequence_len": options.sequence_len,
            "val_set_size": options.val_set_size,
            "weights": weights,
        });
        Ok(Prepared {
            train_cache,
            eval_cache,
            train_ids,
            eval_ids,
            weights,
            fingerprint: super::cache::digest(&fp.to_string()),
            options,
            pad_id,
        })
    }

    /// The training samples of epoch `e`, in order (weights applied, shuffled).
    pub fn epoch_samples(&self, epoch: u64) -> Vec<u32> {
        let cache = &self.train_cache;
        let n_sources = self.weights.len().max(1);
        let mut by_source: Vec<Vec<u32>> = vec![Vec::new(); n_sources];
        for &s in &self.train_ids {
            let src = cache.sample_source(s as usize).min(n_sources - 1);
            by_source[src].push(s);
        }
        let mut list = Vec::with_capacity(self.train_ids.len());
        for (src, ids) in by_source.iter().enumerate() {
            let w = self.weights.get(src).copied().unwrap_or(1.0).max(0.0);
            let whole = w.floor() as usize;
            for _ in 0..whole {
                list.extend_from_slice(ids);
            }
            let frac = w - w.floor();
            if frac > 0.0 && !ids.is_empty() {
                let k = ((frac * ids.len() as f64).round() as usize).min(ids.len());
                let mut pick = ids.clone();
                let mut r = rng(
                    self.options.seed ^ epoch.wrapping_mul(0x9e37_79b9),
                    STREAM_WEIGHTS - src as u64,
                );
                shuffle(&mut pick, &mut r);
                let mut chosen = pick[..k].to_vec();
                chosen.sort_unstable();
                list.extend(chosen);
            }
        }
        if self.options.shuffle {
            shuffle(&mut list, &mut rng(self.options.seed, epoch));
        }
        list
    }

    /// Rows and batches of a list of samples (packing or length-bucketing as configured).
    fn plan(
        &self,
        cache: &TokenCache,
        order: Vec<u32>,
        epoch: u64,
        bucket: bool,
        mbs: usize,
    ) -> EpochPlan {
        let mbs = mbs.max(1);
        let len_of = |s: u32| cache.sample_len(s as usize);
        let mut samples = Vec::with_capacity(order.len());
        let mut row_starts = vec![0usize];
        if self.options.sample_packing {
            for row in pack_first_fit(&order, len_of, self.options.sequence_len, PACK_WINDOW) {
                samples.extend_from_slice(&row);
                row_starts.push(samples.len());
            }
        } else {
            let mut order = order;
            if bucket && mbs > 1 {
                // Sort windows of BUCKET_BATCHES batches by length, then shuffle the batches of each window.
                let mut r = rng(self.options.seed ^ epoch, STREAM_BUCKETS);
                let mut out = Vec::with_capacity(order.len());
                for win in order.chunks_mut(mbs * BUCKET_BATCHES) {
                    win.sort_by_key(|&s| len_of(s));
                    let mut batches: Vec<&[u32]> = win.chunks(mbs).collect();
                    shuffle(&mut batches, &mut r);
                    for b in batches {
                        out.extend_from_slice(b);
                    }
                }
                order = out;
            }
            for s in order {
                samples.push(s);
                row_starts.push(samples.len());
            }
        }
        EpochPlan {
            epoch,
            samples,
            row_starts,
            micro_batch_size: mbs,
        }
    }

    /// The plan of training epoch `e`.
    pub fn epoch_plan(&self, epoch: u64) -> EpochPlan {
        let order = self.epoch_samples(epoch);
        self.plan(
            &self.train_cache,
            order,
            epoch,
            self.options.shuffle,
            self.options.micro_batch_size,
        )
    }

    /// The plan of the evaluation samples (data order, no shuffle).
    pub fn eval_plan(&self) -> Option<EpochPlan> {
        let cache = self.eval_cache.as_ref()?;
        if self.eval_ids.is_empty() {
            return None;
        }
        let mbs = self
            .options
            .eval_batch_size
            .unwrap_or(self.options.micro_batch_size);
        Some(self.plan(cache, self.eval_ids.clone(), 0, false, mbs))
    }

    /// Assemble a batch from rows of sample ids.
    pub fn make_batch(
        &self,
        cache: &TokenCache,
        rows: &[&[u32]],
        epoch: u64,
        index: u64,
    ) -> Result<Batch> {
        let packed = self.options.sample_packing;
        let mut row_ids: Vec<Vec<u32>> = Vec::with_capacity(rows.len());
        let mut row_trained: Vec<Vec<bool>> = Vec::with_capacity(rows.len());
        let mut row_seg: Vec<Vec<(u32, u32)>> = Vec::with_capacity(rows.len()); // (segment, position)
        let mut samples = 0usize;
        for row in rows {
            let mut ids = Vec::new();
            let mut trained = Vec::new();
            let mut seg = Vec::new();
            for (k, &s) in row.iter().enumerate() {
                let before = ids.len();
                cache.read_sample(s as usize, &mut ids, &mut trained)?;
                // A sample's first token is never a label: with packing, the previous sample's last position
                // must not learn to predict the next sample's first token.
                if let Some(t) = trained.get_mut(before) {
                    *t = false;
                }
                for p in 0..(ids.len() - before) {
                    seg.push((k as u32 + 1, p as u32));
                }
                samples += 1;
            }
            row_ids.push(ids);
            row_trained.push(trained);
            row_seg.push(seg);
        }
        let batch = rows.len();
        let seq = row_ids.iter().map(Vec::len).max().unwrap_or(0);
        let mut input_ids = Vec::with_capacity(batch * seq);
        let mut position_ids = Vec::with_capacity(batch * seq);
        let mut attention_mask = Vec::with_capacity(batch * seq);
        let mut segment_ids = Vec::with_capacity(batch * seq);
        let mut labels = Vec::with_capacity(batch * seq);
        let mut trained_tokens = 0usize;
        let mut real_tokens = 0usize;
        for r in 0..batch {
            for i in 0..seq {
                match (row_ids[r].get(i), row_seg[r].get(i)) {
                    (Some(&id), Some(&(sg, pos))) => {
                        input_ids.push(id);
                        position_ids.push(pos);
                        attention_mask.push(true);
                        segment_ids.push(sg);
                        let t = row_trained[r].get(i).copied().unwrap_or(false);
                        labels.push(if t { id as i64 } else { IGNORE_INDEX });
                        trained_tokens += t as usize;
                        real_tokens += 1;
                    }
                    _ => {
                        input_ids.push(self.pad_id);
                        position_ids.push(0);
                        attention_mask.push(false);
                        segment_ids.push(0);
                        labels.push(IGNORE_INDEX);
                    }
                }
            }
        }
        Ok(Batch {
            tokens: TokenBatch {
                batch,
                seq,
                input_ids,
                position_ids,
                attention_mask,
                segment_ids: if packed { Some(segment_ids) } else { None },
            },
            labels,
            trained_tokens,
            real_tokens,
            samples,
            epoch,
            index,
        })
    }
}

/// An endless iterator over training batches, epoch after epoch, that can report and restore its position.
pub struct TrainLoader {
    prepared: Arc<Prepared>,
    epoch: u64,
    next_batch: u64,
    plan: Option<EpochPlan>,
}

impl TrainLoader {
    /// Start at `state` (None = epoch 0, batch 0). A state from other data or other order options is refused.
    pub fn new(prepared: Arc<Prepared>, state: Option<&LoaderState>) -> Result<Self> {
        let (epoch, next_batch) = match state {
            None => (0, 0),
            Some(s) => {
                if s.fingerprint != prepared.fingerprint {
                    return Err(Error::Data(format!(
                        "cannot resume the data stream: the checkpoint was written for other data or data options \
                         (fingerprint {} ≠ {}); the datasets, tokenizer, template, seed, sequence_len, packing, \
                         micro_batch_size, val_set_size or weights changed. Restore them, or start a fresh run",
                        s.fingerprint, prepared.fingerprint
                    )));
                }
                (s.epoch, s.next_batch)
            }
        };
        let mut l = TrainLoader {
            prepared,
            epoch,
            next_batch,
            plan: None,
        };
        let batches = l.plan().batches() as u64;
        if l.next_batch > batches {
            return Err(Error::Data(format!(
                "cannot resume the data stream: the checkpoint's position (epoch {epoch}, batch {next_batch}) is past \
                 the end of that epoch ({batches} batches); the checkpoint does not belong to this data"
            )));
        }
        Ok(l)
    }

    fn plan(&mut self) -> &EpochPlan {
        if self.plan.as_ref().map(|p| p.epoch) != Some(self.epoch) {
            self.plan = Some(self.prepared.epoch_plan(self.epoch));
        }
        self.plan
            .as_ref()
            .unwrap_or_else(|| unreachable!("plan was just computed"))
    }

    /// The position of the next batch.
    pub fn state(&self) -> LoaderState {
        LoaderState {
            epoch: self.epoch,
            next_batch: self.next_batch,
            fingerprint: self.prepared.fingerprint.clone(),
        }
    }

    /// Batches in the current epoch.
    pub fn batches_in_epoch(&mut self) -> usize {
        self.plan().batches()
    }
}

impl Iterator for TrainLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next_batch as usize >= self.plan().batches() {
            self.epoch += 1;
            self.next_batch = 0;
        }
        let (epoch, b) = (self.epoch, self.next_batch);
        let prepared = self.prepared.clone();
        let plan = self.plan();
        let rows = plan.batch_rows(b as usize);
        if rows.is_empty() {
            return Some(Err(Error::Data(
                "the training set yields no batches".into(),
            )));
        }
        let out = prepared.make_batch(&prepared.train_cache, &rows, epoch, b);
        self.next_batch += 1;
        Some(out)
    }
}
