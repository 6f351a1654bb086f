//! Moved: the control plane's state machine is `broker::control`, its change vocabulary
//! (`ControlOp`) is `mesh::msg`. Kept while parallel work lands; removed with the last import.

pub use crate::broker::control::*;
pub use crate::mesh::msg::ControlOp;
