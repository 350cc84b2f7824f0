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

/// The Scale section: the sync-server ladder, then the plugin rows.
fn scale_section(sc: &Value, before: &Value) -> String {
    let mut md = String::from("## Scale\n\n");
    md += &scale_ladder(&sc["ladder"], &before_rungs(before));
    md += &plugin_rows(&sc["plugin"], &before["plugin"]);
    md
}

/// The 1,000,000-endpoint figures of the one-off run in `RESULTS-1M.md`
/// (a busy machine) and of the issue (a quiet one): the *before* of that
/// rung until a committed run has a ladder.
fn before_1m() -> Value {
    json!({
        "endpoints": 1_000_000,
        "source": "RESULTS-1M.md, a busy machine",
        "time_to_ready_ms": 59_824.0,
        "hwm_mib": 918.0,
        "full_answer_bytes": 43_527_471,
        "full_answer_path": "/v1/snapshot",
        "put_long_polls": { "all_answered_ms": 812.0 },
        "quiet": { "source": "the issue, a quiet machine", "time_to_ready_ms": 17_800.0, "hwm_mib": 790.0 },
    })
}

/// The rungs of the run before: its ladder, or (a run before the ladder)
/// its one size and the 1,000,000-endpoint one-off.
fn before_rungs(before: &Value) -> Vec<Value> {
    if let Some(rungs) = before["ladder"]["rungs"].as_array() {
        return rungs
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r["source"] = json!("the last committed run");
                r
            })
            .collect();
    }
    let mut rungs = Vec::new();
    if before["endpoints"].is_u64() {
        let polls = before["delta_long_polls"]
            .as_array()
            .and_then(|p| p.last())
            .cloned()
            .unwrap_or_default();
        rungs.push(json!({
            "endpoints": before["endpoints"],
            "source": "the committed results.json",
            "time_to_ready_ms": before["time_to_ready_ms"],
            "hwm_mib": before["peak_rss_mib"],
            "full_answer_bytes": before["full_snapshot_bytes"],
            "full_answer_path": "/v1/snapshot",
            "put_long_polls": polls,
        }));
    }
    rungs.push(before_1m());
    rungs
}

/// `x` with a comma every three digits, no decimals.
fn grouped(x: f64) -> String {
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(d);
    }
    if x < 0.0 {
        out.insert(0, '-');
    }
    out
}

fn grouped_v(v: &Value) -> String {
    v.as_f64().map_or("-".into(), grouped)
}

/// One cell: the figure `now(rung)`, and `was(before)` beside it when the
/// run before has this size.
fn cell(
    rung: &Value,
    before: Option<&Value>,
    now: impl Fn(&Value) -> String,
    was: impl Fn(&Value) -> Option<String>,
) -> String {
    match before.and_then(&was) {
        Some(was) => format!("{} *(before: {was})*", now(rung)),
        None => now(rung),
    }
}

