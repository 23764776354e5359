//! Where ownership lives in etcd and how records are encoded, decoded defensively.
//!
//! `<prefix>vips/<vip>`   the live owner record, `VipOwner` as JSON, under the owner's lease;
//! `<prefix>epochs/<vip>` the highest epoch ever written (decimal), never deleted, so the
//!                        next owner of a withdrawn or expired VIP still gets a higher one.
//! `<prefix>holders/<vip>/<node>` "this node holds the VIP's address", under the node's
//!                        lease for that VIP: lets the owner of record learn that another
//!                        node has the address too (a split brain seen from both sides).
//! `<prefix>policies/<name>` a policy document (JSON), versioned by etcd's key version.
//! `<prefix>moves/<vip>/<epoch>/<node>` one node's marks of one move (see `moves.rs`).
//!
//! `<vip>` is the address's canonical text (`Display`: RFC 5952 for IPv6, so
//! `2001:db8::100`, never `2001:DB8:0::100`). The ':' of an IPv6 VIP needs no escaping: etcd
//! keys are bytes, the only structure the agent reads is the `vips/` prefix, and no IP
//! text contains '/'. What does need care is that one VIP has exactly one key: a key
//! written in another spelling (by hand, by another tool) would be a second record for the
//! same VIP, so [`KeyLayout::vip_of`] refuses every key that is not the canonical text.

use crate::model::{Vip, VipOwner};

#[derive(Debug, Clone)]
pub struct KeyLayout {
    prefix: String,
}

impl KeyLayout {
    pub fn new(prefix: &str) -> Self {
        KeyLayout {
            prefix: prefix.to_string(),
        }
    }

    /// The range every owner record lives under (watched and snapshotted).
    pub fn owners(&self) -> String {
        format!("{}vips/", self.prefix)
    }

    pub fn owner(&self, vip: Vip) -> String {
        format!("{}vips/{vip}", self.prefix)
    }

    /// The range every policy document lives under.
    pub fn policies(&self) -> String {
        format!("{}policies/", self.prefix)
    }

    pub fn policy(&self, name: &str) -> String {
        format!("{}policies/{name}", self.prefix)
    }

    /// The range every holder mark lives under.
    pub fn holders(&self) -> String {
        format!("{}holders/", self.prefix)
    }

    pub fn holder(&self, vip: Vip, node: &str) -> String {
        format!("{}holders/{vip}/{node}", self.prefix)
    }

    /// The VIP and node a holder key names.
    pub fn holder_of(&self, key: &[u8]) -> Result<(Vip, String), String> {
        let key = std::str::from_utf8(key).map_err(|_| "key is not UTF-8".to_string())?;
        let rest = key
            .strip_prefix(&self.holders())
            .ok_or_else(|| format!("key is outside {}", self.holders()))?;
        let (vip, node) = rest
            .split_once('/')
            .ok_or_else(|| format!("{rest:?} is not <vip>/<node>"))?;
        let parsed: Vip = vip
            .parse()
            .map_err(|_| format!("{vip:?} is not an IP address"))?;
        if parsed.to_string() != vip || !crate::model::valid_node_name(node) {
            return Err(format!("{rest:?} is not <canonical vip>/<node>"));
        }
        Ok((parsed, node.to_string()))
    }

    pub fn epoch(&self, vip: Vip) -> String {
        format!("{}epochs/{vip}", self.prefix)
    }

    /// Where the moves of one VIP (or of all) live; a range prefix.
    pub fn moves(&self, vip: Option<Vip>) -> String {
        match vip {
            Some(vip) => format!("{}moves/{vip}/", self.prefix),
            None => format!("{}moves/", self.prefix),
        }
    }

    /// Every node's marks of one move.
    pub fn move_prefix(&self, vip: Vip, epoch: u64) -> String {
        format!("{}moves/{vip}/{epoch:020}/", self.prefix)
    }

    /// One node's marks of one move; the epoch zero-padded so keys sort by epoch.
    pub fn move_marks(&self, vip: Vip, epoch: u64, node: &str) -> String {
        format!("{}moves/{vip}/{epoch:020}/{node}", self.prefix)
    }

