//! `clipstream plan` and `clipstream snapshot`: the two ends of a nightly
//! re-embedding (see `clipstream_pipeline::catalog`): [`plan`] and
//! [`snapshot`].

mod plan;
mod snapshot;

pub use self::plan::{PlanArgs, plan};
pub use self::snapshot::{SnapshotArgs, snapshot};
