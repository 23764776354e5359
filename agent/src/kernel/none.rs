//! No kernel backend: fail-secure cannot block anything (status says so).

use async_trait::async_trait;

use super::{Kernel, KernelError};
use crate::model::Vip;

pub struct NoKernel;

#[async_trait]
impl Kernel for NoKernel {
    fn kind(&self) -> &'static str {
        "none"
    }
    async fn reconcile(&self) -> Result<Vec<Vip>, KernelError> {
        Ok(Vec::new())
    }
    async fn engage_fail_secure(&self, _vip: Vip) -> Result<u32, KernelError> {
        Ok(0)
    }
    async fn release_fail_secure(&self, _vip: Vip) -> Result<(), KernelError> {
        Ok(())
    }
    async fn delete_states(&self, _vip: Vip) -> Result<u32, KernelError> {
        Ok(0)
    }
}
