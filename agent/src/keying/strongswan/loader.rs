//! Loading vipsec's own connections and shared key into charon over VICI (`load-conn`,
//! `unload-conn`, `load-shared`, `list-conns`), so the IKE configuration of every VIP
//! comes from the cluster policy instead of a hand-written swanctl.conf.
//!
//! charon 5.9.8 (vici_config.c, vici_cred.c): `load-conn` of a name already loaded
//! replaces that connection (its traps are reinstalled; IKE_SAs already up keep running
//! on the old settings until rekeyed or restarted); `unload-conn` removes it and its
//! traps. Both answer `success`/`errmsg`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::connection::ViciConn;
use super::services::numeric_ts;
use crate::keying::KeyingError;
use crate::model::{LoadedChild, LoadedConnection};
use crate::policy::{ConnectionSpec, PSK_ID, SecretKey};

/// charon answers these from memory, in milliseconds.
const LOAD_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Serialize)]
struct UnloadConnRequest<'a> {
    name: &'a str,
}

/// `load-shared`; its Debug (derived through [`SecretKey`]) never shows the key.
#[derive(Debug, Serialize)]
struct LoadSharedRequest<'a> {
    /// A stable id: loading again replaces the key instead of adding a second one.
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    data: KeyBytes<'a>,
    /// Empty: the key is for any identity (vipsec has one PSK per node).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    owners: Vec<String>,
}

/// The key as one VICI value (raw bytes, not a list of numbers).
struct KeyBytes<'a>(&'a SecretKey);

impl std::fmt::Debug for KeyBytes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for KeyBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0.expose())
    }
}

#[derive(Serialize, Default)]
struct ListConnsRequest {}

/// One connection of a `list-conn` event.
#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct ConnMsg {
    local_addrs: Vec<String>,
    remote_addrs: Vec<String>,
    children: BTreeMap<String, ChildConnMsg>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "kebab-case")]
struct ChildConnMsg {
    mode: String,
    local_ts: Vec<String>,
    remote_ts: Vec<String>,
}

/// Loads (or replaces) one connection.
pub async fn load_conn(conn: &mut ViciConn, spec: &ConnectionSpec) -> Result<(), KeyingError> {
    conn.command("load-conn", spec, LOAD_TIMEOUT)
        .await
        .map_err(|e| name_command(e, &spec.name))?;
    Ok(())
}

/// Unloads a connection; one that is not loaded counts as done.
pub async fn unload_conn(conn: &mut ViciConn, name: &str) -> Result<(), KeyingError> {
    match conn
        .command("unload-conn", UnloadConnRequest { name }, LOAD_TIMEOUT)
        .await
    {
        Ok(_) => Ok(()),
        Err(KeyingError::Refused { reason, .. }) if reason.contains("not found") => Ok(()),
        Err(e) => Err(name_command(e, name)),
    }
}

/// Loads (or replaces) the node's pre-shared key under [`PSK_ID`].
pub async fn load_shared(conn: &mut ViciConn, key: &SecretKey) -> Result<(), KeyingError> {
    let req = LoadSharedRequest {
        id: PSK_ID,
        kind: "IKE",
        data: KeyBytes(key),
        owners: Vec::new(),
    };
    conn.command("load-shared", req, LOAD_TIMEOUT).await?;
    Ok(())
}

/// Every loaded connection with its children's traffic selectors.
pub async fn list_conns(conn: &mut ViciConn) -> Result<Vec<LoadedConnection>, KeyingError> {
    let events: Vec<BTreeMap<String, ConnMsg>> = conn
        .stream_request(
            "list-conns",
            "list-conn",
            ListConnsRequest::default(),
            LOAD_TIMEOUT,
        )
        .await?;
    Ok(events
        .into_iter()
        .flatten()
        .map(|(name, c)| LoadedConnection {
            name,
            local_addrs: c.local_addrs,
            remote_addrs: c.remote_addrs,
            children: c
                .children
                .into_iter()
                .map(|(name, ch)| LoadedChild {
                    name,
                    mode: ch.mode,
                    local_ts: ch.local_ts.iter().map(|t| numeric_ts(t)).collect(),
                    remote_ts: ch.remote_ts.iter().map(|t| numeric_ts(t)).collect(),
                })
                .collect(),
        })
        .collect())
}

fn name_command(e: KeyingError, name: &str) -> KeyingError {
    match e {
        KeyingError::Refused { command, reason } => KeyingError::Refused {
            command: format!("{command} {name}"),
            reason,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_shared_debug_hides_the_key() {
        let key = SecretKey::new(b"top-secret-psk".to_vec());
        let req = LoadSharedRequest {
            id: PSK_ID,
            kind: "IKE",
            data: KeyBytes(&key),
            owners: Vec::new(),
        };
        let shown = format!("{req:?}");
        assert!(!shown.contains("top-secret"), "{shown}");
        assert!(shown.contains("vipsec-psk"), "{shown}");
    }

    #[test]
    fn list_conn_event_maps_children_and_selectors() {
        let ev: BTreeMap<String, ConnMsg> = serde_json::from_str(
            r#"{"vipsec-m-192-0-2-100": {"local_addrs": ["%any"], "remote_addrs": ["192.0.2.100"],
                "version": "IKEv2", "children": {"m": {"mode": "TUNNEL",
                "local-ts": ["dynamic[tcp]"], "remote-ts": ["192.0.2.100/32[tcp/110]"]}}}}"#,
        )
        .unwrap();
        let c = &ev["vipsec-m-192-0-2-100"];
        assert_eq!(c.remote_addrs, ["192.0.2.100"]);
        assert_eq!(c.children["m"].remote_ts, ["192.0.2.100/32[tcp/110]"]);
    }
}
