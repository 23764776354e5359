//! A small nftables evaluator: sends one imagined packet (IKE, NAT-T or ESP, first packet of
//! its flow) through the base chains of a ruleset read from `nft -j list ruleset`, and says
//! whether it gets through, where it is dropped, or on what that depends.
//!
//! Every rule that may or may not apply (an interface or address match, a mark, a rate
//! limit, an expression this module does not understand) forks the walk: one path where it
//! applies, one where it does not. A packet is "accepted" only when every path accepts it,
//! "dropped" when some base chain drops it on every path, and "uncertain" otherwise, with
//! the doubtful rules named. So a rule it cannot read never turns into a silent pass.
//!
//! Modelled: base chains of the ip, ip6 and inet families on prerouting + input (inbound)
//! and output + postrouting (outbound) in priority order; jump/goto/return; accept, drop,
//! reject, continue; the chain policy; verdict maps; anonymous and named sets, ranges,
//! prefixes; `meta l4proto|nfproto|protocol|iifname|oifname|iif|oif|secpath`, `ip
//! protocol|saddr|daddr`, `ip6 nexthdr|saddr|daddr`, `udp|th sport|dport`, other transport
//! headers (absent on these packets), `ct state` (the probe is the first packet: `new`);
//! counter, log, mangle and notrack statements.
//! Not modelled (each a doubt, named in the finding): marks, other `meta`/`ct` keys, `fib`,
//! rate limits and quotas, `numgen`, `socket`, `osf`, raw payloads, IPv6 extension headers,
//! iptables-nft `xt` matches, concatenations, bitwise expressions; queue and NAT statements
//! end the walk undecided. Families netdev and bridge are listed, not walked. An unknown
//! interface is assumed not to be loopback (IKE between nodes never uses it).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use serde_json::Value;

/// Paths explored per base chain before the walk gives up (a ruleset with that many
/// interface- or address-dependent rules on one path is beyond a preflight check).
const MAX_PATHS: usize = 4096;
/// nftables itself refuses jumps nested deeper than this.
const MAX_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("not nftables JSON: {0}")]
    Json(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// Which way the packet goes: to this host (prerouting, input) or from it (output,
/// postrouting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn hooks(self) -> [&'static str; 2] {
        match self {
            Direction::Inbound => ["prerouting", "input"],
            Direction::Outbound => ["output", "postrouting"],
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Udp { sport: u16, dport: u16 },
    Esp,
}

const PROTO_UDP: u64 = 17;
const PROTO_ESP: u64 = 50;

impl L4 {
    fn proto(self) -> u64 {
        match self {
            L4::Udp { .. } => PROTO_UDP,
            L4::Esp => PROTO_ESP,
        }
    }

    /// The match an operator adds to let this packet through.
    pub fn nft_match(self) -> String {
        match self {
            L4::Udp { dport, .. } => format!("udp dport {dport}"),
            L4::Esp => "meta l4proto esp".into(),
        }
    }
}

/// The packet sent through the ruleset. Unknown addresses and interface make matches on
/// them "may match".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub family: IpFamily,
    pub direction: Direction,
    pub l4: L4,
    pub saddr: Option<IpAddr>,
    pub daddr: Option<IpAddr>,
    pub iface: Option<String>,
}

impl Probe {
    pub fn new(family: IpFamily, direction: Direction, l4: L4) -> Probe {
        Probe {
            family,
            direction,
            l4,
            saddr: None,
            daddr: None,
            iface: None,
        }
    }
}

/// A rule (or a chain's policy, `handle = None`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Place {
    pub family: String,
    pub table: String,
    pub chain: String,
    pub handle: Option<u64>,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.handle {
            Some(h) => write!(
                f,
                "table {} {} chain {} handle {h}",
                self.family, self.table, self.chain
            ),
            None => write!(
                f,
                "table {} {} chain {} policy",
                self.family, self.table, self.chain
            ),
        }
    }
}

/// A rule the walk could not decide, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doubt {
    pub place: Place,
    pub reason: String,
    /// Whether this path assumed the rule applies.
    pub assumed_match: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Accept,
    Drop {
        at: Place,
    },
    /// The packet's fate is decided by something the evaluator does not model (a queue to
    /// userspace, a NAT rewrite, a verdict map on an unknown key, too many paths).
    Unknown {
        at: Place,
        why: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    pub end: End,
    pub doubts: Vec<Doubt>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every path through every base chain accepts it (or no base chain sees it).
    Accepted,
    /// A base chain drops it on every path; `at` is where, on the path where none of the
    /// doubtful rules apply.
    Dropped { at: Place },
    /// It depends: the paths that do not accept it, with their doubts.
    Uncertain { paths: Vec<Path> },
}

