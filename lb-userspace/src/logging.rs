//! Log output: plain text with timestamps on a terminal; under systemd
//! (journald sets JOURNAL_STREAM) without timestamps, with the syslog level
//! prefixes journald reads (`<3>` error … `<7>` debug); or one JSON object
//! per line (`--log-format json`) for log shippers. RUST_LOG filters as usual.

use std::io::Write as _;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

pub fn init(format: LogFormat) {
    let mut builder = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    match format {
        LogFormat::Json => {
            builder.format(|buf, record| {
                let line = json_line(&buf.timestamp_millis().to_string(), record);
                writeln!(buf, "{line}")
            });
        }
        LogFormat::Text if journald => {
            builder.format(|buf, record| {
                writeln!(buf, "<{}>{}: {}", syslog_level(record.level()), record.target(), record.args())
            });
        }
        LogFormat::Text => {}
    }
    builder.init();
}

/// The syslog severity journald files a line under.
pub fn syslog_level(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// One record as a JSON object: timestamp, level, target, message.
pub fn json_line(timestamp: &str, record: &log::Record) -> String {
    serde_json::json!({
        "timestamp": timestamp,
        "level": record.level().as_str(),
        "target": record.target(),
        "message": record.args().to_string(),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_objects_and_levels_map_to_syslog() {
        let line = json_line(
            "2026-11-25T23:00:00.000Z",
            &log::Record::builder()
                .level(log::Level::Warn)
                .target("xdplb::agent")
                .args(format_args!("backend {} is \"DOWN\"", "198.18.1.11"))
                .build(),
        );
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["level"], "WARN");
        assert_eq!(value["target"], "xdplb::agent");
        assert_eq!(value["message"], "backend 198.18.1.11 is \"DOWN\"");
        assert_eq!(value["timestamp"], "2026-11-25T23:00:00.000Z");
        assert_eq!(
            [log::Level::Error, log::Level::Warn, log::Level::Info, log::Level::Debug].map(syslog_level),
            [3, 4, 6, 7]
        );
    }
}
