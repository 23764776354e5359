//! The configuration reference, generated from the configuration code so that it cannot
//! drift from it: the keys, their types and their descriptions come from the structs in
//! `config/` (field names, serde renames, doc comments), the defaults and which keys are
//! required from serde itself (a minimal file deserialized, then serialized back).
//!
//! The doc comments are read from the source text embedded at build time: Rust keeps no
//! doc comments at run time, and a derive crate for that would need an attribute on every
//! duration field (`humantime_serde` is a module, not a type). The tests tie both halves
//! together: the keys found in the source must be exactly the keys serde writes.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

use crate::config::Config;

/// The files the config structs and the enums they use live in.
const SOURCES: [&str; 12] = [
    include_str!("config/mod.rs"),
    include_str!("config/api.rs"),
    include_str!("config/metrics.rs"),
    include_str!("config/log.rs"),
    include_str!("config/store.rs"),
    include_str!("config/keying.rs"),
    include_str!("config/kernel.rs"),
    include_str!("config/failover.rs"),
    include_str!("config/policy.rs"),
    include_str!("config/drill.rs"),
    include_str!("config/vips.rs"),
    include_str!("model.rs"),
];

/// The smallest document serde accepts with every section present once: the defaults of
/// every other key are read from what it deserializes to.
const MINIMAL: &str = r#"
node = "NODE"
[[hosted_vip]]
address = "192.0.2.100"
[[peer_vip]]
address = "192.0.2.100"
"#;

/// One key of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyDoc {
    /// Dotted path; an element of an array of tables is written `hosted_vip[].address`.
    pub key: String,
    /// The TOML table it is written in: `""` for the top level, `store`, `[hosted_vip]`.
    pub section: String,
    pub type_name: String,
    pub required: bool,
    /// The default as TOML would write it; `None` when the key has none (unset).
    pub default: Option<String>,
    pub description: String,
}

#[derive(Debug, Default)]
struct StructSource {
    doc: String,
    fields: Vec<FieldSource>,
}

#[derive(Debug)]
struct FieldSource {
    name: String,
    ty: String,
    doc: String,
}

#[derive(Debug, Default)]
struct Sources {
    structs: BTreeMap<String, StructSource>,
    /// Enum name -> its values as written in TOML (all are `rename_all = "lowercase"`).
    enums: BTreeMap<String, Vec<String>>,
}

enum Item {
    Struct(String),
    Enum(String),
}

/// Reads the top-level `pub struct`s and `pub enum`s of the sources: doc comments, serde
/// renames, field names and types. Anything nested (tests, impls) is skipped.
fn parse_sources() -> Sources {
    let mut out = Sources::default();
    for src in SOURCES {
        let mut doc: Vec<String> = Vec::new();
        let mut rename: Option<String> = None;
        let mut item: Option<Item> = None;
        for raw in src.lines() {
            let line = raw.trim();
            if item.is_some() && raw.starts_with('}') {
                item = None;
                doc.clear();
                continue;
            }
            if let Some(d) = line.strip_prefix("///") {
                doc.push(d.trim().to_string());
                continue;
            }
            if line.starts_with("#[serde(") {
                rename = serde_rename(line).or(rename);
                continue;
            }
            if line.starts_with("#[") {
                continue;
            }
            match &item {
                None => {
                    let decl = raw
                        .strip_prefix("pub struct ")
                        .map(|r| (true, r))
                        .or_else(|| raw.strip_prefix("pub enum ").map(|r| (false, r)));
                    if let Some((is_struct, name)) =
                        decl.and_then(|(s, rest)| Some((s, rest.strip_suffix(" {")?.trim())))
                    {
                        let name = name.to_string();
                        if is_struct {
                            out.structs.insert(
                                name.clone(),
                                StructSource {
                                    doc: doc.join(" "),
                                    fields: Vec::new(),
                                },
                            );
                            item = Some(Item::Struct(name));
                        } else {
                            out.enums.insert(name.clone(), Vec::new());
                            item = Some(Item::Enum(name));
                        }
                    }
                    doc.clear();
                    rename = None;
                }
                Some(Item::Struct(name)) => {
                    if let Some((field, ty)) = line
                        .strip_prefix("pub ")
                        .and_then(|f| f.strip_suffix(','))
                        .and_then(|f| f.split_once(": "))
                    {
                        let s = out.structs.get_mut(name).expect("struct just inserted");
                        s.fields.push(FieldSource {
                            name: rename.take().unwrap_or_else(|| field.to_string()),
                            ty: ty.to_string(),
                            doc: doc.join(" "),
                        });
                    }
                    doc.clear();
                    rename = None;
                }
                Some(Item::Enum(name)) => {
                    let variant = line.trim_end_matches(',');
                    if !variant.is_empty()
                        && variant.chars().all(|c| c.is_ascii_alphanumeric())
                        && variant.starts_with(|c: char| c.is_ascii_uppercase())
                    {
                        out.enums
                            .get_mut(name)
                            .expect("enum just inserted")
                            .push(variant.to_lowercase());
                    }
                    doc.clear();
                }
            }
        }
    }
    out
}

