//! The alerting an operator installs (deploy/prometheus/vipsec-alerts.yml, its unit tests, and
//! deploy/grafana/vipsec-dashboard.json) against the real tools and the real agent: Debian's
//! `promtool` checks the rules and runs their unit tests and parses every dashboard query;
//! every metric the rules and the dashboard name is one a running `vipsec agent` exports on
//! its metrics endpoint.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{AgentProc, http_get};
use serde_json::Value;
use vipsec_testbed::netns::Netns;
use vipsec_testbed::process::wait_for;
use vipsec_testbed::require_program;

const RULES: &str = "deploy/prometheus/vipsec-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/vipsec-alerts.test.yml";
const DASHBOARD: &str = "deploy/grafana/vipsec-dashboard.json";
const RUNBOOK: &str = "docs/alerts.md";
/// Where the package installs the runbook; each alert's `runbook_url` points into it.
const RUNBOOK_URL: &str = "file:///usr/share/doc/vipsec/alerts.md#";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn promtool() -> PathBuf {
    require_program("promtool").unwrap_or_else(|e| {
        panic!(
            "promtool (Debian package prometheus, installed by tools/install-deps) is needed: {e}"
        )
    })
}

/// The rules file as JSON, through Debian's python3-yaml (as the deploy tests read YAML).
fn rules() -> Value {
    let python = require_program("python3").unwrap();
    let out = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(repo(RULES))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn alerts(rules: &Value) -> Vec<&Value> {
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .collect()
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every query of the dashboard: panel targets and template variables, as (where, expr).
fn dashboard_queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default().to_string();
            out.push((format!("panel {:?} {}", p["title"], t["refId"]), expr));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().unwrap_or_default().to_string();
            out.push((format!("variable {}", v["name"]), q));
        }
    }
    out
}

/// The metric names a PromQL expression (or Grafana `label_values` query) names: every
/// identifier starting with `vipsec_`, and Prometheus's own `up`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if ident(chars[i]) && (i == 0 || !ident(chars[i - 1])) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            // `up` as a metric: followed by a selector, not a word inside a label value.
            let selector = chars[i..].iter().find(|c| !c.is_whitespace()) == Some(&'{');
            if word.starts_with("vipsec_") || (word == "up" && selector) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promtool_checks_the_rules_and_passes_their_unit_tests() {
    let promtool = promtool();
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(repo(RULES))
        .output()
        .unwrap();
    assert!(out.status.success(), "promtool check rules: {}", show(&out));
    let out = Command::new(&promtool)
        .args(["test", "rules"])
        .arg(repo(RULE_TESTS))
        .output()
        .unwrap();
    assert!(out.status.success(), "promtool test rules: {}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("SUCCESS"),
        "{}",
        show(&out)
    );
}

#[test]
fn every_alert_has_a_severity_a_summary_a_description_a_runbook_section_and_a_unit_test() {
    let rules = rules();
    let alerts = alerts(&rules);
    assert!(alerts.len() >= 10, "{alerts:?}");
    let runbook = read(RUNBOOK);
    let tests = read(RULE_TESTS);
    let mut seen = BTreeSet::new();
    for a in alerts {
        let name = a["alert"].as_str().expect("only alerting rules");
        assert!(seen.insert(name), "{name} is defined twice");
        let severity = a["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning"].contains(&severity),
            "{name}: severity {severity:?}, want critical or warning"
        );
        for key in ["summary", "description"] {
            let text = a["annotations"][key].as_str().unwrap_or_default();
            assert!(text.len() > 20, "{name}: {key} {text:?}");
        }
        let url = a["annotations"]["runbook_url"].as_str().unwrap_or_default();
        assert_eq!(
            url,
            format!("{RUNBOOK_URL}{}", name.to_lowercase()),
            "{name}: runbook_url"
        );
        assert!(
            runbook.lines().any(|l| l == format!("### {name}")),
            "{RUNBOOK} has no section \"### {name}\""
        );
        // A firing case (exp_labels under the alert) and a case that must stay quiet.
        let cases: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|c| c.contains(&format!("alertname: {name}\n")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_labels:")),
            "{RULE_TESTS} never expects {name} to fire"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{RULE_TESTS} never expects {name} to stay quiet"
        );
    }
    // A section of the runbook for an alert that no longer exists misleads whoever reads it.
    for line in runbook.lines() {
        if let Some(name) = line.strip_prefix("### Vipsec") {
            assert!(
                seen.contains(format!("Vipsec{name}").as_str()),
                "{RUNBOOK} has a section for Vipsec{name}, which is no alert"
            );
        }
    }
}

