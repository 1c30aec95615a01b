//! The command line contract: exit codes and what a person sees.

use std::path::{Path, PathBuf};
use std::process::Command;

fn weft_sim(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weft-sim"))
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .output()
        .expect("weft-sim runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// A fresh directory for one test's output files.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-sim-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_passing_scenario_exits_0() {
    let (code, out) = weft_sim(&["run", "../scenarios/three-nodes.toml"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("three-nodes (seed 1, engine events): PASS"),
        "{out}"
    );
}

#[test]
fn a_failing_check_exits_1_with_the_seed_and_the_replay_command() {
    let (code, out) = weft_sim(&["run", "tests/fixtures/must-fail.toml", "--seed", "5"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL line"), "{out}");
    assert!(out.contains("FAILED with seed 5"), "{out}");
    assert!(
        out.contains("weft-sim run tests/fixtures/must-fail.toml --seed 5"),
        "{out}"
    );
}

#[test]
fn a_malformed_file_exits_2_with_file_line_and_column() {
    let (code, out) = weft_sim(&["run", "tests/fixtures/malformed.toml"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("tests/fixtures/malformed.toml:11:10: no node is named \"node7\""),
        "{out}"
    );
    let (code, _) = weft_sim(&["check", "tests/fixtures/malformed.toml"]);
    assert_eq!(code, 2);
    let (code, out) = weft_sim(&["check", "../scenarios/relay.toml", "../scenarios/wipe.toml"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn an_unwritable_output_exits_2_before_the_run() {
    let (code, out) = weft_sim(&[
        "run",
        "../scenarios/three-nodes.toml",
        "--trace",
        "/nonexistent/dir/trace.txt",
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("weft-sim: cannot write /nonexistent/dir/trace.txt"),
        "{out}"
    );
    assert!(!out.contains("PASS"), "the run went ahead: {out}");
}

#[test]
fn a_file_that_never_ends_is_an_error_not_an_endless_read() {
    let (code, out) = weft_sim(&["check", "/dev/zero"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("/dev/zero:1:1: the file is larger than 16 MiB"),
        "{out}"
    );
}

#[test]
fn a_bad_command_line_exits_2() {
    let (code, _) = weft_sim(&["run", "../scenarios/relay.toml", "--seeds", "9..3"]);
    assert_eq!(code, 2);
    let (code, out) = weft_sim(&["run", "../scenarios/relay.toml", "--engine", "tokio"]);
    assert_eq!(code, 2, "{out}");
}

#[test]
fn the_turmoil_engine_runs_a_scenario_and_names_itself_in_the_replay_command() {
    let (code, out) = weft_sim(&["run", "../scenarios/relay.toml", "--engine", "turmoil"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("engine turmoil): PASS"), "{out}");
    let (code, out) = weft_sim(&[
        "run",
        "tests/fixtures/must-fail.toml",
        "--engine",
        "turmoil",
        "--seed",
        "4",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("must-fail.toml --engine turmoil --seed 4 --trace trace.txt"),
        "{out}"
    );
}

#[test]
fn a_seed_sweep_stops_at_the_first_failure() {
    let (code, out) = weft_sim(&["run", "tests/fixtures/must-fail.toml", "--seeds", "3..6"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED with seed 3"), "{out}");
    let (code, out) = weft_sim(&["run", "../scenarios/relay.toml", "--seeds", "1..4"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("all 3 seeds passed"), "{out}");
}

#[test]
fn a_seed_sweep_writes_the_trace_of_the_failing_seed() {
    let dir = scratch("sweep");
    let trace = |seeds: &[&str], file: &str| {
        let path = dir.join(file);
        let mut args = vec!["run", "tests/fixtures/must-fail.toml"];
        args.extend_from_slice(seeds);
        args.extend(["--trace", path.to_str().unwrap()]);
        let (code, out) = weft_sim(&args);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("FAILED with seed 3"), "{out}");
        std::fs::read(&path).unwrap()
    };
    let swept = trace(&["--seeds", "3..6"], "swept.txt");
    assert!(!swept.is_empty());
    assert_eq!(swept, trace(&["--seed", "3"], "replayed.txt"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn trace_and_json_files_are_written() {
    let dir = scratch("outputs");
    let (trace, json) = (dir.join("t.txt"), dir.join("r.json"));
    let (code, out) = weft_sim(&[
        "run",
        "../scenarios/relay.toml",
        "--trace",
        trace.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    let t = std::fs::read_to_string(&trace).unwrap();
    assert!(
        t.contains("event line") && t.contains("cut node1 node3"),
        "{t}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["passed"], true);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pcap_holds_every_datagram_as_ethernet_ipv4_udp() {
    let path = std::env::temp_dir().join(format!("weft-sim-{}.pcap", std::process::id()));
    let (code, out) = weft_sim(&[
        "run",
        "../scenarios/relay.toml",
        "--pcap",
        path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    let file = std::fs::File::open(&path).unwrap();
    let mut reader = pcap_file::pcap::PcapReader::new(file).unwrap();
    assert_eq!(reader.header().datalink, pcap_file::DataLink::ETHERNET);
    let mut packets = 0;
    while let Some(packet) = reader.next_packet() {
        let data = packet.unwrap().data;
        assert_eq!(&data[12..14], &[0x08, 0x00], "IPv4 ethertype");
        assert_eq!(data[23], 17, "UDP");
        assert_eq!(&data[26..28], &[192, 168], "underlay source address");
        assert_eq!(
            u16::from_be_bytes([data[36], data[37]]),
            6783,
            "weft's port"
        );
        assert_eq!(&data[42..46], b"WEFT", "a weft datagram");
        packets += 1;
    }
    assert!(packets > 100, "{packets} packets");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn the_html_report_is_self_contained_and_shows_the_run() {
    let path = std::env::temp_dir().join(format!("weft-sim-{}.html", std::process::id()));
    let (code, out) = weft_sim(&[
        "run",
        "../scenarios/relay.toml",
        "--report",
        path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    let page = std::fs::read_to_string(&path).unwrap();
    for part in [
        "<h2>Timeline</h2>",
        "<h2>Nodes converged</h2>",
        "<h2>Control traffic</h2>",
        "<h2>Final topology</h2>",
        "<polyline",
        "class=\"direct\"",
        "class=\"relayed\"",
    ] {
        assert!(page.contains(part), "missing {part}");
    }
    assert!(
        page.contains("cut node1 node3"),
        "the cut is on the timeline"
    );
    for fetch in ["http://", "https://", "src=", "href=", "@import"] {
        assert!(
            !page.contains(fetch),
            "the page must not fetch anything ({fetch})"
        );
    }
    std::fs::remove_file(&path).unwrap();
}

/// Runs weft-sim and returns its exit code, output and peak resident
/// memory in KiB (the kernel's count for this one child, from `wait4`).
#[expect(
    clippy::zombie_processes,
    reason = "reaped by wait4, which also tells its peak memory"
)]
fn weft_sim_peak_rss(args: &[&str]) -> (i32, String, i64) {
    use std::os::unix::process::ExitStatusExt;
    let child = Command::new(env!("CARGO_BIN_EXE_weft-sim"))
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("weft-sim runs");
    let pid = child.id() as libc::pid_t;
    // Read both pipes before waiting, so a full pipe cannot stall it.
    let (mut stdout, mut stderr) = (child.stdout.unwrap(), child.stderr.unwrap());
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
    text += &err.join().unwrap();
    let mut status = 0;
    // SAFETY: plain system call on our own child, with valid out-pointers.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
    let code = std::process::ExitStatus::from_raw(status)
        .code()
        .unwrap_or(-1);
    (code, text, usage.ru_maxrss)
}

/// A scenario of `nodes` nodes (no `peers` key: each knows every other)
/// lasting `duration`, with one check at its end.
fn generated(dir: &Path, nodes: usize, duration: &str) -> PathBuf {
    let mut text = format!("name = \"generated\"\nduration = \"{duration}\"\n");
    for i in 0..nodes {
        text += &format!(
            "\n[[nodes]]\nname = \"node{i}\"\naddress = \"10.{}.{}.{}\"\n",
            i >> 16,
            (i >> 8) & 0xff,
            i & 0xff
        );
    }
    text += "\n[[checks]]\nat = \"end\"\nexpect = \"converged\"\n";
    let path = dir.join(format!("n{nodes}-{duration}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn memory_does_not_grow_with_the_simulated_duration() {
    let dir = scratch("duration");
    let run = |duration: &str| {
        let path = generated(&dir, 2, duration);
        let html = dir.join("page.html");
        let (code, out, kib) = weft_sim_peak_rss(&[
            "run",
            path.to_str().unwrap(),
            "--report",
            html.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("PASS"), "{out}");
        kib
    };
    let short = run("100s");
    // Ten samples a simulated second: storing each one grew this run by
    // ~50 MB (and `999999999s` by 2.7 GB in 15 s, until killed).
    let long = run("40000s");
    assert!(
        long < short + 16 * 1024,
        "100 s peaked at {short} KiB, 40,000 s at {long} KiB"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checking_a_big_file_takes_memory_linear_in_its_nodes() {
    let dir = scratch("check-big");
    let path = generated(&dir, 10_000, "60s");
    let (code, out, kib) = weft_sim_peak_rss(&["check", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("10000 nodes"), "{out}");
    // A peer list per node (each knows the 9,999 others) was 10^8 indexes:
    // 1.3 GB. The file is 0.6 MB.
    assert!(
        kib < 128 * 1024,
        "checking 10,000 nodes peaked at {kib} KiB"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