/// The ladder table: one column per size, the run before beside each
/// figure, what each row measures, and the 10M extrapolation.
fn scale_ladder(ladder: &Value, before: &[Value]) -> String {
    let rungs = ladder["rungs"].as_array().cloned().unwrap_or_default();
    if rungs.is_empty() {
        return String::new();
    }
    let polls = grouped_v(&ladder["long_polls"]);
    let before_clients = ladder["before_clients"].as_f64().unwrap_or(0.0);
    let scale = ladder["long_polls"].as_f64().unwrap_or(0.0) / before_clients.max(1.0);
    let mut md = format!(
        "### Scale ladder\n\nOne etcd loaded step by step ({} endpoints per service, txns of 100 puts), \
         and at each size a fresh sync-server (release build); clients are raw HTTP/1.1 connections \
         from this process. *before* is {}.\n\n| | {} |\n|---|{}\n",
        ladder["endpoints_per_service"],
        before_sources(before),
        rungs
            .iter()
            .map(|r| format!("{} endpoints", grouped_v(&r["endpoints"])))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(rungs.len()),
    );
    let mut row =
        |what: &str, now: &dyn Fn(&Value) -> String, was: &dyn Fn(&Value) -> Option<String>| {
            let cells: Vec<String> = rungs
                .iter()
                .map(|r| {
                    let b = before.iter().find(|b| b["endpoints"] == r["endpoints"]);
                    cell(r, b, now, was)
                })
                .collect();
            md += &format!("| {what} | {} |\n", cells.join(" | "));
        };
    let ms = |v: &Value| v.as_f64().map(|x| format!("{} ms", grouped(x)));
    let mib = |v: &Value| v.as_f64().map(|x| format!("{} MiB", grouped(x)));
    let none = |_: &Value| None;
    row(
        "ready: start → `/readyz` 200",
        &|r| format!("**{} ms**", grouped_v(&r["time_to_ready_ms"])),
        &|b| {
            let quiet = ms(&b["quiet"]["time_to_ready_ms"]).map(|q| format!("; {q} quiet"));
            Some(ms(&b["time_to_ready_ms"])? + &quiet.unwrap_or_default())
        },
    );
    row(
        "listing (sync-server's log): its steps; pages; keys",
        &|r| listing_cell(&r["listing"]),
        &none,
    );
    row(
        "VmRSS idle, after ready",
        &|r| format!("{} MiB", grouped_v(&r["rss_idle_mib"])),
        &|b| mib(&b["rss_idle_mib"]),
    );
    row(
        &format!("VmRSS with {polls} long-polls held"),
        &|r| format!("{} MiB", grouped_v(&r["rss_long_polls_mib"])),
        &|b| mib(&b["rss_long_polls_mib"]),
    );
    row(
        "VmHWM at the end",
        &|r| format!("**{} MiB**", grouped_v(&r["hwm_mib"])),
        &|b| {
            let quiet = mib(&b["quiet"]["hwm_mib"]).map(|q| format!("; {q} quiet"));
            Some(mib(&b["hwm_mib"])? + &quiet.unwrap_or_default())
        },
    );
    row(
        "full answer `GET /v1/changes`: bytes, serve ms (median of 3)",
        &|r| {
            format!(
                "{} B, {} ms",
                grouped_v(&r["full_answer_bytes"]),
                num(&r["full_answer_serve_ms_median"], 1)
            )
        },
        &|b| {
            let path = b["full_answer_path"].as_str().map(|p| format!(", `{p}`"));
            Some(format!(
                "{} B{}",
                grouped(b["full_answer_bytes"].as_f64()?),
                path.unwrap_or_default()
            ))
        },
    );
    row(
        &format!("one put → all {polls} held long-polls answered: p100 (median)"),
        &|r| {
            let p = &r["put_long_polls"];
            format!(
                "**{} ms** ({} ms)",
                num(&p["all_answered_ms"], 1),
                num(&p["median_answered_ms"], 1)
            )
        },
        &|b| {
            let p = &b["put_long_polls"];
            Some(format!("{} ms p100", num(&p["all_answered_ms"], 1)))
                .filter(|_| p["all_answered_ms"].is_number())
        },
    );
    row(
        &format!("restart, {polls} up-to-date clients with `digest`: bytes, full answers, SIGTERM → last 200"),
        &|r| restart_cell(&r["restart_with_digest"]),
        &|b| Some(restart_cell(&b["restart_with_digest"])).filter(|_| b["restart_with_digest"].is_object()),
    );
    row(
        &format!(
            "restart, {} clients without `digest` (*before*): bytes measured; scaled to {polls}",
            before_clients
        ),
        &|r| {
            let run = &r["restart_without_digest"];
            match run["bytes_total"].as_f64() {
                Some(bytes) => format!(
                    "{}; **{} B** scaled",
                    restart_cell(run),
                    grouped(bytes * scale)
                ),
                None => restart_cell(run),
            }
        },
        &none,
    );
    row(
        "Envoy (two workers) holding them: VmRSS unscoped; scoped to 10 services",
        &|r| {
            let envoy = |e: &Value| match e["rss_mib"].as_f64() {
                Some(rss) => format!(
                    "{} MiB (held {} ms after start)",
                    grouped(rss),
                    grouped_v(&e["held_after_ms"])
                ),
                None => format!("failed: {}", e["error"].as_str().unwrap_or("not measured")),
            };
            format!(
                "{}; {}",
                envoy(&r["envoy"]["unscoped"]),
                envoy(&r["envoy"]["scoped"])
            )
        },
        &none,
    );
    row(
        "etcd: puts of this step; database size",
        &|r| {
            format!(
                "{} s; {} MiB",
                num(&r["etcd_load_s"], 1),
                grouped_v(&r["etcd_db_mib"])
            )
        },
        &none,
    );
    md += &format!(
        "\nWhat the rows measure. *ready*: from starting the process to `/readyz` answering 200 \
         (etcd listed in full, the tables built and published); *listing*: where that went, from \
         sync-server's own log line (the listing requests to etcd, building the tables, encoding \
         and publishing them; listing pages and keys). *VmRSS* (resident memory now, from \
         `/proc/<pid>/status`) right after ready, and while the {polls} change-feed long-polls are \
         held; *VmHWM*: its highest resident memory over the whole run (the *before* figures are \
         this peak). *full answer*: what a new client downloads. *one put*: {polls} long-polls \
         held on `/v1/changes?since=R&epoch=E&wait=120`, one registration's weight changed, \
         p100 and median from the put to the first byte of each answer. *restart*: up-to-date \
         clients (holding a full answer's revision, health_seq, epoch, observer and digest) \
         long-poll, sync-server is stopped (SIGTERM) and a new one started on the same address; \
         each client retries until it gets a 200: the body bytes they received in all, how many \
         answers were whole tables, and the time from the SIGTERM to the last 200 (and to the \
         median client's; of which the old process took *stop* to exit and the new one *new \
         ready* to be ready, with the clients reconnecting). Without \
         `digest` each client takes the whole tables again: measured with {before_clients} clients \
         and multiplied by {scale} to compare with {polls}.\n\n"
    );
    md += &extrapolation(&ladder["extrapolated"]);
    md
}

