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
    let envoy = etcd_mesh_testkit::envoy_bin().display().to_string();
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

/// The Markdown report of `r`, with the figures of the run before (`b`,
/// the last committed `results.json`) beside the headline ones.
pub fn markdown(r: &Value, b: &Value) -> String {
    let env = &r["environment"];
    let mut md = format!(
        "# etcd-mesh benchmark results\n\n\
         Written by `make bench` on {} — {} cores ({}), {}, {}, {}, {}.\n\
         Each section's figures come from one run; compare ratios, not absolute numbers:\n\
         these machines are shared and noisy.\n\n![results](results.png)\n\n",
        env["date"].as_str().unwrap_or("?"),
        env["cores"],
        env["cpu"].as_str().unwrap_or("?"),
        env["envoy"].as_str().unwrap_or("?"),
        env["etcd"].as_str().unwrap_or("?"),
        env["rustc"].as_str().unwrap_or("?"),
        env["h2load"].as_str().unwrap_or("?"),
    );
    // Sections rerun alone (`--cost-only`, ...) keep the others' figures.
    let dates: Vec<(&String, &str)> = r["measured"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(section, date)| Some((section, date.as_str()?)))
        .collect();
    if dates.iter().any(|(_, d)| Some(*d) != env["date"].as_str()) {
        let when: Vec<String> = dates.iter().map(|(s, d)| format!("{s} {d}")).collect();
        md += &format!(
            "Sections were measured at different times (the environment above is the last \
             run's): {}. Each section's *before* is the committed figures it was first shown with.\n\n",
            when.join(", ")
        );
    }
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
    md += &ladder_section(cost, &b["cost"]);
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
    md += &scale_section(&r["scale"], &b["scale"]);
    md += &health_section(&r["health"]);
    md += &replicas_section(&r["replicas"]);
    md += &picker_section(&r["picker"]);
    // The partition matrix comes from the fault tests (root, network
    // namespaces), kept beside the benchmark's own sections.
    if let Ok(partitions) = std::fs::read_to_string("bench/partitions.md") {
        md += "\n";
        md += &partitions;
    }
    md
}

