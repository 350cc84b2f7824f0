//! The run's environment and the Markdown report.

use serde_json::{json, Value};
use std::process::Command;

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

pub fn environment() -> Value {
    let envoy = etcd_mesh_demo::stack::envoy_bin().display().to_string();
    json!({
        "date": first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": first_line("sh", &["-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]),
        "envoy": first_line(&envoy, &["--version"]),
        "etcd": first_line("etcd", &["--version"]),
        "rustc": first_line("rustc", &["--version"]),
        "h2load": first_line("h2load", &["--version"]),
    })
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.digits$}"))
}

pub fn markdown(r: &Value) -> String {
    let env = &r["environment"];
    let mut md = format!(
        "# etcd-mesh benchmark results\n\n\
         Written by `make bench` on {} — {} cores ({}), {}, {}, {}, {}.\n\
         Every figure below comes from this one run; compare ratios, not absolute numbers:\n\
         these machines are shared and noisy.\n\n![results](results.png)\n\n",
        env["date"].as_str().unwrap_or("?"),
        env["cores"],
        env["cpu"].as_str().unwrap_or("?"),
        env["envoy"].as_str().unwrap_or("?"),
        env["etcd"].as_str().unwrap_or("?"),
        env["rustc"].as_str().unwrap_or("?"),
        env["h2load"].as_str().unwrap_or("?"),
    );
    let cost = &r["cost"];
    let o = &cost["options"];
    md += &format!(
        "## What a call costs\n\nUnary `demo.Echo/Say` (empty message) with h2load, Envoy with one worker; \
         {} interleaved rounds of {} calls per variant ({} clients × {} streams); medians over the rounds. \
         CPU is the Envoy process's user+system time per call, from `/proc/<pid>/stat`. \
         Latency: {} calls at {} calls/s on one connection.\n\n\
         | variant | Envoy CPU µs/call | calls/s | p50 µs | p99 µs |\n|---|---|---|---|---|\n",
        o["rounds"], o["calls"], o["clients"], o["streams"], o["latency_calls"], o["latency_rps"]
    );
    for v in cost["variants"].as_array().into_iter().flatten() {
        md += &format!(
            "| {} | {} | {} | {} | {} |\n",
            v["name"].as_str().unwrap_or("?"),
            num(&v["envoy_cpu_us_per_call"], 1),
            num(&v["requests_per_second"], 0),
            num(&v["p50_us"], 0),
            num(&v["p99_us"], 0)
        );
    }
    let ratios = &cost["ratios"];
    md += &format!(
        "\nEnvoy CPU per call: **d/b = {}**, **d/c = {}** (aim d/c ≤ 1.05); with the header override e/b = {}, e/c = {}.\n\n",
        num(&ratios["d_over_b"], 2),
        num(&ratios["d_over_c"], 2),
        num(&ratios["e_over_b"], 2),
        num(&ratios["e_over_c"], 2)
    );
    let p = &r["propagation"];
    md += &format!(
        "## How fast a change reaches traffic\n\n{} changes (add, weight 1→0, weight 0→1, delete), Envoy with two workers, \
         one client calling in a loop; timed from just before the etcd request.\n\n\
         | | p50 ms | p99 ms | max ms |\n|---|---|---|---|\n\
         | put → first call on the endpoint | {} | {} | {} |\n\
         | delete or weight 0 → last call on it | {} | {} | {} |\n\n(aim p99 ≤ 20 ms)\n\n",
        p["changes"],
        num(&p["put_to_first_call"]["p50_ms"], 2),
        num(&p["put_to_first_call"]["p99_ms"], 2),
        num(&p["put_to_first_call"]["max_ms"], 2),
        num(&p["delete_or_drain_to_last_call"]["p50_ms"], 2),
        num(&p["delete_or_drain_to_last_call"]["p99_ms"], 2),
        num(&p["delete_or_drain_to_last_call"]["max_ms"], 2),
    );
    let s = &r["split"];
    md += &format!(
        "## Split quality\n\n{} calls at weights 1:2:3 over 8 connections, Envoy with two workers: \
         largest deviation from the ideal share **{} percentage points**.\n\n| weight | served | share % | deviation pp |\n|---|---|---|---|\n",
        s["calls"],
        num(&s["max_abs_deviation_pp"], 2)
    );
    for b in s["backends"].as_array().into_iter().flatten() {
        md += &format!(
            "| {} | {} | {} | {} |\n",
            b["weight"],
            b["served"],
            num(&b["share_pct"], 2),
            num(&b["deviation_pp"], 2)
        );
    }
    let f = &s["first_6_after_change"];
    md += &format!(
        "\nFirst 6 calls after a change (a weight-3 backend joining or draining, {} trials): \
         they reached at least {} hosts, median {}.\n\n",
        f["trials"],
        num(&f["min_hosts"], 0),
        num(&f["median_hosts"], 0)
    );
    let sc = &r["scale"];
    md += &format!(
        "## Scale\n\nsync-server (release build) over {} services / {} endpoints:\n\n\
         | | |\n|---|---|\n\
         | time to the first ready snapshot | {} ms |\n\
         | peak RSS | {} MiB |\n\
         | serving one full snapshot ({} bytes) | {} ms |\n\
         | one put → all {} waiting long-polls answered | {} ms (median {} ms) |\n\n\
         The plugin with {} endpoints in its tables: put → poller holds the revision {} ms (median); \
         a worker rebuilds its tables in {} ms.\n",
        sc["services"],
        sc["endpoints"],
        num(&sc["time_to_ready_ms"], 0),
        num(&sc["peak_rss_mib"], 0),
        sc["full_snapshot_bytes"],
        num(&sc["full_snapshot_serve_ms_median"], 1),
        sc["long_polls"],
        num(&sc["put_to_all_long_polls_answered_ms"], 1),
        num(&sc["put_to_median_long_poll_answered_ms"], 1),
        sc["plugin"]["endpoints"],
        num(&sc["plugin"]["put_to_poller_holding_it_ms_median"], 1),
        num(&sc["plugin"]["worker_table_refresh_ms_median"], 2),
    );
    md
}
