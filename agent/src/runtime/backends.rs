//! The outside systems the agent works with, one trait object each.

use std::sync::Arc;

use crate::addrwatch::AddressWatcher;
use crate::addrwatch::holder::HolderProbe;
use crate::config::Config;
use crate::kernel::Kernel;
use crate::keying::Keying;
use crate::keying::ike_probe::IkeProbe;
use crate::store::OwnershipStore;
use crate::store::policies::PolicyStore;

pub struct Backends {
    pub store: Arc<dyn OwnershipStore>,
    pub watcher: Arc<dyn AddressWatcher>,
    /// Asks a VIP's link whether another node still holds the address (fast takeover).
    pub holder: Arc<dyn HolderProbe>,
    /// Asks a peer VIP's IKE port whether anything answers (renegotiating without a store).
    pub ike_probe: Arc<dyn IkeProbe>,
    pub keying: Arc<dyn Keying>,
    pub kernel: Arc<dyn Kernel>,
    /// Where the cluster-wide policies are kept.
    pub policies: Arc<dyn PolicyStore>,
}

impl Backends {
    pub async fn from_config(config: &Config) -> anyhow::Result<Backends> {
        Ok(Backends {
            store: crate::store::from_config(config).await?,
            watcher: crate::addrwatch::from_config(),
            holder: crate::addrwatch::holder_probe(),
            ike_probe: Arc::new(crate::keying::ike_probe::UdpIkeProbe::default()),
            keying: crate::keying::from_config(config),
            kernel: crate::kernel::from_config(config)?,
            policies: crate::store::policy_store_from_config(config)?,
        })
    }
}