#[derive(Debug, Clone)]
struct BaseHook {
    hook: String,
    prio: i64,
    policy_drop: bool,
}

#[derive(Debug, Clone)]
struct Rule {
    handle: u64,
    exprs: Vec<Value>,
}

#[derive(Debug, Clone)]
struct Chain {
    family: String,
    table: String,
    name: String,
    base: Option<BaseHook>,
    rules: Vec<Rule>,
}

/// A ruleset as `nft -j list ruleset` prints it.
#[derive(Debug, Clone, Default)]
pub struct Ruleset {
    chains: Vec<Chain>,
    /// Named sets' elements by (family, table, name).
    sets: HashMap<(String, String, String), Vec<Value>>,
    /// Rule texts from `nft -a list ruleset`, by place.
    texts: HashMap<Place, String>,
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn named_priority(name: &str) -> Option<i64> {
    Some(match name {
        "raw" => -300,
        "mangle" => -150,
        "dstnat" => -100,
        "filter" => 0,
        "security" => 50,
        "srcnat" => 100,
        _ => return None,
    })
}

impl Ruleset {
    pub fn from_json(text: &str) -> Result<Ruleset, NftError> {
        let root: Value = serde_json::from_str(text).map_err(|e| NftError::Json(e.to_string()))?;
        let items = root
            .get("nftables")
            .and_then(Value::as_array)
            .ok_or_else(|| NftError::Json("no \"nftables\" array".into()))?;
        let mut rs = Ruleset::default();
        let mut rules = Vec::new();
        for item in items {
            if let Some(c) = item.get("chain") {
                let base = c.get("hook").and_then(Value::as_str).map(|hook| BaseHook {
                    hook: hook.to_string(),
                    prio: match c.get("prio") {
                        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
                        Some(Value::String(s)) => named_priority(s).unwrap_or(0),
                        _ => 0,
                    },
                    policy_drop: str_of(c, "policy") == "drop",
                });
                rs.chains.push(Chain {
                    family: str_of(c, "family").into(),
                    table: str_of(c, "table").into(),
                    name: str_of(c, "name").into(),
                    base,
                    rules: Vec::new(),
                });
            } else if let Some(s) = item.get("set").or_else(|| item.get("map")) {
                let elems = s
                    .get("elem")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                rs.sets.insert(
                    (
                        str_of(s, "family").into(),
                        str_of(s, "table").into(),
                        str_of(s, "name").into(),
                    ),
                    elems,
                );
            } else if let Some(r) = item.get("rule") {
                rules.push(r.clone());
            }
        }
        for r in rules {
            let (fam, table, chain) = (
                str_of(&r, "family"),
                str_of(&r, "table"),
                str_of(&r, "chain"),
            );
            if let Some(c) = rs
                .chains
                .iter_mut()
                .find(|c| c.family == fam && c.table == table && c.name == chain)
            {
                c.rules.push(Rule {
                    handle: r.get("handle").and_then(Value::as_u64).unwrap_or(0),
                    exprs: r
                        .get("expr")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default(),
                });
            }
        }
        Ok(rs)
    }

