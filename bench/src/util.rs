//! Measuring helpers: CPU time and memory of a process, percentiles, a
//! least-squares line, h2load runs.

use anyhow::{bail, Context};
use std::path::Path;
use std::process::Command;

/// utime + stime of `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, a)| a)
        .context("stat format")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).context("utime")?.parse::<f64>()?
        + fields.get(12).context("stime")?.parse::<f64>()?;
    Ok(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Peak resident memory of `pid` (`VmHWM`), in MiB.
pub fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    status_mib(pid, "VmHWM")
}

/// Resident memory of `pid` now (`VmRSS`), in MiB.
pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    status_mib(pid, "VmRSS")
}

/// A `kB` field of `/proc/<pid>/status`, in MiB.
fn status_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{field} of process {pid}"))?;
    Ok(kib / 1024.0)
}

/// The least-squares line through `points` (x, y): (slope, intercept);
/// `None` with fewer than two distinct x.
pub fn linear_fit(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    (sxx > 0.0).then(|| {
        let slope = sxy / sxx;
        (slope, mean_y - slope * mean_x)
    })
}

/// The `p`-th percentile (0..=100) of `values`, nearest rank.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

pub fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// What one h2load run measured.
#[derive(Debug, Clone)]
pub struct H2load {
    pub requests_per_second: f64,
    /// Per-request durations in microseconds (with a log file).
    pub durations_us: Vec<f64>,
}

/// Runs h2load against a gRPC `Say` with an empty request.
pub fn h2load(
    target: &str,
    body: &Path,
    calls: usize,
    clients: usize,
    streams: usize,
    rps: Option<usize>,
    log: Option<&Path>,
) -> anyhow::Result<H2load> {
    let mut command = Command::new("h2load");
    command
        .arg(format!("http://{target}/demo.Echo/Say"))
        .args([
            "-n",
            &calls.to_string(),
            "-c",
            &clients.to_string(),
            "-m",
            &streams.to_string(),
        ])
        .arg("-d")
        .arg(body)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"]);
    if let Some(rps) = rps {
        command.arg(format!("--rps={rps}"));
    }
    if let Some(log) = log {
        command.arg(format!("--log-file={}", log.display()));
    }
    let output = command.output().context("h2load runs")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let requests_per_second = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.strip_suffix(" req/s"))
        .and_then(|r| r.parse().ok())
        .with_context(|| format!("h2load output:\n{text}"))?;
    let succeeded = text
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" succeeded")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if succeeded as usize != calls {
        bail!("h2load: {succeeded} of {calls} succeeded:\n{text}");
    }
    let durations_us = match log {
        Some(log) => std::fs::read_to_string(log)?
            .lines()
            .filter_map(|l| l.split('\t').nth(2)?.parse().ok())
            .collect(),
        None => vec![],
    };
    Ok(H2load {
        requests_per_second,
        durations_us,
    })
}
