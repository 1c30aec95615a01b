//! `weft-sim`: run or check scenario files.
//!
//! Exit status: 0 every check passed; 1 a check failed (with the seed and
//! the command that replays it); 2 the scenario or command line is invalid.

use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use weft_sim::report::{self, Engine};
use weft_sim::scenario::{self, Scenario};

// A 1,000-node run holds two gigabytes of topology that churns while the
// cluster starts; glibc's allocator handed pages back and faulted them in
// again (a tenth of the run). So did mimalloc, 100 ms after they fell
// free: `keep_freed_memory` tells it not to.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h; its Rust binding
/// names no constant for it): how long freed memory waits before it goes
/// back to the OS, -1 for never.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option, first thing in
    // `main`, while no other thread exists to read it.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[derive(Parser)]
#[command(
    name = "weft-sim",
    version,
    about = "Deterministic multi-node simulator for weft"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario and evaluate its checks.
    Run {
        file: PathBuf,
        /// `events` (discrete-event, default) or `turmoil`.
        #[arg(long, value_enum, default_value_t = Engine::Events)]
        engine: Engine,
        /// Seed (default: the scenario's `seed`, else 1).
        #[arg(long, conflicts_with = "seeds")]
        seed: Option<u64>,
        /// A range of seeds, A..B (B excluded); stops at the first failure
        /// and writes the files asked for (--trace ...) for that seed.
        #[arg(long, value_parser = parse_seeds)]
        seeds: Option<(u64, u64)>,
        /// Write the trace (one line per event) to FILE.
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
        /// Write every simulated datagram as pcap to FILE.
        #[arg(long, value_name = "FILE")]
        pcap: Option<PathBuf>,
        /// Write the report as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Write a self-contained HTML page of the run to FILE.
        #[arg(long, value_name = "FILE.html")]
        report: Option<PathBuf>,
    },
    /// Parse and validate scenario files only.
    Check { files: Vec<PathBuf> },
}

fn parse_seeds(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or("write the range as A..B, e.g. 1..200")?;
    let a: u64 = a.parse().map_err(|_| format!("{a:?} is not a number"))?;
    let b: u64 = b.parse().map_err(|_| format!("{b:?} is not a number"))?;
    if a >= b {
        return Err(format!("the range {s} is empty"));
    }
    Ok((a, b))
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match cli.command {
        Command::Check { files } => check(&files),
        Command::Run {
            file,
            engine,
            seed,
            seeds,
            trace,
            pcap,
            json,
            report,
        } => {
            let scenario = match scenario::load(&file) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let run = Run {
                file,
                scenario,
                trace,
                json,
                pcap,
                html: report,
                engine,
            };
            match seeds {
                Some((a, b)) => run.sweep(a, b),
                None => run.once(seed.unwrap_or(run.scenario.seed)),
            }
        }
    }
}

fn check(files: &[PathBuf]) -> ExitCode {
    if files.is_empty() {
        eprintln!("weft-sim check: give at least one scenario file");
        return ExitCode::from(2);
    }
    let mut ok = true;
    for f in files {
        match scenario::load(f) {
            Ok(s) => println!(
                "{}: ok ({}, {} nodes, {} events, {} checks)",
                f.display(),
                s.name,
                s.nodes.len(),
                s.events.len(),
                s.checks.len()
            ),
            Err(e) => {
                eprintln!("{e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

struct Run {
    file: PathBuf,
    scenario: Scenario,
    trace: Option<PathBuf>,
    json: Option<PathBuf>,
    pcap: Option<PathBuf>,
    html: Option<PathBuf>,
    engine: Engine,
}

impl Run {
    fn once(&self, seed: u64) -> ExitCode {
        // A run may take minutes: learn before it, not after, that an
        // output cannot be written.
        for path in [&self.trace, &self.json, &self.html].into_iter().flatten() {
            if let Err(e) = std::fs::File::create(path) {
                eprintln!("weft-sim: cannot write {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
        let capture = match self
            .pcap
            .as_deref()
            .map(weft_sim::pcap::Capture::create)
            .transpose()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("weft-sim: {e}");
                return ExitCode::from(2);
            }
        };
        let started = std::time::Instant::now();
        let (report, trace, mut sim) = report::run_with(
            &self.scenario,
            seed,
            self.engine,
            self.trace.is_some(),
            capture,
        );
        let wall = started.elapsed();
        if let Some(capture) = sim.capture.take()
            && let Err(e) = capture.finish()
        {
            eprintln!("weft-sim: cannot write the capture: {e}");
            return ExitCode::from(2);
        }
        if let Some(path) = &self.html
            && let Err(e) = std::fs::write(path, weft_sim::html::page(&sim, &report))
        {
            eprintln!("weft-sim: cannot write the page to {}: {e}", path.display());
            return ExitCode::from(2);
        }
        print!("{}", report.text());
        // Wall time is not part of the (deterministic) report.
        let simulated = self.scenario.duration.as_secs_f64();
        println!(
            "  simulated {simulated:.0}s in {:.2}s wall ({:.1}x real time)",
            wall.as_secs_f64(),
            simulated / wall.as_secs_f64().max(1e-9)
        );
        if let Some(path) = &self.trace
            && let Err(e) = std::fs::write(path, trace.text())
        {
            eprintln!(
                "weft-sim: cannot write the trace to {}: {e}",
                path.display()
            );
            return ExitCode::from(2);
        }
        if let Some(path) = &self.json {
            let text = serde_json::to_string_pretty(&report).unwrap_or_default();
            if let Err(e) = std::fs::write(path, text + "\n") {
                eprintln!(
                    "weft-sim: cannot write the report to {}: {e}",
                    path.display()
                );
                return ExitCode::from(2);
            }
        }
        if report.passed {
            ExitCode::SUCCESS
        } else {
            self.explain_failure(seed);
            ExitCode::from(1)
        }
    }

    fn sweep(&self, first: u64, end: u64) -> ExitCode {
        let total = end - first;
        for (k, seed) in (first..end).enumerate() {
            let (report, _) = report::run(&self.scenario, seed, self.engine, false);
            eprint!(
                "\r{}: seed {seed} ({}/{total}) {}",
                self.scenario.name,
                k + 1,
                bar(k as u64 + 1, total)
            );
            let _ = std::io::stderr().flush();
            if !report.passed {
                eprintln!();
                if self.writes_files() {
                    // Runs replay exactly: run the failing seed again,
                    // writing the files asked for.
                    return self.once(seed);
                }
                print!("{}", report.text());
                self.explain_failure(seed);
                return ExitCode::from(1);
            }
        }
        eprintln!();
        println!(
            "{}: all {total} seeds passed ({first}..{end})",
            self.scenario.name
        );
        if self.writes_files() {
            println!("  no files written: a sweep writes them for a failing seed only");
        }
        ExitCode::SUCCESS
    }

    /// Whether --trace, --pcap, --json or --report was given.
    fn writes_files(&self) -> bool {
        [&self.trace, &self.pcap, &self.json, &self.html]
            .iter()
            .any(|p| p.is_some())
    }

    fn explain_failure(&self, seed: u64) {
        println!("FAILED with seed {seed}; replay it with:");
        println!(
            "  weft-sim run {}{} --seed {seed} --trace trace.txt",
            self.file.display(),
            match self.engine {
                Engine::Events => "",
                Engine::Turmoil => " --engine turmoil",
            }
        );
    }
}

fn bar(done: u64, total: u64) -> String {
    let width = 30;
    let filled = (done * width / total.max(1)) as usize;
    format!(
        "[{}{}]",
        "#".repeat(filled),
        " ".repeat(width as usize - filled)
    )
}
