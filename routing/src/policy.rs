//! How an Envoy shapes the registered weights: its zone and slow start.

/// The routing choices of one Envoy (from the router's configuration).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// This Envoy's zone; `None` routes zone-blind.
    pub local_zone: Option<String>,
    pub zone_routing: ZoneRouting,
    /// `None`: new endpoints get their full weight at once.
    pub slow_start: Option<SlowStart>,
}

/// When calls stay in the local zone (Envoy's zone-aware routing is the
/// model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZoneRouting {
    /// The local zone must have at least this many endpoints taking calls.
    pub min_endpoints: usize,
    /// ... and at least this percent of its registered weight taking calls.
    pub min_healthy_percent: u32,
}

impl Default for ZoneRouting {
    fn default() -> Self {
        ZoneRouting {
            min_endpoints: 1,
            min_healthy_percent: 50,
        }
    }
}

/// Envoy's `slow_start_config`: a new endpoint's weight ramps over
/// `window_ms` as `weight × max(min, (t / window)^(1 / aggression))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    pub window_ms: u64,
    pub aggression: f64,
    /// The share of its weight a new endpoint starts with, in percent.
    pub min_weight_percent: u32,
}
