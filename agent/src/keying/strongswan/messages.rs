//! VICI messages of charon 5.9.8, as serde types, and their mapping to the domain model.
//!
//! rsvici (de)serialises VICI messages with serde: every value is a string on the wire,
//! numbers and `yes`/`no` are parsed by the deserializer. Keys charon leaves out (e.g.
//! `initiator`, `encap`, `use-in` before the first packet) fall back to their defaults.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::services::numeric_ts;
use crate::model::{ChildSaInfo, IkeSaInfo};

/// `terminate` request (README "terminate()"); charon matches by `ike-id`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TerminateRequest {
    pub ike_id: u64,
    /// Destroy the IKE_SA without waiting for the peer's DELETE response.
    pub force: bool,
    /// Milliseconds; -1 returns at once, 0 waits forever.
    pub timeout: i64,
}

/// `initiate` request.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct InitiateRequest<'a> {
    pub child: &'a str,
    pub ike: &'a str,
    /// Milliseconds charon waits for the CHILD_SA before answering.
    pub timeout: i64,
    /// `no`: charon's half-open and IKE_SA limits must not stop a failover.
    pub init_limits: bool,
    /// Level of the `control-log` lines streamed back (1 = the important ones).
    pub loglevel: i32,
}

/// `list-sas` request; blocking mode (no `noblock`) so an IKE_SA busy in another thread
/// is waited for instead of being left out of the listing.
#[derive(Debug, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub struct ListSasRequest {}

/// Answer of commands that report `success`/`errmsg` (terminate, initiate, ...).
#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "kebab-case")]
pub struct CommandResult {
    pub success: bool,
    pub errmsg: Option<String>,
    pub matches: Option<u32>,
    pub terminated: Option<u32>,
}

/// One line of the `control-log` stream of initiate/terminate.
#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub struct ControlLog {
    pub group: String,
    pub level: i32,
    pub msg: String,
}

/// An IKE_SA as `list-sa`, `ike-updown` and `child-updown` report it. `C` is the shape of
/// one `child-sas` entry (a CHILD_SA, or an old/new pair in `child-rekey`).
#[derive(Debug, Deserialize, Default, Clone, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct IkeSaMsg<C = ChildSaMsg> {
    pub uniqueid: u64,
    pub version: u32,
    pub state: String,
    pub local_host: String,
    pub local_port: u16,
    pub local_id: String,
    pub remote_host: String,
    pub remote_port: u16,
    pub remote_id: String,
    pub initiator: bool,
    pub initiator_spi: String,
    pub responder_spi: String,
    /// Seconds since establishment; only while ESTABLISHED.
    pub established: Option<u64>,
    pub nat_local: bool,
    pub nat_remote: bool,
    pub child_sas: BTreeMap<String, C>,
}

#[derive(Debug, Deserialize, Default, Clone, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct ChildSaMsg {
    pub name: String,
    pub uniqueid: u64,
    pub reqid: u32,
    pub state: String,
    pub mode: String,
    pub protocol: String,
    pub encap: bool,
    pub spi_in: String,
    pub spi_out: String,
    pub bytes_in: u64,
    pub packets_in: u64,
    /// Seconds since the last inbound packet; absent before the first one.
    pub use_in: Option<u64>,
    pub bytes_out: u64,
    pub packets_out: u64,
    pub use_out: Option<u64>,
    pub install_time: u64,
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
}

/// `child-rekey` lists the old and the new CHILD_SA under the child's name.
#[derive(Debug, Deserialize, Default, Clone, PartialEq)]
#[serde(default)]
pub struct ChildRekeyPair {
    pub old: ChildSaMsg,
    pub new: ChildSaMsg,
}

/// `ike-rekey` lists the old and the new IKE_SA under the connection's name.
#[derive(Debug, Deserialize, Default, Clone, PartialEq)]
#[serde(default)]
pub struct IkeRekeyPair {
    pub old: IkeSaMsg,
    pub new: IkeSaMsg,
}

/// An event whose root holds one section per IKE_SA, named by its connection, and for
/// `ike-updown`/`child-updown` an `up = yes` flag beside them (absent when going down).
/// serde's `flatten` cannot express "one flag plus arbitrary sections" over VICI (it
/// buffers values untyped, and VICI values are untyped strings), hence this visitor.
#[derive(Debug, Clone, PartialEq)]
pub struct SaEventMsg<T> {
    pub up: bool,
    pub sas: Vec<(String, T)>,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for SaEventMsg<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = SaEventMsg<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an `up` flag and sections named by connection")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut ev = SaEventMsg {
                    up: false,
                    sas: Vec::new(),
                };
                while let Some(key) = map.next_key::<String>()? {
                    if key == "up" {
                        ev.up = map.next_value::<bool>()?;
                    } else {
                        let sa = map.next_value::<T>()?;
                        ev.sas.push((key, sa));
                    }
                }
                Ok(ev)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl ChildSaMsg {
    pub fn to_info(&self) -> ChildSaInfo {
        ChildSaInfo {
            name: self.name.clone(),
            unique_id: self.uniqueid,
            state: self.state.clone(),
            mode: self.mode.clone(),
            protocol: self.protocol.clone(),
            encap: self.encap,
            spi_in: self.spi_in.clone(),
            spi_out: self.spi_out.clone(),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            packets_in: self.packets_in,
            packets_out: self.packets_out,
            use_in_secs: self.use_in,
            use_out_secs: self.use_out,
            install_secs: self.install_time,
            // Ports by number, as the agent's flows name them (charon prints names).
            local_ts: self.local_ts.iter().map(|t| numeric_ts(t)).collect(),
            remote_ts: self.remote_ts.iter().map(|t| numeric_ts(t)).collect(),
        }
    }
}

