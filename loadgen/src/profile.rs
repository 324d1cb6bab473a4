//! An optional profile of each timed scenario, for finding where the time goes:
//! with `REEVE_LOADGEN_PROFILE` set to a PostgreSQL URL, every scenario also prints
//! - the CPU this process (the services under test and their clients) and all of
//!   PostgreSQL's processes used per operation, and the machine's idle share;
//! - the statements PostgreSQL spent the most time executing, per operation
//!   (`pg_stat_statements`, which must be in `shared_preload_libraries` and created in
//!   the database the URL names; its counters are reset at each scenario's start),
//!   with the time spent planning them when `pg_stat_statements.track_planning` is on.
//!
//! CPU comes from `/proc` in clock ticks (10 ms), so short scenarios read coarsely.

use std::time::Instant;

/// Clock ticks per second of `/proc`'s CPU times (`CLK_TCK` on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// The counters at a scenario's start.
pub(crate) struct Profile {
    pool: sqlx::PgPool,
    started: Instant,
    own_ticks: u64,
    postgres_ticks: u64,
    machine: (u64, u64),
}

impl Profile {
    /// Starts a profile when `REEVE_LOADGEN_PROFILE` names a database.
    pub(crate) async fn start() -> anyhow::Result<Option<Profile>> {
        let Ok(url) = std::env::var("REEVE_LOADGEN_PROFILE") else {
            return Ok(None);
        };
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await?;
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&pool)
            .await?;
        Ok(Some(Profile {
            pool,
            started: Instant::now(),
            own_ticks: process_ticks("self").unwrap_or(0),
            postgres_ticks: postgres_ticks(),
            machine: machine_ticks(),
        }))
    }

    /// Prints what the scenario's `operations` cost.
    pub(crate) async fn finish(self, operations: u64) -> anyhow::Result<()> {
        let elapsed = self.started.elapsed().as_secs_f64();
        let own = process_ticks("self")
            .unwrap_or(0)
            .saturating_sub(self.own_ticks);
        let postgres = postgres_ticks().saturating_sub(self.postgres_ticks);
        let (total, idle) = machine_ticks();
        let idle_share = ratio(
            idle.saturating_sub(self.machine.1),
            total.saturating_sub(self.machine.0),
        );
        let operations = operations.max(1) as f64;
        let per_op = |ticks: u64| ticks as f64 / TICKS_PER_SECOND * 1e6 / operations;
        eprintln!(
            "  profile over {elapsed:.1} s: CPU per operation {:.1} µs here, {:.1} µs in PostgreSQL; machine idle {:.0}%",
            per_op(own),
            per_op(postgres),
            idle_share * 100.0
        );
        // Planning time is counted only with `pg_stat_statements.track_planning = on`.
        let rows: Vec<(i64, f64, f64, i64, String)> = sqlx::query_as(
            "SELECT calls, total_exec_time, total_plan_time, rows, \
                 left(regexp_replace(query, '\\s+', ' ', 'g'), 100) \
             FROM pg_stat_statements \
             WHERE query NOT LIKE '%pg_stat_statements%' \
             ORDER BY total_exec_time + total_plan_time DESC LIMIT 8",
        )
        .fetch_all(&self.pool)
        .await?;
        for (calls, total_ms, plan_ms, returned, query) in rows {
            eprintln!(
                "    {:>8.3} calls/op {:>8.1} µs/op {:>6.1} planning {:>7.3} ms/call {:>7.1} rows/call  {query}",
                calls as f64 / operations,
                total_ms * 1e3 / operations,
                plan_ms * 1e3 / operations,
                total_ms / calls.max(1) as f64,
                returned as f64 / calls.max(1) as f64,
            );
        }
        self.pool.close().await;
        Ok(())
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// User and system ticks of one process (`self` or a pid).
fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count after it.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// The ticks of every PostgreSQL process alive now (backends that exited meanwhile
/// are missed; the load generator's pools keep theirs open).
fn postgres_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|entry| {
            let pid = entry.file_name().into_string().ok()?;
            pid.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "postgres").then_some(())?;
            process_ticks(&pid)
        })
        .sum()
}

/// The machine's (total, idle) ticks from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // idle and iowait are the fourth and fifth values.
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (values.iter().sum(), idle)
}
