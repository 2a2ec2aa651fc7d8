//! Training: loss, optimizer, schedules, the loop, checkpoints.

pub mod loss;
pub mod optim;
