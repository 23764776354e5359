//! A kernel in memory: it remembers which VIPs are guarded and with which flows. For
//! in-process runtime tests, where the question is what the agent asked of the kernel.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Kernel, KernelError};
use crate::model::{ProtectedFlow, Vip};

#[derive(Default)]
pub struct MemoryKernel {
    /// Guarded VIPs and the flows they were last given (empty: as configured).
    guarded: Mutex<BTreeMap<Vip, Vec<ProtectedFlow>>>,
}

impl MemoryKernel {
    fn guarded(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vip, Vec<ProtectedFlow>>> {
        self.guarded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the VIP's guard is in place.
    pub fn is_guarded(&self, vip: Vip) -> bool {
        self.guarded().contains_key(&vip)
    }

    /// The flows the VIP's policy last set, if any.
    pub fn flows(&self, vip: Vip) -> Vec<ProtectedFlow> {
        self.guarded().get(&vip).cloned().unwrap_or_default()
    }
}

#[async_trait]
impl Kernel for MemoryKernel {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn reconcile(&self) -> Result<Vec<Vip>, KernelError> {
        Ok(self.guarded().keys().copied().collect())
    }

    async fn engage_fail_secure(&self, vip: Vip) -> Result<u32, KernelError> {
        let mut g = self.guarded();
        let flows = g.entry(vip).or_default();
        Ok(flows.len().max(1) as u32)
    }

    async fn release_fail_secure(&self, vip: Vip) -> Result<(), KernelError> {
        self.guarded().remove(&vip);
        Ok(())
    }

    async fn set_flows(&self, vip: Vip, flows: Vec<ProtectedFlow>) -> Result<(), KernelError> {
        self.guarded().insert(vip, flows);
        Ok(())
    }

    async fn delete_states(&self, _vip: Vip) -> Result<u32, KernelError> {
        Ok(0)
    }
}
