//! Linux XFRM over netlink (not implemented yet; see the kernel issue).

use async_trait::async_trait;

use super::{Kernel, KernelError};
use crate::config::Config;
use crate::model::Vip;

pub struct XfrmKernel;

impl XfrmKernel {
    pub fn new(_config: &Config) -> anyhow::Result<Self> {
        anyhow::bail!("kernel.backend = \"xfrm\" is not implemented yet")
    }
}

#[async_trait]
impl Kernel for XfrmKernel {
    fn kind(&self) -> &'static str {
        "xfrm"
    }
    async fn reconcile(&self) -> Result<Vec<Vip>, KernelError> {
        Ok(Vec::new())
    }
    async fn engage_fail_secure(&self, _vip: Vip) -> Result<u32, KernelError> {
        Err(KernelError::Other("not implemented".into()))
    }
    async fn release_fail_secure(&self, _vip: Vip) -> Result<(), KernelError> {
        Ok(())
    }
    async fn delete_states(&self, _vip: Vip) -> Result<u32, KernelError> {
        Ok(0)
    }
}