    /// Adds rule texts from `nft -a list ruleset` (lines ending in `# handle N`), so that
    /// findings quote rules as the operator wrote them.
    pub fn with_listing(mut self, listing: &str) -> Ruleset {
        let (mut family, mut table, mut chain) = (String::new(), String::new(), None::<String>);
        for line in listing.lines() {
            let t = line.trim();
            let words: Vec<&str> = t.split_whitespace().collect();
            match words.as_slice() {
                ["table", fam, name, ..] => {
                    family = fam.to_string();
                    table = name.to_string();
                    chain = None;
                }
                ["chain", name, ..] => chain = Some(name.to_string()),
                ["set" | "map" | "flowtable", ..] => chain = None,
                _ => {
                    let Some(c) = &chain else { continue };
                    let Some((text, handle)) = t.rsplit_once(" # handle ") else {
                        continue;
                    };
                    let Ok(handle) = handle.trim().parse() else {
                        continue;
                    };
                    self.texts.insert(
                        Place {
                            family: family.clone(),
                            table: table.clone(),
                            chain: c.clone(),
                            handle: Some(handle),
                        },
                        text.trim().to_string(),
                    );
                }
            }
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// The rule's text: from the listing when given, else its JSON expressions.
    pub fn rule_text(&self, place: &Place) -> String {
        if let Some(t) = self.texts.get(place) {
            return t.clone();
        }
        let Some(h) = place.handle else {
            return "policy".into();
        };
        self.chains
            .iter()
            .find(|c| c.family == place.family && c.table == place.table && c.name == place.chain)
            .and_then(|c| c.rules.iter().find(|r| r.handle == h))
            .map(|r| Value::Array(r.exprs.clone()).to_string())
            .unwrap_or_default()
    }

    /// Base chains in families this ruleset has that the evaluator does not walk
    /// (netdev ingress, bridge): they can drop packets too.
    pub fn unwalked_base_chains(&self) -> Vec<String> {
        self.chains
            .iter()
            .filter(|c| c.base.is_some() && !["ip", "ip6", "inet"].contains(&c.family.as_str()))
            .map(|c| format!("table {} {} chain {}", c.family, c.table, c.name))
            .collect()
    }

    /// The base chains a probe passes, in the order the kernel runs them.
    fn base_chains(&self, probe: &Probe) -> Vec<usize> {
        let fam_ok = |f: &str| match probe.family {
            IpFamily::V4 => f == "ip" || f == "inet",
            IpFamily::V6 => f == "ip6" || f == "inet",
        };
        let mut out = Vec::new();
        for hook in probe.direction.hooks() {
            let mut on_hook: Vec<usize> = self
                .chains
                .iter()
                .enumerate()
                .filter(|(_, c)| {
                    fam_ok(&c.family) && c.base.as_ref().is_some_and(|b| b.hook == hook)
                })
                .map(|(i, _)| i)
                .collect();
            // Stable: chains of equal priority keep the listing's order.
            on_hook.sort_by_key(|&i| self.chains[i].base.as_ref().map_or(0, |b| b.prio));
            out.extend(on_hook);
        }
        out
    }

    /// Sends the probe through every base chain on its way.
    pub fn evaluate(&self, probe: &Probe) -> Outcome {
        let mut uncertain = Vec::new();
        for ci in self.base_chains(probe) {
            let paths = self.walk_base(probe, ci);
            if paths.iter().all(|p| matches!(p.end, End::Drop { .. })) {
                let End::Drop { at } = &paths[0].end else {
                    unreachable!()
                };
                return Outcome::Dropped { at: at.clone() };
            }
            uncertain.extend(paths.into_iter().filter(|p| p.end != End::Accept));
        }
        if uncertain.is_empty() {
            Outcome::Accepted
        } else {
            Outcome::Uncertain { paths: uncertain }
        }
    }

    fn place(&self, ci: usize, handle: Option<u64>) -> Place {
        let c = &self.chains[ci];
        Place {
            family: c.family.clone(),
            table: c.table.clone(),
            chain: c.name.clone(),
            handle,
        }
    }

    fn find_chain(&self, from: usize, name: &str) -> Option<usize> {
        let c = &self.chains[from];
        self.chains
            .iter()
            .position(|o| o.family == c.family && o.table == c.table && o.name == name)
    }

    fn walk_base(&self, probe: &Probe, base: usize) -> Vec<Path> {
        let mut out = Vec::new();
        let start = Walk {
            chain: base,
            rule: 0,
            expr: 0,
            stack: Vec::new(),
            doubts: Vec::new(),
        };
        self.walk(probe, base, start, &mut out);
        out
    }

    /// Runs one path from `w` to its end, forking at each undecided rule.
    fn walk(&self, probe: &Probe, base: usize, mut w: Walk, out: &mut Vec<Path>) {
        loop {
            if out.len() >= MAX_PATHS {
                out.push(Path {
                    end: End::Unknown {
                        at: self.place(base, None),
                        why: format!("more than {MAX_PATHS} possible paths"),
                    },
                    doubts: w.doubts,
                });
                return;
            }
            let chain = &self.chains[w.chain];
            let Some(rule) = chain.rules.get(w.rule) else {
                // End of chain: back to the caller, or the base chain's policy.
                match w.stack.pop() {
                    Some((c, r)) => {
                        w.chain = c;
                        w.rule = r;
                        w.expr = 0;
                        continue;
                    }
                    None => return self.policy(base, w, out),
                }
            };
            let here = self.place(w.chain, Some(rule.handle));
            let Some(expr) = rule.exprs.get(w.expr) else {
                // The rule ran to its end without a verdict.
                w.next_rule();
                continue;
            };
            match self.step(probe, w.chain, expr) {
                Step::Next => w.expr += 1,
                Step::NoMatch => w.next_rule(),
                Step::Maybe(reason) => {
                    let mut skip = w.clone();
                    skip.doubts.push(Doubt {
                        place: here.clone(),
                        reason: reason.clone(),
                        assumed_match: false,
                    });
                    skip.next_rule();
                    // The path where the doubtful rule does not apply goes first, so the
                    // first path is the one that assumes nothing matches that may not.
                    self.walk(probe, base, skip, out);
                    w.doubts.push(Doubt {
                        place: here,
                        reason,
                        assumed_match: true,
                    });
                    w.expr += 1;
                }
                Step::Accept => {
                    out.push(Path {
                        end: End::Accept,
                        doubts: w.doubts,
                    });
                    return;
                }
                Step::Drop => {
                    out.push(Path {
                        end: End::Drop { at: here },
                        doubts: w.doubts,
                    });
                    return;
                }
                Step::Unknown(why) => {
                    out.push(Path {
                        end: End::Unknown { at: here, why },
                        doubts: w.doubts,
                    });
                    return;
                }
                Step::Return => match w.stack.pop() {
                    Some((c, r)) => {
                        w.chain = c;
                        w.rule = r;
                        w.expr = 0;
                    }
                    None => return self.policy(base, w, out),
                },
                Step::Jump(target, _) if w.stack.len() >= MAX_DEPTH => {
                    out.push(Path {
                        end: End::Unknown {
                            at: here,
                            why: format!("jump to {target} nested too deep"),
                        },
                        doubts: w.doubts,
                    });
                    return;
                }
                Step::Jump(target, jump) => {
                    let Some(t) = self.find_chain(w.chain, &target) else {
                        out.push(Path {
                            end: End::Unknown {
                                at: here,
                                why: format!("jump to a chain {target} that is not listed"),
                            },
                            doubts: w.doubts,
                        });
                        return;
                    };
                    if jump {
                        w.stack.push((w.chain, w.rule + 1));
                    }
                    w.chain = t;
                    w.rule = 0;
                    w.expr = 0;
                }
            }
        }
    }

    fn policy(&self, base: usize, w: Walk, out: &mut Vec<Path>) {
        let drop = self.chains[base]
            .base
            .as_ref()
            .is_some_and(|b| b.policy_drop);
        out.push(Path {
            end: if drop {
                End::Drop {
                    at: self.place(base, None),
                }
            } else {
                End::Accept
            },
            doubts: w.doubts,
        });
    }

    /// What one expression of a rule does to the probe.
    fn step(&self, probe: &Probe, chain: usize, expr: &Value) -> Step {
        let Some((key, body)) = expr.as_object().and_then(|o| o.iter().next()) else {
            return Step::Maybe(format!("expression {expr} not understood"));
        };
        match key.as_str() {
            "match" => match self.match_expr(probe, chain, body) {
                Tri::Yes => Step::Next,
                Tri::No => Step::NoMatch,
                Tri::Maybe(r) => Step::Maybe(r),
            },
            // Statements that never change the verdict.
            "counter" | "log" | "mangle" | "notrack" => Step::Next,
            "limit" | "quota" => Step::Maybe(format!("{key} (rate/quota dependent)")),
            "accept" => Step::Accept,
            "drop" | "reject" => Step::Drop,
            "continue" => Step::Next,
            "return" => Step::Return,
            "jump" | "goto" => Step::Jump(str_of(body, "target").to_string(), key == "jump"),
            "vmap" => self.vmap(probe, chain, body),
            "queue" => Step::Unknown("queued to a userspace program".into()),
            "snat" | "dnat" | "masquerade" | "redirect" => {
                Step::Unknown(format!("{key} rewrites the packet"))
            }
            other => Step::Maybe(format!("statement {other:?} not understood")),
        }
    }

    fn vmap(&self, probe: &Probe, chain: usize, body: &Value) -> Step {
        let field = match body.get("key").map(|k| field(probe, k)) {
            Some(Field::Value(v)) => v,
            Some(Field::Absent) => return Step::NoMatch,
            Some(Field::Maybe(r)) => return Step::Unknown(format!("verdict map on {r}")),
            None => return Step::Unknown("verdict map without a key".into()),
        };
        let entries = match body.get("data") {
            Some(Value::Object(o)) if o.contains_key("set") => {
                o["set"].as_array().cloned().unwrap_or_default()
            }
            Some(Value::String(s)) if s.starts_with('@') => self.set_elems(chain, &s[1..]),
            _ => return Step::Unknown("verdict map not understood".into()),
        };
        for e in entries {
            let Some(pair) = e.as_array().filter(|p| p.len() == 2) else {
                return Step::Unknown("verdict map entry not understood".into());
            };
            match elem_matches(&field, &pair[0]) {
                Some(true) => return self.step(probe, chain, &pair[1]),
                Some(false) => {}
                None => {
                    return Step::Unknown(format!("verdict map key {} not understood", pair[0]));
                }
            }
        }
        Step::NoMatch
    }

    fn set_elems(&self, chain: usize, name: &str) -> Vec<Value> {
        let c = &self.chains[chain];
        self.sets
            .get(&(c.family.clone(), c.table.clone(), name.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    fn match_expr(&self, probe: &Probe, chain: usize, m: &Value) -> Tri {
        let op = str_of(m, "op");
        let (Some(left), Some(right)) = (m.get("left"), m.get("right")) else {
            return Tri::Maybe(format!("match {m} not understood"));
        };
        let value = match field(probe, left) {
            Field::Absent => return Tri::No,
            Field::Maybe(r) => return Tri::Maybe(r),
            Field::Value(v) => v,
        };
        let equal = match right {
            Value::String(s) if s.starts_with('@') => {
                let elems = self.set_elems(chain, &s[1..]);
                any_elem(&value, &elems)
            }
            Value::Object(o) if o.contains_key("set") => any_elem(
                &value,
                o["set"].as_array().map(Vec::as_slice).unwrap_or(&[]),
            ),
            Value::Array(a) => any_elem(&value, a),
            other => elem_matches(&value, other),
        };
        let Some(equal) = equal else {
            if let Val::NotLoopback(key) = &value {
                return Tri::Maybe(format!("depends on the interface (meta {key})"));
            }
            return Tri::Maybe(format!("{left} {op} {right} not understood"));
        };
        match op {
            "==" | "in" => Tri::from(equal),
            "!=" => Tri::from(!equal),
            "<" | ">" | "<=" | ">=" => match (&value, right.as_u64()) {
                (Val::Num(a), Some(b)) => Tri::from(match op {
                    "<" => *a < b,
                    ">" => *a > b,
                    "<=" => *a <= b,
                    _ => *a >= b,
                }),
                _ => Tri::Maybe(format!("{left} {op} {right} not understood")),
            },
            other => Tri::Maybe(format!("operator {other:?} not understood")),
        }
    }
}

#[derive(Debug, Clone)]
struct Walk {
    chain: usize,
    rule: usize,
    expr: usize,
    /// Where to come back after a `jump`: (chain, next rule).
    stack: Vec<(usize, usize)>,
    doubts: Vec<Doubt>,
}

impl Walk {
    fn next_rule(&mut self) {
        self.rule += 1;
        self.expr = 0;
    }
}

enum Step {
    Next,
    NoMatch,
    Maybe(String),
    Accept,
    Drop,
    Return,
    /// To a chain; `true` for `jump` (comes back), `false` for `goto`.
    Jump(String, bool),
    Unknown(String),
}

#[derive(Debug, PartialEq, Eq)]
enum Tri {
    Yes,
    No,
    Maybe(String),
}

impl From<bool> for Tri {
    fn from(b: bool) -> Tri {
        if b { Tri::Yes } else { Tri::No }
    }
}

/// A packet field's value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Val {
    Num(u64),
    /// An IP protocol number (matched by number or name).
    Proto(u64),
    Str(String),
    Addr(IpAddr),
    Bool(bool),
    /// An interface not known, but not loopback (the `meta` key it came from).
    NotLoopback(String),
    /// `ct state` of the first packet of a flow.
    CtNew,
    Family(IpFamily),
}

enum Field {
    Value(Val),
    /// The packet has no such field (a `tcp dport` on a UDP packet): the match fails,
    /// whatever the operator, like nftables' implicit protocol dependency.
    Absent,
    Maybe(String),
}

fn field(probe: &Probe, left: &Value) -> Field {
    if let Some(meta) = left.get("meta") {
        let key = str_of(meta, "key");
        return match key {
            "l4proto" => Field::Value(Val::Proto(probe.l4.proto())),
            "nfproto" | "protocol" => Field::Value(Val::Family(probe.family)),
            "iifname" | "oifname" | "iif" | "oif" => {
                let applies = match probe.direction {
                    Direction::Inbound => key.starts_with('i'),
                    Direction::Outbound => key.starts_with('o'),
                };
                match (&probe.iface, applies) {
                    (Some(i), true) => Field::Value(Val::Str(i.clone())),
                    // IKE, NAT-T and ESP between nodes never use loopback: an
                    // `iif lo accept` does not let them in, whatever else is unknown.
                    (None, true) => Field::Value(Val::NotLoopback(key.to_string())),
                    (_, false) => Field::Maybe(format!("depends on meta {key}")),
                }
            }
            // IKE, NAT-T and ESP packets on the wire have not been through IPsec yet.
            "secpath" => Field::Value(Val::Bool(false)),
            other => Field::Maybe(format!("depends on meta {other}")),
        };
    }
    if let Some(ct) = left.get("ct") {
        return match (str_of(ct, "key"), ct.get("dir")) {
            ("state", None) => Field::Value(Val::CtNew),
            (key, _) => Field::Maybe(format!("depends on ct {key}")),
        };
    }
    if let Some(p) = left.get("payload") {
        let (proto, field) = (str_of(p, "protocol"), str_of(p, "field"));
        return match proto {
            "ip" | "ip6" => {
                let fam = if proto == "ip" {
                    IpFamily::V4
                } else {
                    IpFamily::V6
                };
                if probe.family != fam {
                    return Field::Absent;
                }
                match field {
                    "protocol" | "nexthdr" => Field::Value(Val::Proto(probe.l4.proto())),
                    "saddr" | "daddr" => {
                        let a = if field == "saddr" {
                            probe.saddr
                        } else {
                            probe.daddr
                        };
                        match a {
                            Some(a) => Field::Value(Val::Addr(a)),
                            None => {
                                Field::Maybe(format!("depends on the address ({proto} {field})"))
                            }
                        }
                    }
                    other => Field::Maybe(format!("depends on {proto} {other}")),
                }
            }
            "udp" | "th" => match (probe.l4, field) {
                (L4::Udp { sport, .. }, "sport") => Field::Value(Val::Num(sport.into())),
                (L4::Udp { dport, .. }, "dport") => Field::Value(Val::Num(dport.into())),
                (L4::Udp { .. }, other) => Field::Maybe(format!("depends on {proto} {other}")),
                // `th` reads the first bytes after the IP header whatever the protocol: in
                // ESP that is the SPI.
                (L4::Esp, _) if proto == "th" => {
                    Field::Maybe(format!("th {field} reads the ESP SPI"))
                }
                (L4::Esp, _) => Field::Absent,
            },
            "esp" => match probe.l4 {
                L4::Esp => Field::Maybe(format!("depends on esp {field}")),
                _ => Field::Absent,
            },
            "tcp" | "sctp" | "dccp" | "udplite" | "icmp" | "icmpv6" | "ah" | "comp" | "igmp" => {
                Field::Absent
            }
            _ => Field::Maybe(format!("payload {p} not understood")),
        };
    }
    if left.get("fib").is_some() {
        return Field::Maybe("depends on routing (fib)".into());
    }
    Field::Maybe(format!("{left} not understood"))
}

fn any_elem(v: &Val, elems: &[Value]) -> Option<bool> {
    let mut any = false;
    for e in elems {
        any |= elem_matches(v, e)?;
    }
    Some(any)
}

fn proto_number(name: &str) -> Option<u64> {
    Some(match name {
        "icmp" => 1,
        "igmp" => 2,
        "tcp" => 6,
        "udp" => 17,
        "gre" => 47,
        "esp" => 50,
        "ah" => 51,
        "icmpv6" | "ipv6-icmp" => 58,
        "sctp" => 132,
        "udplite" => 136,
        _ => return None,
    })
}

fn service_port(name: &str) -> Option<u64> {
    Some(match name {
        "isakmp" => 500,
        "ipsec-nat-t" => 4500,
        "ssh" => 22,
        "domain" => 53,
        "http" => 80,
        "https" => 443,
        _ => return None,
    })
}

/// Whether one set element, value, range or prefix contains `v`; None when not understood.
fn elem_matches(v: &Val, e: &Value) -> Option<bool> {
    if let Some(inner) = e.get("elem") {
        return elem_matches(v, inner.get("val")?);
    }
    if let Some(r) = e.get("range").and_then(Value::as_array) {
        let (lo, hi) = (r.first()?, r.get(1)?);
        return match v {
            Val::Num(n) | Val::Proto(n) => Some(num(v, lo)? <= *n && *n <= num(v, hi)?),
            Val::Addr(a) => {
                let (lo, hi): (IpAddr, IpAddr) =
                    (lo.as_str()?.parse().ok()?, hi.as_str()?.parse().ok()?);
                Some(lo <= *a && *a <= hi)
            }
            _ => None,
        };
    }
    if let Some(p) = e.get("prefix") {
        let Val::Addr(a) = v else { return None };
        let net: ipnet::IpNet = format!("{}/{}", str_of(p, "addr"), p.get("len")?.as_u64()?)
            .parse()
            .ok()?;
        return Some(net.contains(a));
    }
    match v {
        Val::Num(n) | Val::Proto(n) => Some(num(v, e)? == *n),
        Val::Str(s) => Some(e.as_str()? == s),
        Val::NotLoopback(_) => (e.as_str()? == "lo").then_some(false),
        Val::Bool(b) => Some(e.as_bool()? == *b),
        Val::Addr(a) => Some(e.as_str()?.parse::<IpAddr>().ok()? == *a),
        Val::CtNew => {
            let s = e.as_str()?;
            matches!(
                s,
                "new" | "established" | "related" | "invalid" | "untracked"
            )
            .then_some(s == "new")
        }
        Val::Family(f) => match e {
            Value::String(s) => match s.as_str() {
                "ipv4" | "ip" => Some(*f == IpFamily::V4),
                "ipv6" | "ip6" => Some(*f == IpFamily::V6),
                _ => None,
            },
            Value::Number(n) => match n.as_u64()? {
                2 | 0x0800 => Some(*f == IpFamily::V4),
                10 | 0x86dd => Some(*f == IpFamily::V6),
                _ => Some(false),
            },
            _ => None,
        },
    }
}

/// An element as a number in `v`'s domain (protocol names, service names).
fn num(v: &Val, e: &Value) -> Option<u64> {
    match e {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => match v {
            Val::Proto(_) => proto_number(s),
            _ => service_port(s).or_else(|| s.parse().ok()),
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    //! Rulesets captured from real `nft -j list ruleset` (see fixtures/capture.sh).

    use super::*;

    const IKE: L4 = L4::Udp {
        sport: 500,
        dport: 500,
    };
    const NATT: L4 = L4::Udp {
        sport: 4500,
        dport: 4500,
    };

    fn fixture(name: &str) -> Ruleset {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/doctor/fixtures/");
        let json = std::fs::read_to_string(format!("{dir}{name}.json")).unwrap();
        let text = std::fs::read_to_string(format!("{dir}{name}.txt")).unwrap();
        Ruleset::from_json(&json).unwrap().with_listing(&text)
    }

    fn eval(rs: &Ruleset, family: IpFamily, direction: Direction, l4: L4) -> Outcome {
        rs.evaluate(&Probe::new(family, direction, l4))
    }

    fn v4_in(rs: &Ruleset, l4: L4) -> Outcome {
        eval(rs, IpFamily::V4, Direction::Inbound, l4)
    }

    fn dropped_at(o: &Outcome) -> (String, Option<u64>) {
        match o {
            Outcome::Dropped { at } => (at.chain.clone(), at.handle),
            other => panic!("expected a drop, got {other:?}"),
        }
    }

    #[test]
    fn accept_all_lets_everything_through_both_ways() {
        let rs = fixture("accept_all");
        for dir in [Direction::Inbound, Direction::Outbound] {
            for fam in [IpFamily::V4, IpFamily::V6] {
                for l4 in [IKE, NATT, L4::Esp] {
                    assert_eq!(eval(&rs, fam, dir, l4), Outcome::Accepted);
                }
            }
        }
    }

    #[test]
    fn input_policy_drop_with_only_ike_accepted_drops_natt_and_esp() {
        let rs = fixture("ike_only");
        // `iifname "lo" accept` comes first; IKE between nodes never comes over loopback.
        assert_eq!(v4_in(&rs, IKE), Outcome::Accepted);
        for l4 in [NATT, L4::Esp] {
            assert_eq!(dropped_at(&v4_in(&rs, l4)), ("input".into(), None));
        }
        // On a known interface too.
        let mut p = Probe::new(IpFamily::V4, Direction::Inbound, NATT);
        p.iface = Some("eth0".into());
        assert_eq!(dropped_at(&rs.evaluate(&p)), ("input".into(), None));
        p.iface = Some("lo".into());
        assert_eq!(rs.evaluate(&p), Outcome::Accepted);
    }

    #[test]
    fn a_jump_into_a_chain_that_drops_natt_is_found_with_its_rule_text() {
        let rs = fixture("jump_drop_natt");
        let o = v4_in(&rs, NATT);
        let Outcome::Dropped { at } = &o else {
            panic!("{o:?}")
        };
        assert_eq!((at.chain.as_str(), at.handle.is_some()), ("checks", true));
        assert!(rs.rule_text(at).starts_with("udp dport 4500 log prefix"));
        // The chain returns for everything else, and the base chain accepts.
        assert_eq!(v4_in(&rs, IKE), Outcome::Accepted);
        assert_eq!(v4_in(&rs, L4::Esp), Outcome::Accepted);
    }

    #[test]
    fn established_accept_does_not_let_the_first_packet_in() {
        let rs = fixture("ct_established");
        for l4 in [IKE, NATT, L4::Esp] {
            assert_eq!(dropped_at(&v4_in(&rs, l4)), ("input".into(), None));
        }
    }

    #[test]
    fn anonymous_and_named_sets_match_their_elements() {
        let rs = fixture("set_ike_natt");
        assert_eq!(v4_in(&rs, IKE), Outcome::Accepted);
        assert_eq!(v4_in(&rs, NATT), Outcome::Accepted);
        // ESP is not in the set; `tcp dport != 22` does not apply to it (not TCP), so the
        // policy drops it.
        assert_eq!(dropped_at(&v4_in(&rs, L4::Esp)), ("input".into(), None));
        for l4 in [IKE, NATT, L4::Esp] {
            assert_eq!(
                eval(&rs, IpFamily::V6, Direction::Outbound, l4),
                Outcome::Accepted
            );
        }
    }

    #[test]
    fn an_expression_not_understood_is_a_doubt_never_a_pass() {
        let rs = fixture("unknown_expr");
        match v4_in(&rs, NATT) {
            Outcome::Uncertain { paths } => {
                assert_eq!(paths.len(), 1);
                let Path { end, doubts } = &paths[0];
                let End::Drop { at } = end else {
                    panic!("{end:?}")
                };
                assert!(rs.rule_text(at).contains("numgen random"));
                assert!(doubts[0].reason.contains("numgen"), "{doubts:?}");
                assert!(doubts[0].assumed_match);
            }
            other => panic!("{other:?}"),
        }
        // IKE never reaches the unknown expression: the dport match already fails.
        assert_eq!(v4_in(&rs, IKE), Outcome::Accepted);
    }

    #[test]
    fn ip_and_ip6_tables_only_see_their_family() {
        let rs = fixture("families");
        for l4 in [IKE, NATT, L4::Esp] {
            assert_eq!(v4_in(&rs, l4), Outcome::Accepted);
            let o = eval(&rs, IpFamily::V6, Direction::Inbound, l4);
            let Outcome::Dropped { at } = o else {
                panic!("{o:?}")
            };
            assert_eq!((at.family.as_str(), at.table.as_str()), ("ip6", "t6"));
        }
    }

    #[test]
    fn output_hook_drops_are_found_and_input_is_untouched() {
        let rs = fixture("output_drop");
        let out = |l4| eval(&rs, IpFamily::V4, Direction::Outbound, l4);
        assert!(dropped_at(&out(NATT)).1.is_some());
        assert!(dropped_at(&out(L4::Esp)).1.is_some());
        assert_eq!(out(IKE), Outcome::Accepted);
        // `ip protocol esp` does not apply to IPv6.
        assert_eq!(
            eval(&rs, IpFamily::V6, Direction::Outbound, L4::Esp),
            Outcome::Accepted
        );
        assert_eq!(v4_in(&rs, NATT), Outcome::Accepted);
    }

    #[test]
    fn an_interface_match_is_decided_when_the_interface_is_known() {
        let rs = fixture("interface");
        assert!(matches!(v4_in(&rs, NATT), Outcome::Uncertain { .. }));
        let mut p = Probe::new(IpFamily::V4, Direction::Inbound, NATT);
        p.iface = Some("eth0".into());
        assert_eq!(rs.evaluate(&p), Outcome::Accepted);
        p.iface = Some("eth1".into());
        assert_eq!(dropped_at(&rs.evaluate(&p)), ("input".into(), None));
    }

    #[test]
    fn every_base_chain_on_the_hook_must_accept() {
        let rs = fixture("priorities");
        // The ip table's accept (priority -10) does not end the walk: the inet table's
        // chain at priority 10 still drops.
        let o = v4_in(&rs, NATT);
        let Outcome::Dropped { at } = o else {
            panic!("{o:?}")
        };
        assert_eq!(at.table, "late");
    }

    #[test]
    fn verdict_maps_are_followed() {
        let rs = fixture("vmap");
        assert_eq!(v4_in(&rs, IKE), Outcome::Accepted);
        assert_eq!(v4_in(&rs, L4::Esp), Outcome::Accepted);
        assert_eq!(dropped_at(&v4_in(&rs, NATT)).0, "udp_in");
    }

    #[test]
    fn a_distribution_style_ruleset_is_decided_without_doubt() {
        // ct state vmap, `iif lo accept`, service names, a rate-limited reject.
        let rs = fixture("distro_default");
        assert_eq!(v4_in(&rs, IKE), Outcome::Accepted);
        assert_eq!(v4_in(&rs, NATT), Outcome::Accepted);
        // ESP: the rate-limited reject may or may not take it, the policy drops the rest;
        // either way it is dropped.
        assert_eq!(dropped_at(&v4_in(&rs, L4::Esp)), ("input".into(), None));
        for l4 in [IKE, NATT, L4::Esp] {
            assert_eq!(
                eval(&rs, IpFamily::V6, Direction::Outbound, l4),
                Outcome::Accepted
            );
        }
    }

    #[test]
    fn addresses_decide_prefix_matches_when_known() {
        let json = r#"{"nftables":[{"chain":{"family":"ip","table":"t","name":"in","handle":1,"type":"filter","hook":"input","prio":0,"policy":"accept"}},
          {"rule":{"family":"ip","table":"t","chain":"in","handle":2,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"192.0.2.0","len":24}}}},{"drop":null}]}}]}"#;
        let rs = Ruleset::from_json(json).unwrap();
        let mut p = Probe::new(IpFamily::V4, Direction::Inbound, NATT);
        assert!(matches!(rs.evaluate(&p), Outcome::Uncertain { .. }));
        p.saddr = Some("192.0.2.7".parse().unwrap());
        assert!(matches!(rs.evaluate(&p), Outcome::Dropped { .. }));
        p.saddr = Some("198.51.100.7".parse().unwrap());
        assert_eq!(rs.evaluate(&p), Outcome::Accepted);
    }
}
