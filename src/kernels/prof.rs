//! Wall-clock accounting of the fused kernels (for `loratune bench --profile`): time and FLOPs per kernel and
//! direction. Off unless [`set_enabled`] turned it on; then each kernel adds its elapsed time on exit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// What a timed region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cat {
    NormFwd,
    NormBwd,
    ActFwd,
    ActBwd,
    /// x·Wᵀ of the frozen weights (+ bias).
    LinearFwd,
    /// dy·W.
    LinearBwd,
    /// The adapter's GEMMs and dropout in the forward.
    LoraFwd,
    /// The adapter's GEMMs in the backward (u, dA, dB, u·A).
    LoraBwd,
    AttnFwd,
    AttnBwd,
    XentFwd,
    XentBwd,
}

pub const ALL: [Cat; 12] = [
    Cat::NormFwd,
    Cat::NormBwd,
    Cat::ActFwd,
    Cat::ActBwd,
    Cat::LinearFwd,
    Cat::LinearBwd,
    Cat::LoraFwd,
    Cat::LoraBwd,
    Cat::AttnFwd,
    Cat::AttnBwd,
    Cat::XentFwd,
    Cat::XentBwd,
];

impl Cat {
    pub fn name(self) -> &'static str {
        match self {
            Cat::NormFwd => "rmsnorm fwd",
            Cat::NormBwd => "rmsnorm bwd",
            Cat::ActFwd => "silu·up fwd",
            Cat::ActBwd => "silu·up bwd",
            Cat::LinearFwd => "frozen linear fwd (x·Wᵀ)",
            Cat::LinearBwd => "frozen linear bwd (dy·W)",
            Cat::LoraFwd => "LoRA A/B fwd",
            Cat::LoraBwd => "LoRA A/B bwd (u, dA, dB, u·A)",
            Cat::AttnFwd => "attention+RoPE fwd",
            Cat::AttnBwd => "attention+RoPE bwd",
            Cat::XentFwd => "lm_head+xent fwd (incl. dh)",
            Cat::XentBwd => "lm_head+xent bwd (scale)",
        }
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 12] = [const { AtomicU64::new(0) }; 12];
static FLOPS: [AtomicU64; 12] = [const { AtomicU64::new(0) }; 12];
static CALLS: [AtomicU64; 12] = [const { AtomicU64::new(0) }; 12];

pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Zero every counter.
pub fn reset() {
    for i in 0..ALL.len() {
        NANOS[i].store(0, Ordering::Relaxed);
        FLOPS[i].store(0, Ordering::Relaxed);
        CALLS[i].store(0, Ordering::Relaxed);
    }
}

/// (category, seconds, GEMM FLOPs, calls) since the last reset.
pub fn snapshot() -> Vec<(Cat, f64, f64, u64)> {
    ALL.iter()
        .enumerate()
        .map(|(i, &c)| {
            (
                c,
                NANOS[i].load(Ordering::Relaxed) as f64 * 1e-9,
                FLOPS[i].load(Ordering::Relaxed) as f64,
                CALLS[i].load(Ordering::Relaxed),
            )
        })
        .collect()
}

/// A running timer; adds to its category when dropped.
pub struct Timer {
    cat: usize,
    t0: Instant,
    flops: u64,
}

impl Drop for Timer {
    fn drop(&mut self) {
        NANOS[self.cat].fetch_add(self.t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        FLOPS[self.cat].fetch_add(self.flops, Ordering::Relaxed);
        CALLS[self.cat].fetch_add(1, Ordering::Relaxed);
    }
}

/// Start timing `cat` (None when profiling is off). `flops`: the GEMM work of the region.
pub fn time(cat: Cat, flops: f64) -> Option<Timer> {
    ON.load(Ordering::Relaxed).then(|| Timer {
        cat: ALL.iter().position(|&c| c == cat).unwrap_or(0),
        t0: Instant::now(),
        flops: flops as u64,
    })
}

/// A device-memory probe armed on this thread by [`peak_memory`]: how to read the bytes in use, and the greatest
/// reading so far.
struct MemoryProbe {
    read: Box<dyn Fn() -> u64>,
    peak: u64,
}

thread_local! {
    static MEMORY: std::cell::RefCell<Option<MemoryProbe>> = const { std::cell::RefCell::new(None) };
}

/// Read the device's bytes in use into the armed probe, if any (otherwise nothing happens). The attention
/// kernels call it after each allocation of their own and after each step of a block, while that block's
/// temporaries are alive — so the greatest reading is the allocator's peak over the kernel.
pub(crate) fn sample_memory() {
    MEMORY.with(|m| {
        if let Some(p) = m.borrow_mut().as_mut() {
            let now = (p.read)();
            p.peak = p.peak.max(now);
        }
    });
}

/// `t`, after a [`sample_memory`] reading taken while it is alive.
pub(crate) fn live<T>(t: T) -> T {
    sample_memory();
    t
}

/// Run `f` with `read` (the device's bytes in use, e.g. from its client) sampled before, after, and at every
/// [`sample_memory`] point `f` reaches on this thread; `f`'s result and how far the greatest reading rose above
/// the first (the peak of what `f` allocated).
pub fn peak_memory<R>(read: impl Fn() -> u64 + 'static, f: impl FnOnce() -> R) -> (R, u64) {
    let before = read();
    let prev = MEMORY.with(|m| {
        m.borrow_mut().replace(MemoryProbe {
            read: Box::new(read),
            peak: before,
        })
    });
    let r = f();
    sample_memory();
    let probe = MEMORY.with(|m| std::mem::replace(&mut *m.borrow_mut(), prev));
    (r, probe.map_or(0, |p| p.peak - before))
}
