//! The causal-LM loss, computed only where there is something to learn.
//!
//! Labels follow transformers: `labels[i]` is the token at position i or -100; position i predicts
//! `labels[i+1]`. Only rows with a real target go through `lm_head`, so masked prompt tokens and padding never
//! materialise vocabulary-sized logits.

use burn::tensor::{Int, Tensor, TensorData};

use crate::kernels::{Kernels, Targets};
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
pub fn lm_loss_sum<B: Kernels>(
    model: &CausalLm<B>,
    batch: &TokenBatch,
    labels: &[i64],
    drop: &mut dyn DropoutSource<B>,
) -> (Tensor<B, 1>, usize) {
    let targets = shift_labels(labels, batch.batch, batch.seq);
    let hidden = model.forward_hidden(batch, None, drop);
    loss_from_hidden(model, hidden, &targets, drop)
}

/// Cross-entropy sum from final hidden states `[n, h]` and per-row targets (IGNORE_INDEX skipped): `lm_head`
/// (and soft-capping) only on the rows that have a target.
pub fn loss_from_hidden<B: Kernels>(
    model: &CausalLm<B>,
    hidden: Tensor<B, 2>,
    targets: &[i64],
    drop: &mut dyn DropoutSource<B>,
) -> (Tensor<B, 1>, usize) {
    let (rows, tg): (Vec<usize>, Vec<usize>) = targets
        .iter()
        .enumerate()
        .filter(|(_, &t)| t >= 0)
        .map(|(i, &t)| (i, t as usize))
        .unzip();
    let n = rows.len();
    if n == 0 {
        return (hidden.sum().mul_scalar(0.0), 0);
    }
    if model.saved.lm_head.is_some() {
        return (saved_head_cross_entropy(model, hidden, &rows, &tg, drop), n);
    }
    let head = &model.model.lm_head;
    let mask = match (&head.lora, head.merged) {
        (Some(a), false) if a.dropout > 0.0 => {
            drop.mask(n, model.config.hidden_size, a.dropout, &model.device)
        }
        _ => None,
    };
    let t = Targets {
        rows: &rows,
        targets: &tg,
        softcap: model.config.final_logit_softcapping,
    };
    (B::lm_head_cross_entropy(hidden, &head.as_ref(mask), &t), n)
}

/// The cross-entropy sum through a fully trained `lm_head` copy (`lora_modules_to_save`): the model's logits of
/// the rows with a target (plain tensor operations, so that the copy gets its gradient: the fused loss kernels
/// differentiate only the hidden states and adapters).
fn saved_head_cross_entropy<B: Kernels>(
    model: &CausalLm<B>,
    hidden: Tensor<B, 2>,
    rows: &[usize],
    targets: &[usize],
    drop: &mut dyn DropoutSource<B>,
) -> Tensor<B, 1> {
    let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [rows.len()]), &hidden.device());
    crate::kernels::reference::nll_sum(model.logits(hidden.select(0, idx), drop), targets)
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
