//! charon prints traffic-selector ports by their /etc/services name (`192.0.2.100/32[tcp/pop3]`,
//! from getservbyport); the agent compares selectors by number, so names are mapped back
//! with the same file charon read.

use std::collections::HashMap;
use std::sync::OnceLock;

const SERVICES: &str = "/etc/services";

/// `(protocol, name or alias) -> port`.
fn table() -> &'static HashMap<(String, String), u16> {
    static TABLE: OnceLock<HashMap<(String, String), u16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        std::fs::read_to_string(SERVICES)
            .map(|text| parse_services(&text))
            .unwrap_or_default()
    })
}

fn parse_services(text: &str) -> HashMap<(String, String), u16> {
    let mut map = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let (Some(name), Some(port_proto)) = (words.next(), words.next()) else {
            continue;
        };
        let Some((port, proto)) = port_proto.split_once('/') else {
            continue;
        };
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        for n in std::iter::once(name).chain(words) {
            map.entry((proto.to_string(), n.to_string()))
                .or_insert(port);
        }
    }
    map
}

/// A traffic selector with its port as a number: `192.0.2.100/32[tcp/pop3]` becomes
/// `192.0.2.100/32[tcp/110]`; anything else is returned as it is.
pub fn numeric_ts(ts: &str) -> String {
    numeric_ts_with(ts, table())
}

fn numeric_ts_with(ts: &str, table: &HashMap<(String, String), u16>) -> String {
    let Some((net, rest)) = ts.split_once('[') else {
        return ts.to_string();
    };
    let Some(inner) = rest.strip_suffix(']') else {
        return ts.to_string();
    };
    let Some((proto, port)) = inner.split_once('/') else {
        return ts.to_string();
    };
    match table.get(&(proto.to_string(), port.to_string())) {
        Some(n) => format!("{net}[{proto}/{n}]"),
        None => ts.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_become_numbers() {
        let t = parse_services(
            "# comment\npop3\t\t110/tcp\t\tpop-3\nimap2\t\t143/tcp\t\timap\nldap 389/udp\n",
        );
        assert_eq!(
            numeric_ts_with("192.0.2.100/32[tcp/pop3]", &t),
            "192.0.2.100/32[tcp/110]"
        );
        assert_eq!(
            numeric_ts_with("192.0.2.100/32[tcp/imap]", &t),
            "192.0.2.100/32[tcp/143]"
        );
        assert_eq!(
            numeric_ts_with("10.0.0.0/8[udp/ldap]", &t),
            "10.0.0.0/8[udp/389]"
        );
        // Not a known name (or not a name): unchanged.
        assert_eq!(
            numeric_ts_with("10.0.0.0/8[tcp/ldap]", &t),
            "10.0.0.0/8[tcp/ldap]"
        );
        assert_eq!(
            numeric_ts_with("10.0.0.1/32[tcp/8080]", &t),
            "10.0.0.1/32[tcp/8080]"
        );
        assert_eq!(numeric_ts_with("10.0.0.1/32[tcp]", &t), "10.0.0.1/32[tcp]");
        assert_eq!(numeric_ts_with("dynamic", &t), "dynamic");
    }
}