/// The steps of sync-server's listing log line (`…_ms` fields, the usual
/// ones in the order they happen, then any other), its pages and keys.
fn listing_cell(listing: &Value) -> String {
    const USUAL: [&str; 5] = ["fetch_ms", "list_ms", "build_ms", "put_ms", "publish_ms"];
    let Some(fields) = listing.as_object() else {
        return "(no listing log line)".into();
    };
    let others = fields
        .keys()
        .filter(|k| k.ends_with("_ms") && !USUAL.contains(&k.as_str()));
    let steps: Vec<String> = USUAL
        .iter()
        .copied()
        .chain(others.map(String::as_str))
        .filter_map(|k| {
            let ms = grouped(fields.get(k)?.as_f64()?);
            Some(format!("{} {ms}", k.strip_suffix("_ms")?))
        })
        .collect();
    format!(
        "{} ms; {} pages; {} keys",
        steps.join(" / "),
        grouped_v(&listing["pages"]),
        grouped_v(&listing["keys"])
    )
}

/// Where the *before* figures come from.
fn before_sources(before: &[Value]) -> String {
    let sources: Vec<String> = before
        .iter()
        .map(|b| {
            let quiet = b["quiet"]["source"]
                .as_str()
                .map(|q| format!("; \"quiet\": {q}"))
                .unwrap_or_default();
            format!(
                "{} endpoints: {}{quiet}",
                grouped_v(&b["endpoints"]),
                b["source"].as_str().unwrap_or("?")
            )
        })
        .collect();
    if sources.is_empty() {
        "empty (no earlier run)".into()
    } else {
        sources.join("; ")
    }
}

/// A restart run: bytes, full answers, time to the last 200 (or its error).
fn restart_cell(run: &Value) -> String {
    if let Some(error) = run["error"].as_str() {
        return format!("failed: {}", error.replace('|', "\\|").replace('\n', " "));
    }
    format!(
        "{} B, {} of {} full; last 200 after {} ms (median {}; stop {} + new ready {})",
        grouped_v(&run["bytes_total"]),
        grouped_v(&run["full_answers"]),
        grouped_v(&run["clients"]),
        grouped_v(&run["restart_to_last_200_ms"]),
        grouped_v(&run["restart_to_200_ms_median"]),
        grouped_v(&run["stop_ms"]),
        grouped_v(&run["new_server_ready_ms"]),
    )
}

/// The 10M line, on paper.
fn extrapolation(x: &Value) -> String {
    if x["time_to_ready_ms"].is_null() {
        return String::new();
    }
    format!(
        "**{} endpoints, extrapolated — not measured.** A least-squares straight line (linear in \
         endpoints) through the {} sizes measured above, read at {}: ready ≈ {} s, VmRSS idle ≈ {} MiB, \
         VmHWM ≈ {} MiB. Anything that grows faster than linearly makes these optimistic.\n\n",
        grouped_v(&x["endpoints"]),
        x["rungs"],
        grouped_v(&x["endpoints"]),
        num(&(x["time_to_ready_ms"].as_f64().unwrap_or(0.0) / 1e3).into(), 1),
        grouped_v(&x["rss_idle_mib"]),
        grouped_v(&x["hwm_mib"]),
    )
}

/// The plugin at scale, with the run before beside it.
fn plugin_rows(p: &Value, bp: &Value) -> String {
    if p.is_null() {
        return String::new();
    }
    let mut md = format!(
        "### The plugin at scale\n\nEnvoy with two workers, {} endpoints in {} services in its \
         tables.\n\n| what | now | before | goal |\n|---|---|---|---|\n",
        p["endpoints"], p["services"]
    );
    let mut row = |what: String, now: String, was: String, goal: &str| {
        md += &format!("| {what} | {now} | {was} | {goal} |\n");
    };
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
            "{} ms, {} ms at {} endpoints",
            num(&bp["worker_apply_ms_median"], 3),
            num(&bp["worker_apply_ms_max"], 3),
            bp["endpoints"]
        ),
        "< 0.5 ms",
    );
    row(
        "plugin: a worker loads the whole tables, first call: the longest blocking refresh step \
         (`table_refresh_us`)"
            .into(),
        format!("{} ms", num(&p["worker_first_load_ms"], 1)),
        format!("{} ms", num(&bp["worker_first_load_ms"], 1)),
        "",
    );
    row(
        "plugin: the same load across its slices (`table_load_ms`; 0 or - : not reported)".into(),
        format!("{} ms", num(&p["worker_table_load_ms"], 0)),
        format!("{} ms", num(&bp["worker_table_load_ms"], 0)),
        "",
    );
    row(
        "Envoy VmRSS after the tables are loaded".into(),
        format!("{} MiB", num(&p["envoy_rss_mib_after_load"], 0)),
        format!("{} MiB", num(&bp["envoy_rss_mib_after_load"], 0)),
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
