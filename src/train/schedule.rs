//! Learning-rate schedules with transformers' semantics: `lr(step) = base · λ(step)` for the 0-based optimizer
//! step, linear warmup `λ = step / warmup` first (so the very first update uses lr 0 when warming up, as in
//! transformers), then constant, linear decay to 0, or half-cosine decay to `min_ratio · base`.

use std::f64::consts::PI;

use crate::names::named_enum;

named_enum! {
    /// Shape of the schedule after warmup (`lr_scheduler`; transformers' `get_scheduler` semantics).
    pub enum ScheduleKind ("learning-rate scheduler") {
        /// Constant after warmup (`constant_with_warmup` is the same thing here: warmup applies to every schedule).
        Constant = "constant" | "constant_with_warmup",
        /// Linear decay to 0 at the last step.
        Linear = "linear",
        /// Half-cosine decay to `cosine_min_lr_ratio × learning_rate` at the last step.
        Cosine = "cosine",
    }
    reject {}
}

/// A learning-rate schedule over `total` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup: u64,
    pub total: u64,
    /// Cosine floor as a fraction of base_lr (Axolotl's `cosine_min_lr_ratio`); 0 = transformers' cosine.
    pub min_ratio: f64,
    /// Warm up as `(step / warmup)²` (Axolotl's `lr_quadratic_warmup`) instead of linearly.
    pub quadratic_warmup: bool,
}

impl Schedule {
    /// Learning rate for 0-based optimizer step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            let ramp = step as f64 / self.warmup.max(1) as f64;
            return self.base_lr
                * if self.quadratic_warmup {
                    ramp * ramp
                } else {
                    ramp
                };
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let lambda = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => (self.total.saturating_sub(step) as f64 / span).max(0.0),
            ScheduleKind::Cosine => {
                let c = 0.5 * (1.0 + (PI * progress).cos());
                self.min_ratio + (1.0 - self.min_ratio) * c
            }
        };
        self.base_lr * lambda
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn warmup_then_linear_matches_transformers() {
        // transformers get_linear_schedule_with_warmup(opt, 2, 10) with lr 1.0:
        // [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
        let s = Schedule {
            kind: ScheduleKind::Linear,
            base_lr: 1.0,
            warmup: 2,
            total: 10,
            min_ratio: 0.0,
            quadratic_warmup: false,
        };
        let want = [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125];
        for (i, w) in want.iter().enumerate() {
            close(s.lr(i as u64), *w);
        }
    }

    #[test]
    fn cosine_with_floor() {
        let s = Schedule {
            kind: ScheduleKind::Cosine,
            base_lr: 2.0,
            warmup: 0,
            total: 4,
            min_ratio: 0.1,
            quadratic_warmup: false,
        };
        // progress 0, .25, .5, .75 → 0.5(1+cos(πp)) = 1, 0.8536, 0.5, 0.1464
        close(s.lr(0), 2.0);
        close(s.lr(2), 2.0 * (0.1 + 0.9 * 0.5));
        close(s.lr(1), 2.0 * (0.1 + 0.9 * 0.5 * (1.0 + (PI / 4.0).cos())));
        let c = Schedule {
            kind: ScheduleKind::Constant,
            base_lr: 3.0,
            warmup: 3,
            total: 10,
            min_ratio: 0.0,
            quadratic_warmup: false,
        };
        close(c.lr(1), 1.0);
        close(c.lr(9), 3.0);
    }

    /// Axolotl's `get_cosine_schedule_with_quadratic_warmup(opt, 4, 10)` at lr 1, by hand: `(s/4)²` for s < 4, then
    /// `0.5·(1 + cos(π·(s−4)/6))`.
    #[test]
    fn quadratic_warmup() {
        let s = Schedule {
            kind: ScheduleKind::Cosine,
            base_lr: 1.0,
            warmup: 4,
            total: 10,
            min_ratio: 0.0,
            quadratic_warmup: true,
        };
        for (step, want) in [(0, 0.0), (1, 0.0625), (2, 0.25), (3, 0.5625), (4, 1.0)] {
            close(s.lr(step), want);
        }
        close(s.lr(5), 0.5 * (1.0 + (PI / 6.0).cos()));
    }
}