/// `rename = "x"` from a `#[serde(...)]` line (not `rename_all`).
fn serde_rename(line: &str) -> Option<String> {
    let at = line.find("rename = \"")?;
    let rest = &line[at + "rename = \"".len()..];
    Some(rest[..rest.find('"')?].to_string())
}

/// `Option<T>` -> `T`, `Vec<T>` -> `T` (with whether it was a Vec).
fn unwrap_type(ty: &str) -> (&str, bool) {
    if let Some(inner) = ty.strip_prefix("Option<").and_then(|t| t.strip_suffix('>')) {
        return (inner, false);
    }
    if let Some(inner) = ty.strip_prefix("Vec<").and_then(|t| t.strip_suffix('>')) {
        return (inner, true);
    }
    (ty, false)
}

fn type_name(ty: &str, sources: &Sources) -> String {
    let (base, list) = unwrap_type(ty);
    let one = match base {
        "Duration" => "duration".to_string(),
        "bool" => "boolean".to_string(),
        "String" => "string".to_string(),
        "PathBuf" => "path".to_string(),
        "IpAddr" => "IP address".to_string(),
        "SocketAddr" => "address:port".to_string(),
        "u8" | "u16" | "u32" | "u64" => "integer".to_string(),
        "f64" => "number".to_string(),
        "toml::Table" => "table".to_string(),
        other => match sources.enums.get(other) {
            Some(values) => values
                .iter()
                .map(|v| format!("`\"{v}\"`"))
                .collect::<Vec<_>>()
                .join(" or "),
            None => other.to_string(),
        },
    };
    if list {
        match base {
            "String" => "list of strings".to_string(),
            "toml::Table" => "array of tables".to_string(),
            _ => format!("list of {one}"),
        }
    } else {
        one
    }
}

