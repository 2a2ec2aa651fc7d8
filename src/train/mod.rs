//! Training: loss, optimizer, schedules, the loop, checkpoints.

pub mod balance;
pub mod checkpoint;
pub mod loss;
pub mod optim;
pub mod page;
pub mod parallel;
pub mod recompute;
pub mod report;
pub mod run;
pub mod runs;
pub mod schedule;
pub mod step;
pub mod sweep;
pub mod tensorboard;