    /// The VIP an owner key names.
    pub fn vip_of(&self, key: &[u8]) -> Result<Vip, String> {
        let key = std::str::from_utf8(key).map_err(|_| "key is not UTF-8".to_string())?;
        let rest = key
            .strip_prefix(&self.owners())
            .ok_or_else(|| format!("key is outside {}", self.owners()))?;
        let vip: Vip = rest
            .parse()
            .map_err(|_| format!("{rest:?} is not an IP address"))?;
        if vip.to_canonical() != vip {
            return Err(format!(
                "{rest:?} is an IPv4-mapped IPv6 address; the VIP's key is {}",
                self.owner(vip.to_canonical())
            ));
        }
        if vip.to_string() != rest {
            return Err(format!(
                "{rest:?} is not the canonical spelling of {vip}; the VIP's key is {}",
                self.owner(vip)
            ));
        }
        Ok(vip)
    }
}

/// A holder mark's value: when it was written and how many front-ends the holder serves.
pub fn encode_holder(at_ms: u64, followers: u32) -> String {
    format!(r#"{{"at_ms":{at_ms},"followers":{followers}}}"#)
}

/// The front-ends a holder mark says its node serves; 0 when it does not say (a mark
/// written by an older agent holds only a time) or cannot be read.
pub fn holder_followers(value: &[u8]) -> u32 {
    #[derive(serde::Deserialize)]
    struct Mark {
        #[serde(default)]
        followers: u32,
    }
    if value.len() > MAX_VALUE_BYTES {
        return 0;
    }
    serde_json::from_slice::<Mark>(value).map_or(0, |m| m.followers)
}

pub fn encode_owner(owner: &VipOwner) -> Result<String, String> {
    serde_json::to_string(owner).map_err(|e| e.to_string())
}

/// The largest epoch a record may carry. Epochs rise by one per move, so nothing honest
/// comes near it; a larger one is damage (or an attack) that would overflow the next claim
/// and fence every real owner out. 2^53 - 1 also stays exact in any JSON reader.
pub const MAX_EPOCH: u64 = (1 << 53) - 1;

/// The most bytes an owner record or epoch may take; a larger value is not one of ours.
pub const MAX_VALUE_BYTES: usize = 4096;

pub fn decode_owner(value: &[u8]) -> Result<VipOwner, String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "owner record of {} bytes (at most {MAX_VALUE_BYTES})",
            value.len()
        ));
    }
    let owner: VipOwner =
        serde_json::from_slice(value).map_err(|e| format!("not an owner record: {e}"))?;
    if owner.node.is_empty() {
        return Err("owner record names no node".into());
    }
    if !crate::model::valid_node_name(&owner.node) {
        // The node's name becomes the IKE identity front-ends require of the VIP's
        // owner: a wildcard such as `%any` would switch that check off.
        return Err(format!(
            "owner record names {:?}, which is not a node name (letters, digits, '-', '_', '.')",
            owner.node
        ));
    }
    if owner.epoch > MAX_EPOCH {
        return Err(format!(
            "owner record epoch {} is beyond the largest valid epoch {MAX_EPOCH}",
            owner.epoch
        ));
    }
    Ok(owner)
}