#[test]
fn the_dashboard_is_a_grafana_model_on_a_prometheus_datasource_variable_and_its_queries_parse() {
    let d = dashboard();
    for key in ["title", "uid"] {
        assert!(d[key].as_str().is_some_and(|s| !s.is_empty()), "{key}");
    }
    assert!(d["schemaVersion"].as_u64().is_some(), "schemaVersion");
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["query"] == "prometheus"
            && v["name"] == "datasource"),
        "no datasource variable of type prometheus named \"datasource\""
    );
    let by_variable = |ds: &Value| ds["type"] == "prometheus" && ds["uid"] == "${datasource}";
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert!(by_variable(&v["datasource"]), "variable {}", v["name"]);
    }
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default().to_string();
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "{title}: id twice"
        );
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| g[k].as_u64().expect("gridPos"));
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: gridPos {g}");
        for (other, [ox, oy, ow, oh]) in &boxes {
            let apart = x + w <= *ox || *ox + ow <= x || y + h <= *oy || *oy + oh <= y;
            assert!(apart, "{title} overlaps {other}");
        }
        boxes.push((title.clone(), [x, y, w, h]));
        if p["type"] == "row" {
            continue;
        }
        assert!(
            ["timeseries", "stat", "state-timeline"].contains(&p["type"].as_str().unwrap()),
            "{title}: panel type {}",
            p["type"]
        );
        assert!(by_variable(&p["datasource"]), "{title}: datasource");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        let refs: BTreeSet<_> = targets.iter().map(|t| t["refId"].to_string()).collect();
        assert_eq!(refs.len(), targets.len(), "{title}: refIds");
        for t in targets {
            assert!(by_variable(&t["datasource"]), "{title}: target datasource");
        }
    }

    // Each panel query, with Grafana's variables filled in, must be PromQL that Prometheus
    // parses: promtool checks them as recording rules.
    let mut rules = String::from("groups:\n  - name: vipsec-dashboard\n    rules:\n");
    let mut n = 0;
    for (_, expr) in dashboard_queries(&d) {
        if expr.starts_with("label_values(") {
            continue;
        }
        n += 1;
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$job", ".*")
            .replace("$instance", ".*")
            .replace("$vip", ".*");
        rules.push_str(&format!(
            "      - record: vipsec_dashboard:query_{n}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    assert!(n >= 15, "{n} queries");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, &rules).unwrap();
    let out = Command::new(promtool())
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "a dashboard query does not parse: {}\n{rules}",
        show(&out)
    );
}

/// Sample names and values of an exposition, e.g. `vipsec_failovers_total{..}` -> 0.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| l.starts_with("vipsec_"))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn sample_names(body: &str) -> BTreeSet<String> {
    samples(body)
        .keys()
        .map(|s| s.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

#[test]
fn rules_and_dashboard_use_only_metrics_a_running_agent_exports() {
    // Every name the rules and the dashboard query.
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let rules = rules();
    for a in alerts(&rules) {
        for name in metric_names(a["expr"].as_str().unwrap()) {
            used.entry(name)
                .or_default()
                .push(format!("{RULES} {}", a["alert"].as_str().unwrap()));
        }
    }
    for (place, expr) in dashboard_queries(&dashboard()) {
        for name in metric_names(&expr) {
            used.entry(name)
                .or_default()
                .push(format!("{DASHBOARD} {place}"));
        }
    }
    assert!(used.len() >= 15, "{used:?}");

    // A real agent: a hosted VIP, a protected peer VIP, and a guard bound to an interface
    // that is not there yet, so the guard's health part and the failures are seen for real.
    let ns = Netns::new("alerts").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = 9641;
    let agent = AgentProc::start(
        Some(&ns),
        dir.path(),
        "solo",
        &format!(
            r#"[metrics]
listen = "127.0.0.1:{port}"
[store]
backend = "embedded"
[keying]
backend = "none"
[kernel]
backend = "xfrm"
fail_secure = true
interface = "vsalert0"
libipsec = true
[[hosted_vip]]
address = "192.0.2.100"
[[peer_vip]]
address = "192.0.2.200"
connection = "vip200"
child = "vip200"
protect = ["tcp/143"]
"#
        ),
    );
    let scrape = |what: &str, f: &dyn Fn(&BTreeMap<String, f64>) -> bool| -> String {
        wait_for(what, Duration::from_secs(20), || {
            ns.run_in(move || http_get(port, "/metrics"))
                .unwrap()
                .filter(|b| f(&samples(b)))
        })
        .unwrap_or_else(|e| panic!("{e}\n--- agent log ---\n{}", agent.log_text()))
    };
    let guard = "vipsec_health_part_healthy{part=\"guard\"}";
    let unguarded = scrape("the guard's part unhealthy, its install failing", &|s| {
        s.get(guard) == Some(&0.0)
            && s.get("vipsec_action_failures_total{kind=\"guard\"}")
                .is_some_and(|n| *n >= 1.0)
    });
    ns.ip(&[
        "link", "add", "vsalert0", "type", "veth", "peer", "name", "vsalert1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "vsalert0", "up"]).unwrap();
    let guarded = scrape("the guard held once its interface is there", &|s| {
        s.get(guard) == Some(&1.0)
            && s.get("vipsec_fail_secure_transitions_total{kind=\"engage\"}")
                .is_some_and(|n| *n >= 1.0)
    });

    let exported: BTreeSet<String> = sample_names(&unguarded)
        .union(&sample_names(&guarded))
        .cloned()
        .collect();
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| *name != "up" && !exported.contains(*name))
        .map(|(name, places)| format!("{name} (in {})", places.join(", ")))
        .collect();
    assert!(
        missing.is_empty(),
        "the agent does not export these metrics:\n{}\nit exports:\n{}",
        missing.join("\n"),
        exported.iter().cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn metric_names_are_found_in_promql_and_grafana_queries() {
    let names = metric_names(
        "histogram_quantile(0.9, sum by (le) (rate(vipsec_move_seconds_bucket{job=~\"$job\"}[5m]))) \
         and up{job=\"vipsec\"} == 0 or label_values({__name__=~\"vipsec_vip_present|vipsec_x\"}, vip)",
    );
    let want: BTreeSet<String> = [
        "up",
        "vipsec_move_seconds_bucket",
        "vipsec_vip_present",
        "vipsec_x",
    ]
    .map(String::from)
    .into();
    assert_eq!(names, want);
    assert!(metric_names("count by (job, vip) (x)").is_empty());
}
