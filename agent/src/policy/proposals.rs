//! strongSwan proposal strings: the DH groups in them and the strength floor they must meet.
//!
//! A proposal is algorithm keywords joined by `-` (`aes256-sha256-modp3072`). Only the
//! key-exchange keywords are checked here; charon itself refuses unknown algorithms when
//! the connection is loaded. The floor follows RFC 8247: MODP groups of at least 2048
//! bits, elliptic curves of at least 256 bits, and none of the RFC 5114 MODP groups with
//! small subgroups (`modp1024s160`, `modp2048s224`, `modp2048s256`): RFC 8247 lists all
//! three as "SHOULD NOT" (their subgroup sizes are small, and their generation is not
//! verifiable), so vipsec refuses `modp2048s256` too rather than carry a deprecated group.

use std::fmt;

/// The smallest MODP (finite-field) group vipsec accepts, in bits.
pub const MODP_FLOOR_BITS: u32 = 2048;
/// The smallest elliptic curve vipsec accepts, in bits.
pub const ECP_FLOOR_BITS: u32 = 256;

/// A Diffie-Hellman (key exchange) group named in a proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhGroup {
    /// `modpN`: an RFC 3526/2409 finite-field group of N bits.
    Modp(u32),
    /// `modpNsM`: an RFC 5114 group of N bits with an M-bit prime-order subgroup.
    ModpSubgroup { bits: u32, subgroup: u32 },
    /// `ecpN` (NIST) or `ecpNbp` (Brainpool): an N-bit curve.
    Ecp { bits: u32, brainpool: bool },
    /// `curve25519`/`x25519` (about 128-bit security, like ecp256).
    Curve25519,
    /// `curve448`/`x448`.
    Curve448,
}

impl DhGroup {
    /// The group a proposal keyword names; `Ok(None)` when the keyword is not a key
    /// exchange (an encryption, integrity or PRF algorithm, or `none`).
    pub fn parse_keyword(kw: &str) -> Result<Option<DhGroup>, String> {
        // strongSwan 6 prefixes additional key exchanges with `keN_`; they are groups too.
        let kw = match kw.split_once('_') {
            Some((prefix, rest))
                if prefix.len() == 3
                    && prefix.starts_with("ke")
                    && prefix[2..].chars().all(|c| c.is_ascii_digit()) =>
            {
                rest
            }
            _ => kw,
        };
        let bad = || Err(format!("unknown DH group {kw:?}"));
        if matches!(kw, "curve25519" | "x25519") {
            return Ok(Some(DhGroup::Curve25519));
        }
        if matches!(kw, "curve448" | "x448") {
            return Ok(Some(DhGroup::Curve448));
        }
        if let Some(rest) = kw.strip_prefix("modp") {
            if let Some((bits, sub)) = rest.split_once('s') {
                return match (bits.parse(), sub.parse()) {
                    (Ok(bits), Ok(subgroup)) => Ok(Some(DhGroup::ModpSubgroup { bits, subgroup })),
                    _ => bad(),
                };
            }
            return rest
                .parse()
                .map(|b| Some(DhGroup::Modp(b)))
                .or_else(|_| bad());
        }
        if let Some(rest) = kw.strip_prefix("ecp") {
            let (bits, brainpool) = match rest.strip_suffix("bp") {
                Some(b) => (b, true),
                None => (rest, false),
            };
            return bits
                .parse()
                .map(|bits| Some(DhGroup::Ecp { bits, brainpool }))
                .or_else(|_| bad());
        }
        if kw.starts_with("ntru") || kw.starts_with("newhope") {
            return Err(format!(
                "key exchange {kw:?} is not supported by vipsec (use a MODP group or a curve)"
            ));
        }
        Ok(None)
    }

    /// Why the group is below the floor, if it is.
    pub fn below_floor(&self) -> Option<String> {
        match *self {
            DhGroup::Modp(bits) if bits < MODP_FLOOR_BITS => Some(format!(
                "DH group {self} is {bits} bits, below the {MODP_FLOOR_BITS}-bit floor"
            )),
            DhGroup::ModpSubgroup { subgroup, .. } => Some(format!(
                "DH group {self} has a {subgroup}-bit subgroup (RFC 5114; RFC 8247 says \
                 SHOULD NOT), below the floor of {MODP_FLOOR_BITS}-bit MODP groups without \
                 small subgroups"
            )),
            DhGroup::Ecp { bits, .. } if bits < ECP_FLOOR_BITS => Some(format!(
                "DH group {self} is a {bits}-bit curve, below the {ECP_FLOOR_BITS}-bit floor \
                 for elliptic curves"
            )),
            _ => None,
        }
    }
}

