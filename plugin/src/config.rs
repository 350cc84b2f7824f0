//! The plugin configuration (Envoy's `configuration` string), parsed once in
//! `on_configure`. A bad configuration is refused with an error that names
//! the field, and Envoy then refuses to load the plugin.

use serde::Deserialize;

/// What this instance of the plugin does.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum PluginConfig {
    /// The singleton that long-polls sync-server.
    Poller(PollerConfig),
    /// The HTTP filter that routes each call.
    Router(RouterConfig),
    /// An HTTP filter that does nothing: the floor any wasm filter costs,
    /// for benchmarks.
    Noop,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollerConfig {
    /// The Envoy cluster that leads to sync-server.
    pub cluster: String,
    /// The `:authority` of the poll requests.
    #[serde(default = "default_authority")]
    pub authority: String,
    /// How long sync-server may hold one long-poll, in seconds.
    #[serde(default = "default_wait_seconds")]
    pub wait_seconds: u32,
    /// The most a poll may take beyond `wait_seconds`, in milliseconds.
    #[serde(default = "default_timeout_margin_ms")]
    pub timeout_margin_ms: u32,
    /// The longest pause between failed polls, in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {}

fn default_authority() -> String {
    "sync-server".into()
}
fn default_wait_seconds() -> u32 {
    30
}
fn default_timeout_margin_ms() -> u32 {
    5_000
}
fn default_max_backoff_ms() -> u32 {
    5_000
}

impl PluginConfig {
    pub fn parse(bytes: &[u8]) -> Result<PluginConfig, String> {
        let config: PluginConfig = serde_json::from_slice(bytes)
            .map_err(|e| format!("invalid plugin configuration: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if let PluginConfig::Poller(poller) = self {
            if poller.cluster.is_empty() {
                return Err("invalid plugin configuration: `cluster` is empty".into());
            }
            if !(1..=300).contains(&poller.wait_seconds) {
                return Err(format!(
                    "invalid plugin configuration: `wait_seconds` is {}, expected 1..=300",
                    poller.wait_seconds
                ));
            }
            if poller.max_backoff_ms < 100 {
                return Err("invalid plugin configuration: `max_backoff_ms` is below 100".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_roles_with_defaults() {
        let poller = PluginConfig::parse(br#"{"role":"poller","cluster":"sync"}"#);
        assert_eq!(
            poller,
            Ok(PluginConfig::Poller(PollerConfig {
                cluster: "sync".into(),
                authority: "sync-server".into(),
                wait_seconds: 30,
                timeout_margin_ms: 5_000,
                max_backoff_ms: 5_000,
            }))
        );
        assert_eq!(
            PluginConfig::parse(br#"{"role":"router"}"#),
            Ok(PluginConfig::Router(RouterConfig {}))
        );
        assert_eq!(PluginConfig::parse(br#"{"role":"noop"}"#), Ok(PluginConfig::Noop));
    }

    #[test]
    fn errors_name_the_field() {
        for (config, field) in [
            (&br#"{"role":"poller"}"#[..], "cluster"),
            (
                br#"{"role":"poller","cluster":"s","wait_secs":3}"#,
                "wait_secs",
            ),
            (
                br#"{"role":"poller","cluster":"s","wait_seconds":0}"#,
                "wait_seconds",
            ),
            (
                br#"{"role":"poller","cluster":"s","wait_seconds":"x"}"#,
                "invalid type",
            ),
            (br#"{"role":"poller","cluster":""}"#, "cluster"),
            (br#"{"role":"pollster"}"#, "pollster"),
            (br#"{"cluster":"s"}"#, "role"),
            (br#"{"role":"router","extra":1}"#, "extra"),
            (b"", "EOF"),
        ] {
            let err = PluginConfig::parse(config).expect_err("must be refused");
            assert!(err.contains(field), "{err} should name {field}");
        }
    }
}
