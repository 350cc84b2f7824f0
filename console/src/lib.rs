//! The browser console of etcd-mesh, compiled to wasm32 and bound with
//! wasm-bindgen (`--target web`): the page's JavaScript fetches, this crate
//! decides.
//!
//! - [`state`]: the tables held from the change feed and the change log;
//! - [`view`]: what the page draws, and the pick preview made by the
//!   routing core (`etcd_mesh_routing::preview_picks`);
//! - [`Console`]: the thin wasm-bindgen glue; it hands JSON strings to the
//!   page so the boundary stays small.
//!
//! Depends on the wire format and the routing core, never on proxy-wasm
//! (`tests/deps.rs` checks).

#![forbid(unsafe_code)]

pub mod state;
pub mod view;

use wasm_bindgen::prelude::*;

/// The console's state, owned by the page.
#[wasm_bindgen]
#[derive(Debug, Default)]
pub struct Console {
    tables: state::Tables,
}

#[wasm_bindgen]
impl Console {
    #[wasm_bindgen(constructor)]
    pub fn new() -> Console {
        Console::default()
    }

    /// Applies one `/v1/changes` body; on a refusal (the error says why)
    /// nothing is held any more and [`Console::query`] asks for everything.
    pub fn apply(&mut self, body: &[u8]) -> Result<(), JsError> {
        self.tables
            .apply_body(body)
            .map(drop)
            .map_err(|e| JsError::new(&e))
    }

    /// `since=<rev>&epoch=<epoch>` for the next poll, or empty.
    pub fn query(&self) -> String {
        self.tables.query()
    }

    /// Forgets the tables (after a refusal or a change of token).
    pub fn reset(&mut self) {
        self.tables.reset();
    }

    /// The page's view as JSON (see [`view::View`]).
    pub fn view(&self, filter: &str) -> String {
        serde_json::to_string(&view::view(&self.tables, filter)).unwrap_or_default()
    }

    /// The pick preview of `service` as JSON ([`view::Picks`]), or `null`.
    pub fn picks(&self, service: &str, now_ms: f64) -> String {
        // JavaScript's Date.now() is a whole number of ms well within u64.
        let now_ms = if now_ms.is_finite() && now_ms > 0.0 {
            now_ms as u64
        } else {
            0
        };
        serde_json::to_string(&view::picks(&self.tables, service, now_ms)).unwrap_or_default()
    }
}