impl fmt::Display for DhGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DhGroup::Modp(b) => write!(f, "modp{b}"),
            DhGroup::ModpSubgroup { bits, subgroup } => write!(f, "modp{bits}s{subgroup}"),
            DhGroup::Ecp { bits, brainpool } => {
                write!(f, "ecp{bits}{}", if *brainpool { "bp" } else { "" })
            }
            DhGroup::Curve25519 => f.write_str("curve25519"),
            DhGroup::Curve448 => f.write_str("curve448"),
        }
    }
}

/// Which proposal list is checked: IKE needs a DH group in every proposal, ESP may have
/// one (PFS on rekeying) or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProposalKind {
    Ike,
    Esp,
}

/// The DH groups of one proposal, or why it is refused (without the field name; the
/// caller adds `ike-proposals[1] "..."`).
pub fn check_proposal(kind: ProposalKind, proposal: &str) -> Result<Vec<DhGroup>, String> {
    if proposal.is_empty() {
        return Err("empty proposal".into());
    }
    if proposal == "default" {
        // charon's built-in defaults change between releases and builds (they depend on
        // the loaded plugins); a cluster policy names its algorithms so both sides agree.
        return Err("\"default\" is not allowed: name the algorithms".into());
    }
    if let Some(c) = proposal
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_')))
    {
        return Err(format!("unexpected character {c:?}"));
    }
    let mut groups = Vec::new();
    for kw in proposal.split('-') {
        if kw.is_empty() {
            return Err("empty algorithm between two '-'".into());
        }
        if let Some(g) = DhGroup::parse_keyword(kw)? {
            if let Some(why) = g.below_floor() {
                return Err(why);
            }
            groups.push(g);
        }
    }
    if kind == ProposalKind::Ike && groups.is_empty() {
        return Err(format!(
            "no DH group (IKE needs one, e.g. {proposal}-modp3072)"
        ));
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_refuses_weak_groups_and_accepts_strong_ones() {
        let ike = |p: &str| check_proposal(ProposalKind::Ike, p);
        assert_eq!(
            ike("aes128-sha1-modp1024").unwrap_err(),
            "DH group modp1024 is 1024 bits, below the 2048-bit floor"
        );
        assert_eq!(
            ike("aes256-sha256-modp2048").unwrap(),
            [DhGroup::Modp(2048)]
        );
        assert!(ike("aes256-sha256-modp768").is_err());
        assert!(ike("aes256-sha256-modp1536").is_err());
        assert!(ike("aes256-sha256-ecp256").is_ok());
        assert!(ike("aes256gcm16-prfsha384-ecp384").is_ok());
        let e = ike("aes256-sha256-ecp224").unwrap_err();
        assert!(
            e.contains("ecp224 is a 224-bit curve, below the 256-bit floor"),
            "{e}"
        );
        assert!(ike("aes256-sha256-ecp192").is_err());
        assert!(ike("aes256-sha256-ecp224bp").is_err());
        assert!(ike("aes256-sha256-ecp256bp").is_ok());
        assert!(ike("aes256-sha256-curve25519").is_ok());
        assert!(ike("aes256-sha256-x25519").is_ok());
        assert!(ike("aes256-sha256-curve448").is_ok());
        for weak in ["modp1024s160", "modp2048s224", "modp2048s256"] {
            let e = ike(&format!("aes256-sha256-{weak}")).unwrap_err();
            assert!(e.contains("subgroup"), "{weak}: {e}");
        }
        // Every group of a proposal is checked, not only the first.
        assert!(ike("aes256-sha256-modp3072-modp1024").is_err());
    }

    #[test]
    fn ike_needs_a_group_and_esp_does_not() {
        let e = check_proposal(ProposalKind::Ike, "aes256-sha256").unwrap_err();
        assert!(e.contains("no DH group"), "{e}");
        assert_eq!(
            check_proposal(ProposalKind::Esp, "aes256-sha256").unwrap(),
            []
        );
        assert!(check_proposal(ProposalKind::Esp, "aes256-sha256-modp1024").is_err());
        assert!(check_proposal(ProposalKind::Esp, "aes256-sha256-modp3072").is_ok());
    }

    #[test]
    fn malformed_proposals_are_refused() {
        assert!(check_proposal(ProposalKind::Ike, "").is_err());
        assert!(check_proposal(ProposalKind::Ike, "default").is_err());
        assert!(check_proposal(ProposalKind::Ike, "aes256--modp3072").is_err());
        assert!(check_proposal(ProposalKind::Ike, "aes256-sha256-modpX").is_err());
        assert!(check_proposal(ProposalKind::Ike, "AES256-sha256-modp3072").is_err());
        assert!(check_proposal(ProposalKind::Ike, "aes256-sha256-ntru128").is_err());
    }
}
