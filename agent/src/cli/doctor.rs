//! `vipsec doctor`: a preflight check on this node, without the agent. Exit 0 when nothing
//! would break failover (warnings allowed), 1 when a finding is an error, 2 when the
//! doctor itself cannot run (the config does not load).

use std::path::Path;

use super::CliError;
use super::render::table;
use crate::config::{Config, ConfigError};
use crate::doctor::{self, Finding, Severity};

pub async fn run(config: &Path, json: bool) -> Result<(), CliError> {
    let config = Config::load(config).map_err(|e| match e {
        ConfigError::Read { .. } => CliError::Usage(e.to_string()),
        ConfigError::Invalid { .. } => CliError::Usage(format!("config invalid:\n{e}")),
    })?;
    let findings = doctor::run(&config).await;
    let worst = doctor::worst(&findings);
    if json {
        let report = Report {
            result: worst,
            findings: &findings,
        };
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::Runtime(format!("cannot encode the findings: {e}")))?;
        println!("{text}");
    } else {
        print_table(&findings);
    }
    let errors = count(&findings, Severity::Error);
    if worst == Severity::Error {
        return Err(CliError::Runtime(format!(
            "{errors} finding(s) would break failover"
        )));
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct Report<'a> {
    result: Severity,
    findings: &'a [Finding],
}

fn count(findings: &[Finding], s: Severity) -> usize {
    findings.iter().filter(|f| f.severity == s).count()
}

fn print_table(findings: &[Finding]) {
    let mut t = table(&["check", "result", "finding"]);
    for f in findings {
        t.add_row(vec![
            f.check.clone(),
            f.severity.as_str().to_string(),
            f.summary.clone(),
        ]);
    }
    println!("{t}");
    let todo: Vec<&Finding> = findings.iter().filter(|f| f.remedy.is_some()).collect();
    if !todo.is_empty() {
        println!("\nWhat to do:");
        for f in todo {
            println!(
                "  {} ({}): {}",
                f.check,
                f.severity.as_str(),
                f.remedy.as_deref().unwrap_or_default()
            );
        }
    }
    println!(
        "\n{} ok, {} warning(s), {} error(s)",
        count(findings, Severity::Ok),
        count(findings, Severity::Warning),
        count(findings, Severity::Error)
    );
}