pub fn decode_epoch(value: &[u8]) -> Result<u64, String> {
    let shown = || {
        let mut s = String::from_utf8_lossy(&value[..value.len().min(64)]).into_owned();
        if value.len() > 64 {
            s.push_str("...");
        }
        s
    };
    let epoch: u64 = std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("epoch {:?} is not a number", shown()))?;
    if epoch > MAX_EPOCH {
        return Err(format!(
            "epoch {epoch} is beyond the largest valid epoch {MAX_EPOCH}"
        ));
    }
    Ok(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_ipv4_and_ipv6() {
        let k = KeyLayout::new("/vipsec/");
        for vip in ["192.0.2.100", "2001:db8::1"] {
            let vip: Vip = vip.parse().unwrap();
            assert_eq!(k.vip_of(k.owner(vip).as_bytes()), Ok(vip));
        }
        assert_eq!(
            k.epoch("192.0.2.1".parse().unwrap()),
            "/vipsec/epochs/192.0.2.1"
        );
        assert!(k.vip_of(b"/vipsec/vips/not-an-ip").is_err());
        // One VIP, one key: other spellings of the same address are refused.
        for key in [
            "/vipsec/vips/2001:DB8::1",
            "/vipsec/vips/2001:db8:0:0:0:0:0:1",
            "/vipsec/vips/[2001:db8::1]",
            "/vipsec/vips/::ffff:192.0.2.100",
            "/vipsec/vips/2001:db8::1%eth0",
            "/vipsec/vips/192.0.2.100/32",
        ] {
            assert!(k.vip_of(key.as_bytes()).is_err(), "{key}");
        }
        assert!(k.vip_of(b"/other/vips/192.0.2.1").is_err());
    }

    #[test]
    fn holder_keys_round_trip_and_odd_ones_are_refused() {
        let k = KeyLayout::new("/vipsec/");
        for vip in ["192.0.2.100", "2001:db8:1::100"] {
            let vip: Vip = vip.parse().unwrap();
            let key = k.holder(vip, "be-2.example");
            assert_eq!(
                k.holder_of(key.as_bytes()),
                Ok((vip, "be-2.example".into()))
            );
        }
        for key in [
            "/vipsec/holders/192.0.2.100",
            "/vipsec/holders/192.0.2.100/",
            "/vipsec/holders/192.0.2.100/a/b",
            "/vipsec/holders/192.0.2.100/%any",
            "/vipsec/holders/2001:DB8::1/be1",
            "/vipsec/holders/nonsense/be1",
            "/vipsec/vips/192.0.2.100",
        ] {
            assert!(k.holder_of(key.as_bytes()).is_err(), "{key}");
        }
    }

    #[test]
    fn ipv6_keys_round_trip_exactly_and_stay_under_the_watched_prefix() {
        let k = KeyLayout::new("/vipsec/");
        for vip in [
            "2001:db8::100",
            "2001:db8:1::100",
            "2001:db8::",
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
            "::1",
            "fd00::1:0:0:1",
        ] {
            let vip: Vip = vip.parse().unwrap();
            let key = k.owner(vip);
            assert!(key.starts_with(&k.owners()), "{key}");
            assert_eq!(key, format!("/vipsec/vips/{vip}"));
            assert_eq!(k.vip_of(key.as_bytes()), Ok(vip), "{key}");
            assert_eq!(k.epoch(vip), format!("/vipsec/epochs/{vip}"));
        }
        // A VIP's key is never a prefix match for another VIP's key under a range read:
        // the agent reads single keys, and the range it watches is `vips/` itself.
        let a = k.owner("2001:db8::1".parse().unwrap());
        let b = k.owner("2001:db8::10".parse().unwrap());
        assert_ne!(k.vip_of(a.as_bytes()), k.vip_of(b.as_bytes()));
    }

    #[test]
    fn record_is_the_vip_owner_serde_form_and_garbage_is_refused() {
        let o = VipOwner {
            node: "be1".into(),
            epoch: 7,
            taken_at_ms: 1_700_000_000_000,
            draining: false,
        };
        let text = encode_owner(&o).unwrap();
        assert_eq!(
            text,
            r#"{"node":"be1","epoch":7,"taken_at_ms":1700000000000}"#
        );
        assert_eq!(decode_owner(text.as_bytes()), Ok(o));
        assert!(decode_owner(b"\xff garbage").is_err());
        assert!(decode_owner(br#"{"node":"","epoch":1,"taken_at_ms":0}"#).is_err());
        for odd in ["%any", "be1 be2", "be1/x", "*", "be1\n"] {
            let text = format!(
                r#"{{"node":{},"epoch":1,"taken_at_ms":0}}"#,
                serde_json::to_string(odd).unwrap()
            );
            let e = decode_owner(text.as_bytes()).unwrap_err();
            assert!(e.contains("not a node name"), "{odd:?}: {e}");
        }
        assert_eq!(
            holder_followers(encode_holder(1_700_000_000_000, 17).as_bytes()),
            17
        );
        assert_eq!(
            holder_followers(b"1700000000000"),
            0,
            "an older agent's mark"
        );
        assert_eq!(holder_followers(b"{\"followers\":-3}"), 0);
        assert_eq!(decode_epoch(b"12"), Ok(12));
        assert!(decode_epoch(b"-1").is_err());
        assert_eq!(
            decode_epoch(MAX_EPOCH.to_string().as_bytes()),
            Ok(MAX_EPOCH)
        );
        let e = decode_epoch(u64::MAX.to_string().as_bytes()).unwrap_err();
        assert!(
            e.contains("18446744073709551615") && e.contains("beyond"),
            "{e}"
        );
        let e = decode_epoch(&[b'9'; 100_000]).unwrap_err();
        assert!(
            e.len() < 200,
            "a huge value is not echoed whole: {} bytes",
            e.len()
        );
        let e = decode_owner(
            format!(r#"{{"node":"be1","epoch":{},"taken_at_ms":0}}"#, u64::MAX).as_bytes(),
        )
        .unwrap_err();
        assert!(e.contains("beyond"), "{e}");
        let mut big = br#"{"node":"be1","epoch":1,"taken_at_ms":0,"pad":""#.to_vec();
        big.extend(std::iter::repeat_n(b'x', 10_000));
        big.extend(br#""}"#);
        assert!(decode_owner(&big).unwrap_err().contains("10"));
    }
}