/// The Scale section: the change feed against the full snapshot, side by
/// side in this run, and the figures of the run before.
fn scale_section(sc: &Value, before: &Value) -> String {
    let snap = &sc["snapshot_long_polls"];
    let polls = sc["delta_long_polls"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let delta = |i: usize, key: &str| polls.get(i).map_or(Value::Null, |p| p[key].clone());
    let mut md = format!(
        "## Scale\n\nsync-server (release build) over {} services / {} endpoints in etcd, \
         answering raw HTTP/1.1 long-polls from this process; Envoy with two workers for the plugin rows. \
         Each row says what it measures; *before* is the last committed run (the same rows, \
         measured the old way where the old way is all there was).\n\n\
         | what | now | before | goal |\n|---|---|---|---|\n",
        sc["services"], sc["endpoints"],
    );
    let mut row = |what: String, now: String, was: String, goal: &str| {
        md += &format!("| {what} | {now} | {was} | {goal} |\n");
    };
    row(
        "time to the first ready snapshot".into(),
        format!("{} ms", num(&sc["time_to_ready_ms"], 0)),
        format!("{} ms", num(&before["time_to_ready_ms"], 0)),
        "",
    );
    row(
        "peak RSS of sync-server (after the long-poll runs)".into(),
        format!("{} MiB", num(&sc["peak_rss_mib"], 0)),
        format!("{} MiB", num(&before["peak_rss_mib"], 0)),
        "",
    );
    row(
        format!(
            "GET /v1/snapshot, the whole registry ({} bytes)",
            sc["full_snapshot_bytes"]
        ),
        format!("{} ms", num(&sc["full_snapshot_serve_ms_median"], 1)),
        format!("{} ms", num(&before["full_snapshot_serve_ms_median"], 1)),
        "",
    );
    row(
        format!(
            "one put → all {} held `/v1/snapshot` long-polls answered (full snapshot, p100)",
            snap["long_polls"]
        ),
        format!(
            "{} ms, {} B each",
            num(&snap["all_answered_ms"], 1),
            snap["bytes_per_answer"]
        ),
        format!(
            "{} ms, {} B each",
            num(&before["snapshot_long_polls"]["all_answered_ms"], 1),
            before["snapshot_long_polls"]["bytes_per_answer"]
        ),
        "",
    );
    for (i, goal) in [(0, "< 50 ms, < 2 KB"), (1, "< 500 ms")] {
        row(
            format!(
                "one put → all {} held `/v1/changes` long-polls answered (delta, p100)",
                delta(i, "long_polls")
            ),
            format!(
                "{} ms (median {} ms), {} B each",
                num(&delta(i, "all_answered_ms"), 1),
                num(&delta(i, "median_answered_ms"), 1),
                delta(i, "bytes_per_answer")
            ),
            "(full snapshot only)".into(),
            goal,
        );
    }
    for rolling in sc["rolling_restart"].as_array().into_iter().flatten() {
        row(
            format!(
                "rolling restart, {} instances in {} s ({} changes): bytes to one Envoy following `/v1/{}`",
                rolling["instances"],
                num(&rolling["seconds"], 0),
                rolling["changes"],
                rolling["feed"].as_str().unwrap_or("?")
            ),
            format!(
                "{} MB in {} answers; sync-server CPU {} s",
                num(&(rolling["bytes_to_one_envoy"].as_f64().unwrap_or(0.0) / 1e6).into(), 2),
                rolling["answers"],
                num(&rolling["sync_server_cpu_s"], 2)
            ),
            "".into(),
            "",
        );
    }
    let p = &sc["plugin"];
    let bp = &before["plugin"];
    row(
        format!(
            "plugin with {} endpoints: put → the poller holds it (median, p99)",
            p["endpoints"]
        ),
        format!(
            "{} ms, {} ms",
            num(&p["put_to_poller_holding_it_ms_median"], 1),
            num(&p["put_to_poller_holding_it_ms_p99"], 1)
        ),
        format!(
            "{} ms at {} endpoints",
            num(&bp["put_to_poller_holding_it_ms_median"], 1),
            bp["endpoints"]
        ),
        "< 5 ms",
    );
    row(
        "plugin: the poller applies one change (decode, check, write shared data; median)".into(),
        format!("{} ms", num(&p["poller_apply_ms_median"], 2)),
        "".into(),
        "",
    );
    row(
        "plugin: a worker applies one change (median, max)".into(),
        format!(
            "{} ms, {} ms",
            num(&p["worker_apply_ms_median"], 3),
            num(&p["worker_apply_ms_max"], 3)
        ),
        format!(
            "{} ms (whole tables) at {} endpoints",
            num(&bp["worker_table_refresh_ms_median"], 2),
            bp["endpoints"]
        ),
        "< 0.5 ms",
    );
    row(
        "plugin: a worker loads the whole tables (first call)".into(),
        format!("{} ms", num(&p["worker_first_load_ms"], 1)),
        "".into(),
        "",
    );
    let prop = &p["propagation"];
    row(
        format!(
            "plugin: put → first call on the endpoint, {} changes (p50, p99)",
            prop["changes"]
        ),
        format!(
            "{} ms, {} ms",
            num(&prop["put_to_first_call"]["p50_ms"], 2),
            num(&prop["put_to_first_call"]["p99_ms"], 2)
        ),
        "".into(),
        "p99 ≤ 20 ms",
    );
    row(
        "plugin: delete or weight 0 → last call on it (p50, p99)".into(),
        format!(
            "{} ms, {} ms",
            num(&prop["delete_or_drain_to_last_call"]["p50_ms"], 2),
            num(&prop["delete_or_drain_to_last_call"]["p99_ms"], 2)
        ),
        "".into(),
        "",
    );
    md
}

/// The cost ladder: each ratio paired inside a round, median and range over
/// the rounds, with the figures of the run before.
fn ladder_section(cost: &Value, before: &Value) -> String {
    let range = |r: &Value| {
        format!(
            "**{}** ({}–{})",
            num(&r["median"], 2),
            num(&r["min"], 2),
            num(&r["max"], 2)
        )
    };
    let mut md = String::from(
        "\nThe cost ladder: Envoy CPU per call, each ratio computed inside a round (numerator and \
         denominator measured back to back), median over the rounds and the range beside it. \
         The `+` rungs are the empty filter making exactly that one host call.\n\n\
         | ratio | median (min–max) | goal |\n|---|---|---|\n",
    );
    for rung in cost["ladder"].as_array().into_iter().flatten() {
        md += &format!(
            "| {} | {} | {} |\n",
            rung["name"].as_str().unwrap_or("?"),
            range(&rung["cpu"]),
            rung["goal"].as_str().unwrap_or("")
        );
    }
    md += &format!(
        "| throughput: etcd-mesh / ROUND_ROBIN (calls/s) | {} | ≥ 0.80 |\n\n",
        range(&cost["throughput_d_over_b"])
    );
    md += &format!(
        "Before (the last committed run, medians of separately taken variants): \
         etcd-mesh / ROUND_ROBIN {}, etcd-mesh / empty filter {}; now {} and {}.\n\n",
        num(&before["ratios"]["d_over_b"], 2),
        num(&before["ratios"]["d_over_c"], 2),
        num(&cost["ratios"]["d_over_b"], 2),
        num(&cost["ratios"]["d_over_c"], 2),
    );
    md
}

/// Health checks: calls lost when a backend dies, and what checking costs.
fn health_section(h: &Value) -> String {
    if h.is_null() {
        return String::new();
    }
    let loss = &h["loss"];
    let mut md = format!(
        "\n## Health checks\n\nA backend dies while still registered (its lease kept alive): \
         one Envoy with two workers, 4 connections calling in a loop for 4 s after it stops, \
         {} rounds, the three variants back to back in each round. Passive ejection alone is \
         what etcd-mesh did before health checks.\n\n\
         | variant | failed calls, median (min–max) | last failure after the kill, median (max) |\n|---|---|---|\n",
        loss["rounds"]
    );
    for v in loss["variants"].as_array().into_iter().flatten() {
        md += &format!(
            "| {} | {} ({}–{}) | {} ms ({} ms) |\n",
            v["name"].as_str().unwrap_or("?"),
            num(&v["failed_calls_median"], 0),
            num(&v["failed_calls_min"], 0),
            num(&v["failed_calls_max"], 0),
            num(&v["last_failure_ms_median"], 0),
            num(&v["last_failure_ms_max"], 0),
        );
    }
    md += &format!(
        "\nFailed calls, health checks alone / passive ejection alone, paired per round: \
         **{}** ({}–{}).\n\n",
        num(&loss["health_over_ejection_median"], 2),
        num(&loss["health_over_ejection_min"], 2),
        num(&loss["health_over_ejection_max"], 2),
    );
    let c = &h["cost"];
    md += &format!(
        "Checking {} endpoints ({} gRPC health servers, {} s interval) for {} s, \
         beside a sync-server watching the same registrations without checks, in the same seconds: \
         {} checks/s; sync-server CPU **{}%** with checks against {}% without \
         ({} µs of CPU per check); {} connections kept; at most {} checks in flight; \
         peak RSS {} MiB against {} MiB.\n",
        c["endpoints"],
        c["backends"],
        c["interval_s"],
        num(&c["window_s"], 0),
        num(&c["checks_per_second"], 0),
        num(&c["cpu_percent_with_checks"], 1),
        num(&c["cpu_percent_without"], 1),
        num(&c["cpu_us_per_check"], 1),
        c["connections"],
        c["in_flight_peak"],
        num(&c["peak_rss_mib_with_checks"], 0),
        num(&c["peak_rss_mib_without"], 0),
    );
    md
}

/// The Replicas section: the recommended layout beside the one it
/// replaced, and one replica beside two, in the same rounds.
fn replicas_section(r: &Value) -> String {
    if r.is_null() {
        return String::new();
    }
    let spread = |v: &Value, digits: usize| {
        format!(
            "{} ({}–{})",
            num(&v["median"], digits),
            num(&v["min"], digits),
            num(&v["max"], digits)
        )
    };
    let q = &r["quiet"];
    let mut md = format!(
        "\n## Replicas\n\nTwo sync-server replicas over a quiet registry of {} services, \
         two Envoys watched over the same {} s in each of {} rounds: one with a cluster per \
         replica (the poller follows one; the layout `docs/operations.md` recommends), one \
         with one cluster over both (Envoy picks the replica of every poll: the layout before).\n\n\
         | layout | full loads per Envoy per minute, median (min–max) |\n|---|---|\n\
         | a cluster per replica | {} |\n| one cluster over both (before) | {} |\n",
        q["services"],
        q["window_s"],
        q["rounds"],
        spread(&q["full_loads_per_minute_replica_clusters"], 0),
        spread(&q["full_loads_per_minute_one_cluster"], 0),
    );
    let p = &r["propagation"];
    md += "\nA change reaching traffic (put → first call, delete or drain → last call), \
           one replica and two, alternating in each round:\n\n\
           | replicas | changes | p50 | p99 | max |\n|---|---|---|---|---|\n";
    for (name, key) in [("one", "one_replica"), ("two", "two_replicas")] {
        let v = &p[key];
        md += &format!(
            "| {name} | {} | {} ms | {} ms | {} ms |\n",
            v["changes"],
            num(&v["p50_ms"], 1),
            num(&v["p99_ms"], 1),
            num(&v["max_ms"], 1),
        );
    }
    let f = &r["failover"];
    md += "\nThe replica the Envoy follows fails (two replicas, real processes): how long \
           until a change made at that moment is held, and the full loads it took.\n\n\
           | failure | rounds | change held after, ms, median (min–max) | full loads, median (min–max) |\n|---|---|---|---|\n";
    for (name, key) in [("SIGKILL", "sigkill"), ("SIGSTOP (hangs)", "sigstop")] {
        let v = &f[key];
        md += &format!(
            "| {name} | {} | {} | {} |\n",
            v["rounds"],
            spread(&v["change_held_after_ms"], 0),
            spread(&v["full_loads"], 0),
        );
    }
    md
}

/// The picker's update: the old quadratic one (*before*) beside the linear
/// one, paired per round.
fn picker_section(p: &Value) -> String {
    if p.is_null() {
        return String::new();
    }
    let mut md = format!(
        "\n## The picker's update\n\nWhat a worker spends when a service's weights change \
         (`SmoothPicker::update`, native build, no Envoy): {}. *Before* is the update as it was \
         (a search of the old endpoints for every new one), measured beside the linear one in the \
         same rounds, back to back, which goes first alternating; each round times a run of \
         updates of each. The ratio is computed inside each round: median over the rounds and \
         the range beside it.\n\n\
         | endpoints | rounds × updates | before µs/update | now µs/update | before / now, median (min–max) |\n\
         |---|---|---|---|---|\n",
        p["scenario"].as_str().unwrap_or("?")
    );
    for row in p["rows"].as_array().into_iter().flatten() {
        let ratio = &row["before_over_after"];
        md += &format!(
            "| {} | {} × {} | {} | {} | **{}** ({}–{}) |\n",
            row["endpoints"],
            row["rounds"],
            row["updates_per_round"],
            num(&row["before_us_per_update_median"], 1),
            num(&row["after_us_per_update_median"], 1),
            num(&ratio["median"], 1),
            num(&ratio["min"], 1),
            num(&ratio["max"], 1),
        );
    }
    md
}
