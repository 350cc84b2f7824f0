//! The root context: reads the plugin configuration, becomes the role it
//! names ([`Poller`], [`Router`] or, in a module built with `bench-noop`,
//! the benchmark's noop filter), and hands each host event to that role.
//! A role the module cannot play, or a configuration it cannot read, is
//! refused with a log line: Envoy then refuses the configuration.

use super::host::{envoy_supports_override, log};
#[cfg(feature = "bench-noop")]
use super::noop::{NoopCall, NoopContext};
use super::poller::{Poller, POLLER_TICK};
use super::router::Router;
use crate::config::{HostOverride, PluginConfig};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel};
#[cfg(feature = "bench-noop")]
use std::rc::Rc;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> {
        Box::new(MeshRoot { id, role: None })
    });
}}

/// Why a `"role": "noop"` configuration is refused by the shipped module.
#[cfg(not(feature = "bench-noop"))]
const NOOP_REFUSED: &str = "etcd-mesh: \"role\": \"noop\" is the benchmark's and this module \
    was built without it; build the plugin with `--features bench-noop` to use it";

struct MeshRoot {
    /// This root context's id: the effective context again after held
    /// calls were resumed through theirs.
    id: u32,
    role: Option<Role>,
}

enum Role {
    Poller(Box<Poller>),
    Router(Router),
    /// Only in a module built with the `bench-noop` feature.
    #[cfg(feature = "bench-noop")]
    Noop(Rc<NoopCall>),
}

impl Context for MeshRoot {
    /// The root context ends: after a configuration reload, once the old
    /// filter chain has drained (the VM stays, with the new configuration's
    /// root context). A router's queue is unlisted, so the poller stops
    /// notifying a queue nobody reads.
    fn on_done(&mut self) -> bool {
        if let Some(Role::Router(router)) = &self.role {
            router.retire();
        }
        true
    }

    fn on_http_call_response(&mut self, token: u32, headers: usize, body_size: usize, _: usize) {
        if let Some(Role::Poller(poller)) = &mut self.role {
            poller.on_response(token, headers, body_size);
        }
    }
}

impl RootContext for MeshRoot {
    fn on_configure(&mut self, _: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = match PluginConfig::parse(&bytes) {
            Ok(config) => config,
            Err(e) => {
                log(LogLevel::Critical, &format!("etcd-mesh: {e}"));
                return false;
            }
        };
        let (role, tick) = match config {
            PluginConfig::Poller(config) => {
                (Role::Poller(Box::new(Poller::new(config))), POLLER_TICK)
            }
            PluginConfig::Router(config) => {
                if config.host_override == HostOverride::FilterState && !envoy_supports_override() {
                    return false;
                }
                let tick = Duration::from_millis(u64::from(config.refresh_ms));
                // The notification queue is registered on the first tick
                // (or held call), not here: see `WorkerState::ensure_queue`.
                (Role::Router(Router::new(config, self.id)), tick)
            }
            #[cfg(feature = "bench-noop")]
            PluginConfig::Noop(config) => {
                (Role::Noop(Rc::new(NoopCall::new(config))), Duration::ZERO)
            }
            #[cfg(not(feature = "bench-noop"))]
            PluginConfig::Noop(_) => {
                log(LogLevel::Critical, NOOP_REFUSED);
                return false;
            }
        };
        self.role = Some(role);
        if tick > Duration::ZERO && hostcalls::set_tick_period(tick).is_err() {
            log(LogLevel::Critical, "etcd-mesh: cannot set the tick period");
            return false;
        }
        true
    }

    fn on_tick(&mut self) {
        match &mut self.role {
            Some(Role::Poller(poller)) => poller.on_tick(),
            Some(Role::Router(router)) => router.on_tick(),
            #[cfg(feature = "bench-noop")]
            Some(Role::Noop(_)) => {}
            None => {}
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if let Some(Role::Router(router)) = &self.role {
            router.on_notice(queue_id);
        }
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        match &self.role {
            Some(Role::Router(router)) => Some(Box::new(router.call(id))),
            #[cfg(feature = "bench-noop")]
            Some(Role::Noop(noop)) => Some(Box::new(NoopContext(Rc::clone(noop)))),
            // The poller is not a filter: a filter chain that loads it by
            // mistake gets no context.
            _ => None,
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
