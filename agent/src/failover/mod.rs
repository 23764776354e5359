//! The failover core: `(state, input) -> actions`, with no I/O.

mod input;

pub use input::{Action, Input, Notice, NoticeKind, SaRef, Timer};
