//! Shared rendering for tables and JSON.

use std::time::{Duration, SystemTime};

use comfy_table::{Table, presets};
use vipsec_proto::v1 as pb;

pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_header(header.iter().map(|h| h.to_uppercase()));
    t
}

pub fn system_time(ts: &prost_types::Timestamp) -> SystemTime {
    SystemTime::try_from(*ts).unwrap_or(SystemTime::UNIX_EPOCH)
}

pub fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    ts.map(|t| humantime::format_rfc3339_millis(system_time(t)).to_string())
}

pub fn duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.and_then(|d| Duration::try_from(*d).ok())
}

pub fn millis(d: Option<&prost_types::Duration>) -> Option<f64> {
    duration(d).map(|d| d.as_secs_f64() * 1000.0)
}

/// `3m12s ago`, rounded to what a reader cares about.
pub fn ago(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = ts else { return "-".into() };
    let elapsed = SystemTime::now()
        .duration_since(system_time(t))
        .unwrap_or_default();
    format!("{} ago", short(elapsed))
}

pub fn short(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d < Duration::from_secs(60) && d.subsec_millis() != 0 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

pub fn sa_state(s: i32) -> &'static str {
    match pb::SaState::try_from(s) {
        Ok(pb::SaState::Established) => "established",
        Ok(pb::SaState::Connecting) => "connecting",
        Ok(pb::SaState::Down) => "down",
        _ => "unknown",
    }
}

pub fn mode(m: i32) -> &'static str {
    match pb::Mode::try_from(m) {
        Ok(pb::Mode::Fast) => "fast",
        Ok(pb::Mode::Normal) => "normal",
        _ => "unknown",
    }
}

pub fn event_kind(k: i32) -> String {
    pb::EventKind::try_from(k)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("EVENT_KIND_")
                .to_lowercase()
                .replace('_', "-")
        })
        .unwrap_or_else(|_| format!("unknown({k})"))
}

pub fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}
