//! Replays the scenario library (scenarios/*.toml): every check must pass,
//! and each outcome is an insta snapshot under snapshots/scenarios/.

use std::path::{Path, PathBuf};
use weft_sim::report::{self, Engine};
use weft_sim::scenario;

/// Scenarios bigger than this are replayed only with WEFT_SIM_ALL=1 (or by
/// hand with `weft-sim run`): they take minutes, not seconds.
const MAX_NODES_IN_TESTS: usize = 50;
/// Bigger ones replayed anyway: what they show needs more nodes than a
/// connection limit (100) holds.
const BIG_IN_TESTS: &[&str] = &["three-hundred-one-seed"];

fn library() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("scenarios/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_library_scenario_passes_and_matches_its_snapshot() {
    let all = std::env::var("WEFT_SIM_ALL").is_ok_and(|v| v == "1");
    let mut ran = 0;
    for file in library() {
        let s = scenario::load(&file).unwrap_or_else(|e| panic!("{e}"));
        if s.nodes.len() > MAX_NODES_IN_TESTS && !all && !BIG_IN_TESTS.contains(&s.name.as_str()) {
            continue;
        }
        let (report, _) = report::run(&s, s.seed, Engine::Events, false);
        assert!(report.passed, "{}:\n{}", file.display(), report.text());
        let mut settings = insta::Settings::clone_current();
        settings.set_snapshot_path("../../snapshots/scenarios");
        settings.set_prepend_module_to_snapshot(false);
        settings.bind(|| insta::assert_json_snapshot!(s.name.clone(), report));
        ran += 1;
    }
    assert!(ran >= 10, "only {ran} scenarios replayed");
}

/// Scenarios this small also run on the turmoil engine.
const MAX_NODES_ON_TURMOIL: usize = 10;

#[test]
fn the_same_seed_gives_the_same_trace_and_another_seed_another() {
    let s = scenario::load(&library_file("partition-heal")).unwrap();
    for engine in [Engine::Events, Engine::Turmoil] {
        let (a, ta) = report::run(&s, 7, engine, true);
        let (b, tb) = report::run(&s, 7, engine, true);
        assert_eq!(ta.text(), tb.text(), "{engine:?}");
        assert_eq!(a.trace_hash, b.trace_hash, "{engine:?}");
        let (c, tc) = report::run(&s, 8, engine, true);
        assert_ne!(ta.text(), tc.text(), "{engine:?}");
        assert_ne!(a.trace_hash, c.trace_hash, "{engine:?}");
    }
}

/// Every small library scenario passes on the turmoil engine (the agent's
/// own driver loop over simulated sockets) with the same check outcomes as
/// on the events engine.
#[test]
fn small_scenarios_give_the_same_outcomes_on_both_engines() {
    let mut ran = 0;
    for file in library() {
        let s = scenario::load(&file).unwrap_or_else(|e| panic!("{e}"));
        if s.nodes.len() > MAX_NODES_ON_TURMOIL {
            continue;
        }
        let (events, _) = report::run(&s, s.seed, Engine::Events, false);
        let (turmoil, _) = report::run(&s, s.seed, Engine::Turmoil, false);
        assert_eq!(turmoil.engine, "turmoil");
        assert!(turmoil.passed, "{}:\n{}", file.display(), turmoil.text());
        let outcomes = |r: &report::Report| -> Vec<(usize, String, bool)> {
            r.checks
                .iter()
                .map(|c| (c.line, c.expect.clone(), c.passed))
                .collect()
        };
        assert_eq!(outcomes(&events), outcomes(&turmoil), "{}", s.name);
        ran += 1;
    }
    assert!(ran >= 10, "only {ran} scenarios ran on both engines");
}

/// A bounded sweep over the core scenarios: safety and liveness over many
/// seeds, not just the one in the file.
#[test]
fn core_scenarios_pass_over_a_seed_sweep() {
    let seeds: u64 = std::env::var("WEFT_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    for name in [
        "partition-heal",
        "minority-bootstrap",
        "crash-restart",
        "remove-reclaim",
        "relay",
        "late-joiner",
        "ten-nodes",
    ] {
        let s = scenario::load(&library_file(name)).unwrap();
        for seed in 1..=seeds {
            let (report, _) = report::run(&s, seed, Engine::Events, false);
            assert!(report.passed, "{name} seed {seed}:\n{}", report.text());
        }
    }
}

/// A smaller sweep on the turmoil engine (WEFT_SIM_TURMOIL_SEEDS, default 5).
#[test]
fn core_scenarios_pass_over_a_seed_sweep_on_turmoil() {
    let seeds: u64 = std::env::var("WEFT_SIM_TURMOIL_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    for name in [
        "partition-heal",
        "crash-restart",
        "relay",
        "loss-30",
        "ten-nodes",
    ] {
        let s = scenario::load(&library_file(name)).unwrap();
        for seed in 1..=seeds {
            let (report, _) = report::run(&s, seed, Engine::Turmoil, false);
            assert!(
                report.passed,
                "{name} seed {seed} (turmoil):\n{}",
                report.text()
            );
        }
    }
}

fn library_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../scenarios/{name}.toml"))
}

/// A node whose state file was restored from an older backup is back as
/// fast as after a plain restart: its peers do not refuse its datagrams as
/// replays of an older boot. The same scenario with `restart` in place of
/// `restore` is the yardstick, seed by seed, on both engines.
#[test]
fn a_restore_converges_as_fast_as_a_plain_restart() {
    let file = library_file("restore");
    let restore = scenario::load(&file).unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let restart = text.replace("do = \"restore\"", "do = \"restart\"");
    assert_ne!(restart, text);
    let restart = scenario::parse("restart", &restart).unwrap();
    for (engine, seeds) in [(Engine::Events, 1..=20), (Engine::Turmoil, 1..=3)] {
        for seed in seeds {
            let converged = |s| {
                let (report, _) = report::run(s, seed, engine, false);
                assert!(report.passed, "{engine:?} seed {seed}:\n{}", report.text());
                report.convergence_after_last_disruption_s.unwrap()
            };
            let (restored, restarted) = (converged(&restore), converged(&restart));
            assert!(
                restored <= restarted + 0.5,
                "{engine:?} seed {seed}: restore {restored} s, restart {restarted} s"
            );
        }
    }
}