impl<C> IkeSaMsg<C> {
    /// The IKE_SA's own fields, with `children` as given (the caller maps `child-sas`).
    pub fn to_info_with(&self, name: &str, children: Vec<ChildSaInfo>) -> IkeSaInfo {
        IkeSaInfo {
            name: name.to_string(),
            unique_id: self.uniqueid,
            state: self.state.clone(),
            local_host: self.local_host.clone(),
            local_port: self.local_port,
            remote_host: self.remote_host.clone(),
            remote_port: self.remote_port,
            local_id: self.local_id.clone(),
            remote_id: self.remote_id.clone(),
            initiator_spi: self.initiator_spi.clone(),
            responder_spi: self.responder_spi.clone(),
            initiator: self.initiator,
            established_secs: self.established.unwrap_or(0),
            children,
            nat_local: self.nat_local,
            nat_remote: self.nat_remote,
        }
    }
}

impl IkeSaMsg {
    /// The domain view; `name` is the section name (the connection's).
    pub fn to_info(&self, name: &str) -> IkeSaInfo {
        let children = self.child_sas.values().map(ChildSaMsg::to_info).collect();
        self.to_info_with(name, children)
    }
}

/// Flattens one `list-sa` event (one IKE_SA per event in practice) into IkeSaInfo.
pub fn list_sa_event_to_infos(ev: BTreeMap<String, IkeSaMsg>) -> impl Iterator<Item = IkeSaInfo> {
    ev.into_iter().map(|(name, sa)| sa.to_info(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child(uniqueid: u64, state: &str, bytes_in: u64, bytes_out: u64) -> ChildSaMsg {
        ChildSaMsg {
            name: "vip".into(),
            uniqueid,
            state: state.into(),
            mode: "TUNNEL".into(),
            protocol: "ESP".into(),
            encap: true,
            spi_in: "aac69cd9".into(),
            spi_out: "e9a2cc7f".into(),
            bytes_in,
            bytes_out,
            packets_in: 1,
            packets_out: 2,
            use_in: Some(3),
            use_out: None,
            install_time: 7,
            local_ts: vec!["192.0.2.1/32".into()],
            remote_ts: vec!["192.0.2.100/32".into()],
            ..Default::default()
        }
    }

    #[test]
    fn ike_sa_maps_every_field_and_child() {
        let mut sa = IkeSaMsg {
            uniqueid: 4,
            version: 2,
            state: "ESTABLISHED".into(),
            local_host: "192.0.2.1".into(),
            local_port: 4500,
            local_id: "192.0.2.1".into(),
            remote_host: "192.0.2.100".into(),
            remote_port: 4500,
            remote_id: "192.0.2.100".into(),
            initiator: true,
            initiator_spi: "b8b44e6b8c9929a7".into(),
            responder_spi: "b3d9808fa91fbcc1".into(),
            established: Some(12),
            nat_local: false,
            nat_remote: true,
            child_sas: BTreeMap::new(),
        };
        sa.child_sas
            .insert("vip-1".into(), child(1, "INSTALLED", 10, 20));
        sa.child_sas
            .insert("vip-2".into(), child(2, "INSTALLED", 1, 2));
        let info = sa.to_info("vip");
        assert_eq!(info.name, "vip");
        assert_eq!(info.unique_id, 4);
        assert_eq!(info.local_port, 4500);
        assert!(info.initiator);
        assert_eq!(info.established_secs, 12);
        assert!(!info.nat_local && info.nat_remote);
        assert_eq!(info.children.len(), 2);
        let c = &info.children[0];
        assert_eq!(c.unique_id, 1);
        assert_eq!(c.spi_in, "aac69cd9");
        assert_eq!(c.use_in_secs, Some(3));
        assert_eq!(c.use_out_secs, None);
        assert_eq!(c.install_secs, 7);
        assert_eq!(c.remote_ts, vec!["192.0.2.100/32".to_string()]);
        let sum = info.counters();
        assert_eq!((sum.bytes_in, sum.bytes_out, sum.packets_out), (11, 22, 4));
    }

    #[test]
    fn requests_use_charons_key_names() {
        // The field names are what charon's vici_control.c looks up.
        let t = serde_json::to_value(TerminateRequest {
            ike_id: 3,
            force: true,
            timeout: -1,
        })
        .unwrap();
        assert_eq!(t["ike-id"], 3);
        assert_eq!(t["timeout"], -1);
        let i = serde_json::to_value(InitiateRequest {
            child: "c",
            ike: "i",
            timeout: 2000,
            init_limits: false,
            loglevel: 1,
        })
        .unwrap();
        assert_eq!(i["init-limits"], false);
        assert_eq!(i["child"], "c");
    }
}
