//! The causal-LM loss, computed only where there is something to learn.
//!
//! Labels follow transformers: `labels[i]` is the token at position i or -100; position i predicts
//! `labels[i+1]`. Only rows with a real target go through `lm_head`, so masked prompt tokens and padding never
//! materialise vocabulary-sized logits.

use burn::tensor::{activation, backend::Backend, DType, Int, Tensor, TensorData};

use crate::model::decoder::DropoutSource;
use crate::model::{CausalLm, TokenBatch};

/// Label value that contributes no loss.
pub const IGNORE_INDEX: i64 = -100;

/// Next-token targets per position (`labels` shifted left by one within each row; the last position of each
/// row gets IGNORE_INDEX).
pub fn shift_labels(labels: &[i64], batch: usize, seq: usize) -> Vec<i64> {
    let mut t = vec![IGNORE_INDEX; batch * seq];
    for r in 0..batch {
        for i in 0..seq.saturating_sub(1) {
            t[r * seq + i] = labels[r * seq + i + 1];
        }
    }
    t
}

/// Sum of token cross-entropies over positions whose shifted target is not ignored, and their count.
/// With packing, the position before a sample boundary must already carry IGNORE_INDEX in `labels[i+1]`
/// (the data pipeline guarantees it: every sample's first label is masked).
pub fn lm_loss_sum<B: Backend>(
    model: &CausalLm<B>,
    batch: &TokenBatch,
    labels: &[i64],
    drop: &mut dyn DropoutSource<B>,
) -> (Tensor<B, 1>, usize) {
    let targets = shift_labels(labels, batch.batch, batch.seq);
    let hidden = model.forward_hidden(batch, None, drop);
    loss_from_hidden(model, hidden, &targets, drop)
}

/// Cross-entropy sum from final hidden states `[n, h]` and per-row targets (IGNORE_INDEX skipped).
pub fn loss_from_hidden<B: Backend>(
    model: &CausalLm<B>,
    hidden: Tensor<B, 2>,
    targets: &[i64],
    drop: &mut dyn DropoutSource<B>,
) -> (Tensor<B, 1>, usize) {
    let rows: Vec<i32> = targets
        .iter()
        .enumerate()
        .filter(|(_, &t)| t >= 0)
        .map(|(i, _)| i as i32)
        .collect();
    let n = rows.len();
    if n == 0 {
        return (hidden.sum().mul_scalar(0.0), 0);
    }
    let lm = &model.lm_head;
    if lm.lora.is_none() && lm.bias.is_none() && model.config.final_logit_softcapping.is_none() {
        let sel: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
        let tg: Vec<usize> = targets
            .iter()
            .filter(|&&t| t >= 0)
            .map(|&t| t as usize)
            .collect();
        match crate::fast::xent::lm_xent(hidden, &lm.weight, &sel, &tg) {
            Ok(loss) => return (loss, n),
            Err(h) => return loss_plain(model, h, rows, targets, drop),
        }
    }
    loss_plain(model, hidden, rows, targets, drop)
}

/// The reference: gather the trained rows, lm_head, log-softmax, pick the targets.
fn loss_plain<B: Backend>(
    model: &CausalLm<B>,
    hidden: Tensor<B, 2>,
    rows: Vec<i32>,
    targets: &[i64],
    drop: &mut dyn DropoutSource<B>,
) -> (Tensor<B, 1>, usize) {
    let device = model.device.clone();
    let n = rows.len();
    let tg: Vec<i32> = targets
        .iter()
        .filter(|&&t| t >= 0)
        .map(|&t| t as i32)
        .collect();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n]), &device);
    let h = hidden.select(0, idx);
    let logits = model.logits(h, drop);
    let logits = if logits.dtype() != DType::F32 {
        logits.cast(DType::F32)
    } else {
        logits
    };
    let logp = activation::log_softmax(logits, 1);
    let tgt = Tensor::<B, 2, Int>::from_data(TensorData::new(tg, [n, 1]), &device);
    let picked = logp.gather(1, tgt);
    (picked.sum().neg(), n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_masks_last_position_of_each_row() {
        let l = vec![5, 6, 7, -100, 8, 9];
        assert_eq!(shift_labels(&l, 2, 3), vec![6, 7, -100, 8, 9, -100]);
    }
}