/// Every key the source declares, in declaration order: (key, section, rust type, doc).
fn source_keys(sources: &Sources) -> Vec<(String, String, String, String)> {
    fn walk(
        sources: &Sources,
        name: &str,
        prefix: &str,
        section: &str,
        out: &mut Vec<(String, String, String, String)>,
    ) {
        let Some(s) = sources.structs.get(name) else {
            return;
        };
        for f in &s.fields {
            let (base, list) = unwrap_type(&f.ty);
            if sources.structs.contains_key(base) {
                let (p, sec) = if list {
                    (format!("{prefix}{}[].", f.name), format!("[{}]", f.name))
                } else {
                    let sec = if section.is_empty() {
                        f.name.clone()
                    } else {
                        format!("{section}.{}", f.name)
                    };
                    (format!("{prefix}{}.", f.name), sec)
                };
                walk(sources, base, &p, &sec, out);
            } else {
                out.push((
                    format!("{prefix}{}", f.name),
                    section.to_string(),
                    f.ty.clone(),
                    f.doc.clone(),
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(sources, "Config", "", "", &mut out);
    out
}

/// The section's own doc comment (the struct's), by section name.
fn section_docs(sources: &Sources) -> BTreeMap<String, String> {
    fn walk(sources: &Sources, name: &str, section: &str, out: &mut BTreeMap<String, String>) {
        let Some(s) = sources.structs.get(name) else {
            return;
        };
        out.insert(section.to_string(), s.doc.clone());
        for f in &s.fields {
            let (base, list) = unwrap_type(&f.ty);
            if sources.structs.contains_key(base) {
                let sec = if list {
                    format!("[{}]", f.name)
                } else if section.is_empty() {
                    f.name.clone()
                } else {
                    format!("{section}.{}", f.name)
                };
                walk(sources, base, &sec, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(sources, "Config", "", &mut out);
    out
}

fn minimal_table() -> toml::Table {
    MINIMAL.parse().expect("MINIMAL is valid TOML")
}

/// The configuration serde builds from the minimal document: every default in place.
pub fn defaults() -> Config {
    toml::Value::Table(minimal_table())
        .try_into()
        .expect("the minimal document deserializes")
}

/// Flattens a serialized config into dotted keys. An array of tables becomes
/// `name[i].key` (or `name[].key` with `index = false`); other arrays are values.
pub fn flatten(value: &Value, index: bool) -> Vec<(String, Value)> {
    fn go(v: &Value, prefix: &str, index: bool, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    match v {
                        Value::Object(_) => go(v, &key, index, out),
                        Value::Array(items)
                            if !items.is_empty() && items.iter().all(Value::is_object) =>
                        {
                            for (i, item) in items.iter().enumerate() {
                                let at = if index {
                                    format!("{key}[{i}]")
                                } else {
                                    format!("{key}[]")
                                };
                                go(item, &at, index, out);
                            }
                        }
                        _ => out.push((key, v.clone())),
                    }
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let mut out = Vec::new();
    go(value, "", index, &mut out);
    out
}

/// The default of every key serde writes, keyed like [`KeyDoc::key`].
pub fn serde_defaults() -> BTreeMap<String, Value> {
    let value = serde_json::to_value(defaults()).expect("config serializes");
    let mut map = BTreeMap::new();
    for (k, v) in flatten(&value, false) {
        map.entry(k).or_insert(v);
    }
    map
}

/// Keys of the minimal document that serde refuses to go without.
fn required_keys() -> BTreeSet<String> {
    let minimal = minimal_table();
    let mut required = BTreeSet::new();
    for (k, v) in &minimal {
        match v {
            toml::Value::Array(items) => {
                for field in items[0].as_table().expect("array of tables").keys() {
                    let mut doc = minimal.clone();
                    doc[k].as_array_mut().expect("array")[0]
                        .as_table_mut()
                        .expect("table")
                        .remove(field);
                    if toml::Value::Table(doc).try_into::<Config>().is_err() {
                        required.insert(format!("{k}[].{field}"));
                    }
                }
            }
            _ => {
                let mut doc = minimal.clone();
                doc.remove(k);
                if toml::Value::Table(doc).try_into::<Config>().is_err() {
                    required.insert(k.clone());
                }
            }
        }
    }
    required
}

/// A value as it is written in a TOML file.
pub fn toml_literal(v: &Value) -> String {
    match v {
        Value::Null => "unset".to_string(),
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(toml_literal)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Object(map) => format!(
            "{{ {} }}",
            map.iter()
                .map(|(k, v)| format!("{k} = {}", toml_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// Every key, in the order the code declares them.
pub fn keys() -> Vec<KeyDoc> {
    let sources = parse_sources();
    let defaults = serde_defaults();
    let required = required_keys();
    source_keys(&sources)
        .into_iter()
        .map(|(key, section, ty, doc)| {
            let is_required = required.contains(&key);
            let default = match defaults.get(&key) {
                _ if is_required => None,
                Some(Value::Null) | None => None,
                Some(v) => Some(toml_literal(v)),
            };
            KeyDoc {
                type_name: type_name(&ty, &sources),
                required: is_required,
                default,
                description: doc,
                key,
                section,
            }
        })
        .collect()
}

/// The keys the source declares, for the test that holds them against serde's.
pub fn documented_key_names() -> BTreeSet<String> {
    source_keys(&parse_sources())
        .into_iter()
        .map(|(k, ..)| k)
        .collect()
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// The reference as markdown (docs/config-reference.md).
pub fn markdown() -> String {
    let sources = parse_sources();
    let section_docs = section_docs(&sources);
    let mut out = String::new();
    out.push_str(
        "# vipsec configuration reference\n\n\
         <!-- Generated by `vipsec config reference` from agent/src/config/: edit the doc\n\
         comments there, then `cargo run -p vipsec -- config reference > docs/config-reference.md`.\n\
         A test fails while this file differs from what the code generates. -->\n\n\
         The agent reads one TOML file (`/etc/vipsec/agent.toml`; `vipsec agent --config FILE`).\n\
         Unknown keys are refused. Durations are written like `\"250ms\"`, `\"2s\"` or `\"5m\"`.\n\
         `vipsec config check FILE` prints every problem at once, each with its key;\n\
         `vipsec config show --effective FILE` prints every key with its value and default.\n\
         Keys of an array of tables are written `hosted_vip[].address`: one\n\
         `[[hosted_vip]]` table per VIP, each with its own `address`.\n",
    );
    let mut current: Option<String> = None;
    for k in keys() {
        if current.as_deref() != Some(k.section.as_str()) {
            // `[store]`, and `[[hosted_vip]]` for an array of tables (section `[hosted_vip]`).
            let title = if k.section.is_empty() {
                "Top level".to_string()
            } else {
                format!("`[{}]`", k.section)
            };
            out.push_str(&format!("\n## {title}\n\n"));
            if let Some(doc) = section_docs.get(&k.section).filter(|d| !d.is_empty()) {
                out.push_str(doc);
                out.push_str("\n\n");
            }
            out.push_str("| key | type | default | description |\n| --- | --- | --- | --- |\n");
            current = Some(k.section.clone());
        }
        let default = if k.required {
            "required".to_string()
        } else {
            match &k.default {
                Some(d) => format!("`{d}`"),
                None => "unset".to_string(),
            }
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            k.key,
            cell(&k.type_name),
            cell(&default),
            cell(&k.description)
        ));
    }
    out
}

/// One row of `vipsec config show`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EffectiveKey {
    pub key: String,
    pub value: String,
    /// `None` for a required key (it has no default).
    pub default: Option<String>,
    pub is_default: bool,
}

/// Every key of a loaded configuration with its value and its default; an array of
/// tables contributes one set of keys per element (`peer_vip[0].priority`).
pub fn effective(config: &Config) -> Vec<EffectiveKey> {
    let docs: BTreeMap<String, KeyDoc> = keys().into_iter().map(|k| (k.key.clone(), k)).collect();
    let value = serde_json::to_value(config).expect("config serializes");
    flatten(&value, true)
        .into_iter()
        .map(|(key, v)| {
            let generic = strip_indices(&key);
            let doc = docs.get(&generic);
            let value = toml_literal(&v);
            let default = match doc {
                Some(d) if d.required => None,
                Some(d) => Some(d.default.clone().unwrap_or_else(|| "unset".into())),
                None => Some("unset".into()),
            };
            let is_default = default.as_deref() == Some(value.as_str());
            EffectiveKey {
                key,
                value,
                default,
                is_default,
            }
        })
        .collect()
}

/// `peer_vip[3].priority` -> `peer_vip[].priority`.
fn strip_indices(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut in_index = false;
    for c in key.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_serde_writes_is_documented_and_nothing_else() {
        let from_source = documented_key_names();
        let from_serde: BTreeSet<String> = serde_defaults().into_keys().collect();
        assert_eq!(
            from_source, from_serde,
            "the keys read from config/ and the keys serde writes differ"
        );
        // A key list that is not vacuous: sections, arrays of tables and renames are seen.
        for k in [
            "node",
            "store.lease_ttl",
            "failover.reconnect.jitter",
            "peer_vip[].priority",
            "hosted_vip[].protect",
            "policy.document",
            "drill.target",
        ] {
            assert!(from_source.contains(k), "{k} missing");
        }
    }

    #[test]
    fn every_key_has_a_description_and_a_type() {
        for k in keys() {
            assert!(!k.description.is_empty(), "{} has no doc comment", k.key);
            assert!(!k.type_name.is_empty(), "{}", k.key);
        }
    }

    #[test]
    fn what_serde_writes_it_reads_back_with_unknown_keys_refused() {
        let text = toml::to_string(&defaults()).unwrap();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(
            serde_json::to_value(back).unwrap(),
            serde_json::to_value(defaults()).unwrap()
        );
    }

    #[test]
    fn defaults_types_and_required_keys_come_from_the_code() {
        let k: BTreeMap<String, KeyDoc> = keys().into_iter().map(|k| (k.key.clone(), k)).collect();
        assert!(k["node"].required);
        assert!(k["peer_vip[].address"].required);
        assert!(!k["peer_vip[].connection"].required);
        assert_eq!(
            k["keying.initiate_timeout"].default.as_deref(),
            Some("\"1s\"")
        );
        assert_eq!(k["keying.initiate_timeout"].type_name, "duration");
        assert_eq!(k["peer_vip[].priority"].default.as_deref(), Some("50"));
        assert_eq!(k["kernel.libipsec"].default, None);
        assert_eq!(
            k["store.endpoints"].default.as_deref(),
            Some("[\"http://127.0.0.1:2379\"]")
        );
        assert_eq!(k["store.backend"].type_name, "`\"embedded\"` or `\"etcd\"`");
        assert_eq!(k["failover.mode"].type_name, "`\"normal\"` or `\"fast\"`");
        assert_eq!(k["failover.reconnect.jitter"].section, "failover.reconnect");
        assert_eq!(k["hosted_vip[].protect"].section, "[hosted_vip]");
    }

    #[test]
    fn effective_lists_every_element_with_its_default() {
        let c = Config::parse(
            "node = \"fe1\"\n[kernel]\nfail_secure = false\n[[peer_vip]]\naddress = \"192.0.2.1\"\nconnection = \"a\"\n[[peer_vip]]\naddress = \"192.0.2.2\"\nconnection = \"b\"\npriority = 90\n",
        )
        .unwrap();
        let rows = effective(&c);
        let get = |key: &str| rows.iter().find(|r| r.key == key).unwrap().clone();
        assert_eq!(get("peer_vip[0].priority").value, "50");
        assert!(get("peer_vip[0].priority").is_default);
        assert_eq!(get("peer_vip[1].priority").value, "90");
        assert!(!get("peer_vip[1].priority").is_default);
        assert_eq!(get("kernel.fail_secure").default.as_deref(), Some("true"));
        assert_eq!(get("node").default, None);
        assert_eq!(get("kernel.interface").value, "unset");
        assert!(rows.iter().any(|r| r.key == "failover.reconnect.rate"));
    }
}
