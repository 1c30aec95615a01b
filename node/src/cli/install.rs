//! `weft install-cni`: copies the CNI plugin and the network configuration
//! from the image onto the node (what the DaemonSet's init container runs).
//!
//! Each file is written to a temporary file in the destination directory,
//! fsynced, given its mode, renamed over the destination and the directory
//! fsynced: the kubelet and the container runtime see either the old file
//! or the new one, whole, never a half-written plugin. Renaming (rather than
//! writing in place) also works while the old plugin is running ("text file
//! busy"). The plugin goes first: the runtime declares the network ready as
//! soon as the conflist appears, and the plugin must be there by then.
//! A destination that already holds the same bytes and mode is left alone.
//! Nothing is written unless both sources can be read and the conflist is a
//! conflist for weft-cni.

use clap::Args;
use std::fmt;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// File name of the plugin, in the image and in the CNI binary directory.
pub const PLUGIN_NAME: &str = "weft-cni";
/// File name of the network configuration, in the image and in the CNI
/// configuration directory.
pub const CONFLIST_NAME: &str = "10-weft.conflist";

const PLUGIN_MODE: u32 = 0o755;
const CONFLIST_MODE: u32 = 0o644;

#[derive(Args, Debug, Clone)]
pub struct InstallArgs {
    /// Directory the container runtime looks for CNI plugins in.
    #[arg(long, env = "WEFT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Directory the container runtime reads CNI network configurations from.
    #[arg(long, env = "WEFT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The weft-cni binary to install [default: `weft-cni` beside this
    /// executable]
    #[arg(long, env = "WEFT_CNI_PLUGIN")]
    pub plugin: Option<PathBuf>,
    /// The conflist to install [default: `10-weft.conflist` beside this
    /// executable]
    #[arg(long, env = "WEFT_CNI_CONFLIST")]
    pub conflist: Option<PathBuf>,
}

/// Where `weft reset` removes the installed CNI files from.
#[derive(Args, Debug, Clone)]
pub struct CniDirs {
    /// Directory the CNI plugin was installed in.
    #[arg(long, env = "WEFT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Directory the CNI network configuration was installed in.
    #[arg(long, env = "WEFT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
}

/// Removes what `install` wrote: the conflist first (the runtime stops
/// choosing weft for new pods), then the plugin. Returns the files that
/// were there; missing ones are not an error, so a second run is a no-op.
pub fn uninstall(dirs: &CniDirs) -> Result<Vec<PathBuf>, InstallError> {
    let mut removed = Vec::new();
    for (dir, name) in [
        (&dirs.cni_conf_dir, CONFLIST_NAME),
        (&dirs.cni_bin_dir, PLUGIN_NAME),
    ] {
        let dest = dir.join(name);
        match fs::remove_file(&dest) {
            Ok(()) => {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|source| InstallError::Write {
                        dest: dest.clone(),
                        step: "sync the directory after removing",
                        source,
                    })?;
                removed.push(dest);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(InstallError::Write {
                    dest,
                    step: "remove",
                    source,
                });
            }
        }
    }
    Ok(removed)
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "cannot find the directory of the running executable to look for {name} in: {source} (set {flag})"
    )]
    NoExeDir {
        name: &'static str,
        flag: &'static str,
        source: io::Error,
    },
    #[error("cannot read the {what} {}: {source}{hint}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
        /// How to name another source when this one was the default.
        hint: String,
    },
    #[error("the plugin {} is empty", path.display())]
    EmptyPlugin { path: PathBuf },
    #[error("the conflist {} is refused: {reason}", path.display())]
    InvalidConflist { path: PathBuf, reason: String },
    #[error("cannot install {}: {step}: {source}", dest.display())]
    Write {
        dest: PathBuf,
        step: &'static str,
        source: io::Error,
    },
}

/// What happened to one destination file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It did not exist.
    Installed,
    /// It existed with other bytes or another mode.
    Replaced,
    /// It already held the same bytes and mode; not touched.
    Unchanged,
}

/// One installed (or left alone) file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub dest: PathBuf,
    pub source: PathBuf,
    pub bytes: usize,
    pub mode: u32,
    pub outcome: Outcome,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.outcome {
            Outcome::Installed => "installed",
            Outcome::Replaced => "replaced",
            Outcome::Unchanged => "unchanged",
        };
        write!(
            f,
            "{what} {} ({} bytes, mode {:04o}, from {})",
            self.dest.display(),
            self.bytes,
            self.mode,
            self.source.display()
        )
    }
}

/// `weft install-cni`: one line per file on stdout, the error on stderr.
pub fn main(args: InstallArgs) -> ExitCode {
    let exe_dir = std::env::current_exe().and_then(|exe| {
        exe.parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| io::Error::other(format!("{} has no parent", exe.display())))
    });
    match install(&args, exe_dir) {
        Ok(reports) => {
            for report in reports {
                println!("weft install-cni: {report}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft install-cni: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the plugin, then the conflist. `exe_dir` is where the sources
/// are looked for when their flags are not given.
pub fn install(
    args: &InstallArgs,
    exe_dir: io::Result<PathBuf>,
) -> Result<Vec<Report>, InstallError> {
    let exe_dir = exe_dir.as_ref();
    let source = |given: &Option<PathBuf>, name, flag| match given {
        Some(path) => Ok(path.clone()),
        None => exe_dir
            .map(|dir| dir.join(name))
            .map_err(|e| InstallError::NoExeDir {
                name,
                flag,
                source: io::Error::new(e.kind(), e.to_string()),
            }),
    };
    let plugin_src = source(&args.plugin, PLUGIN_NAME, "--plugin or WEFT_CNI_PLUGIN")?;
    let conflist_src = source(
        &args.conflist,
        CONFLIST_NAME,
        "--conflist or WEFT_CNI_CONFLIST",
    )?;

    // Read and check both sources before touching anything.
    let read = |what, path: &PathBuf, given: &Option<PathBuf>, flag| {
        fs::read(path).map_err(|source| InstallError::Read {
            what,
            path: path.clone(),
            source,
            hint: match given {
                Some(_) => String::new(),
                None => format!(" (the default, beside this executable; set {flag})"),
            },
        })
    };
    let plugin = read(
        "plugin",
        &plugin_src,
        &args.plugin,
        "--plugin or WEFT_CNI_PLUGIN",
    )?;
    if plugin.is_empty() {
        return Err(InstallError::EmptyPlugin { path: plugin_src });
    }
    let conflist = read(
        "conflist",
        &conflist_src,
        &args.conflist,
        "--conflist or WEFT_CNI_CONFLIST",
    )?;
    validate_conflist(&conflist).map_err(|reason| InstallError::InvalidConflist {
        path: conflist_src.clone(),
        reason,
    })?;

    let plugin_report = put(
        &plugin_src,
        &plugin,
        &args.cni_bin_dir,
        PLUGIN_NAME,
        PLUGIN_MODE,
    )?;
    let conflist_report = put(
        &conflist_src,
        &conflist,
        &args.cni_conf_dir,
        CONFLIST_NAME,
        CONFLIST_MODE,
    )?;
    Ok(vec![plugin_report, conflist_report])
}

/// A conflist is a JSON object whose `plugins` array holds an object of
/// `"type": "weft-cni"`; anything else would leave the node without a
/// working pod network, so it is refused.
pub fn validate_conflist(bytes: &[u8]) -> Result<(), String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object().ok_or("not a JSON object".to_string())?;
    let plugins = match object.get("plugins") {
        Some(serde_json::Value::Array(plugins)) => plugins,
        Some(_) => return Err("\"plugins\" is not an array".into()),
        None => {
            return Err("no \"plugins\" array (a single-plugin .conf is not a conflist)".into());
        }
    };
    if plugins
        .iter()
        .any(|p| p.get("type").and_then(|t| t.as_str()) == Some(PLUGIN_NAME))
    {
        Ok(())
    } else {
        Err(format!(
            "no plugin of \"type\": \"{PLUGIN_NAME}\" in \"plugins\""
        ))
    }
}

/// Puts `bytes` at `dir/name` with `mode`, atomically, unless it is there
/// already.
fn put(
    source: &Path,
    bytes: &[u8],
    dir: &Path,
    name: &str,
    mode: u32,
) -> Result<Report, InstallError> {
    let dest = dir.join(name);
    let fail = |step| {
        let dest = dest.clone();
        move |source| InstallError::Write { dest, step, source }
    };
    let report = |outcome| Report {
        dest: dest.clone(),
        source: source.to_path_buf(),
        bytes: bytes.len(),
        mode,
        outcome,
    };

    let outcome = match fs::metadata(&dest) {
        Ok(meta) if meta.is_dir() => {
            return Err(fail("it is a directory")(io::Error::from(
                io::ErrorKind::IsADirectory,
            )));
        }
        Ok(meta) => {
            let same_mode = meta.permissions().mode() & 0o7777 == mode;
            let same_bytes = meta.len() == bytes.len() as u64
                && fs::read(&dest).map_err(fail("reading the existing file"))? == bytes;
            if same_mode && same_bytes {
                return Ok(report(Outcome::Unchanged));
            }
            Outcome::Replaced
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Outcome::Installed,
        Err(e) => return Err(fail("checking the existing file")(e)),
    };

    fs::create_dir_all(dir).map_err(fail("creating the directory"))?;
    // In `dir`, so the rename never crosses file systems; hidden, and not
    // ending in .conf/.conflist/.json, so a runtime scanning the directory
    // never loads a half-written configuration.
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = write_temp(&temp, bytes, mode).and_then(|()| {
        fs::rename(&temp, &dest).map_err(fail("renaming the temporary file over it"))
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    // The rename is durable only once the directory is synced.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail("syncing the directory"))?;
    Ok(report(outcome))
}

fn write_temp(temp: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let fail = |step| {
        move |source| InstallError::Write {
            dest: temp.to_path_buf(),
            step,
            source,
        }
    };
    // A temporary file left by a crashed run of the same PID (always 1 in an
    // init container) is replaced.
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(temp)
        .map_err(fail("creating the temporary file"))?;
    out.write_all(bytes).map_err(fail("writing"))?;
    // Explicitly, as the mode given to open() is masked by the umask.
    out.set_permissions(Permissions::from_mode(mode))
        .map_err(fail("setting the mode"))?;
    out.sync_all().map_err(fail("syncing"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::os::unix::fs::MetadataExt;

    const CONFLIST: &str = r#"{"cniVersion":"1.0.0","name":"weft","plugins":[{"type":"weft-cni"},{"type":"portmap"}]}"#;

    /// A node (empty CNI directories) and an image (the two sources).
    struct Setup {
        _root: tempfile::TempDir,
        image: PathBuf,
        args: InstallArgs,
    }

    impl Setup {
        fn new() -> Setup {
            let root = tempfile::tempdir().unwrap();
            let image = root.path().join("image");
            fs::create_dir(&image).unwrap();
            fs::write(image.join(PLUGIN_NAME), b"\x7fELF plugin v1").unwrap();
            fs::write(image.join(CONFLIST_NAME), CONFLIST).unwrap();
            let args = InstallArgs {
                cni_bin_dir: root.path().join("opt/cni/bin"),
                cni_conf_dir: root.path().join("etc/cni/net.d"),
                plugin: None,
                conflist: None,
            };
            fs::create_dir_all(&args.cni_bin_dir).unwrap();
            fs::create_dir_all(&args.cni_conf_dir).unwrap();
            Setup {
                _root: root,
                image,
                args,
            }
        }

        fn run(&self) -> Result<Vec<Report>, InstallError> {
            install(&self.args, Ok(self.image.clone()))
        }

        fn plugin_dest(&self) -> PathBuf {
            self.args.cni_bin_dir.join(PLUGIN_NAME)
        }

        fn conflist_dest(&self) -> PathBuf {
            self.args.cni_conf_dir.join(CONFLIST_NAME)
        }

        fn outcomes(reports: &[Report]) -> Vec<Outcome> {
            reports.iter().map(|r| r.outcome).collect()
        }

        /// Only the installed files, no temporary leftovers.
        fn assert_clean(&self) {
            for dir in [&self.args.cni_bin_dir, &self.args.cni_conf_dir] {
                for entry in fs::read_dir(dir).unwrap() {
                    let name = entry.unwrap().file_name();
                    let name = name.to_str().unwrap();
                    assert!(
                        name == PLUGIN_NAME || name == CONFLIST_NAME,
                        "leftover {name}"
                    );
                }
            }
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn uninstall_removes_both_files_and_a_second_run_is_a_no_op() {
        let s = Setup::new();
        s.run().unwrap();
        let other = s.args.cni_bin_dir.join("portmap");
        fs::write(&other, b"not weft's").unwrap();
        let dirs = CniDirs {
            cni_bin_dir: s.args.cni_bin_dir.clone(),
            cni_conf_dir: s.args.cni_conf_dir.clone(),
        };
        assert_eq!(
            uninstall(&dirs).unwrap(),
            [s.conflist_dest(), s.plugin_dest()]
        );
        assert!(!s.conflist_dest().exists() && !s.plugin_dest().exists());
        assert_eq!(fs::read(&other).unwrap(), b"not weft's");
        assert_eq!(uninstall(&dirs).unwrap(), Vec::<PathBuf>::new());
    }

    #[test]
    fn installs_both_files_with_their_modes() {
        let s = Setup::new();
        let reports = s.run().unwrap();
        assert_eq!(
            Setup::outcomes(&reports),
            [Outcome::Installed, Outcome::Installed]
        );
        assert_eq!(fs::read(s.plugin_dest()).unwrap(), b"\x7fELF plugin v1");
        assert_eq!(fs::read_to_string(s.conflist_dest()).unwrap(), CONFLIST);
        assert_eq!(mode(&s.plugin_dest()), 0o755);
        assert_eq!(mode(&s.conflist_dest()), 0o644);
        assert_eq!(reports[0].source, s.image.join(PLUGIN_NAME));
        let line = reports[0].to_string();
        assert!(line.starts_with("installed "), "{line}");
        assert!(line.contains("mode 0755"), "{line}");
        s.assert_clean();
    }

    #[test]
    fn creates_missing_destination_directories() {
        let mut s = Setup::new();
        s.args.cni_conf_dir = s.args.cni_conf_dir.join("deeper");
        s.run().unwrap();
        assert_eq!(fs::read_to_string(s.conflist_dest()).unwrap(), CONFLIST);
    }

    #[test]
    fn reinstall_of_identical_files_touches_nothing() {
        let s = Setup::new();
        s.run().unwrap();
        let inode = |p: &Path| {
            let m = fs::metadata(p).unwrap();
            (m.ino(), m.mtime(), m.mtime_nsec())
        };
        let before = (inode(&s.plugin_dest()), inode(&s.conflist_dest()));
        let reports = s.run().unwrap();
        assert_eq!(
            Setup::outcomes(&reports),
            [Outcome::Unchanged, Outcome::Unchanged]
        );
        assert!(reports[1].to_string().starts_with("unchanged "));
        assert_eq!(before, (inode(&s.plugin_dest()), inode(&s.conflist_dest())));
        s.assert_clean();
    }

    #[test]
    fn changed_files_are_replaced_by_rename() {
        let s = Setup::new();
        s.run().unwrap();
        let old_inode = fs::metadata(s.plugin_dest()).unwrap().ino();
        // A new image: a new plugin; the conflist stays the same.
        fs::write(s.image.join(PLUGIN_NAME), b"\x7fELF plugin v2, longer").unwrap();
        let reports = s.run().unwrap();
        assert_eq!(
            Setup::outcomes(&reports),
            [Outcome::Replaced, Outcome::Unchanged]
        );
        assert_eq!(
            fs::read(s.plugin_dest()).unwrap(),
            b"\x7fELF plugin v2, longer"
        );
        assert_ne!(fs::metadata(s.plugin_dest()).unwrap().ino(), old_inode);
        assert_eq!(mode(&s.plugin_dest()), 0o755);
        s.assert_clean();
    }

    #[test]
    fn same_bytes_with_the_wrong_mode_are_replaced() {
        let s = Setup::new();
        s.run().unwrap();
        fs::set_permissions(s.plugin_dest(), Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(s.conflist_dest(), Permissions::from_mode(0o600)).unwrap();
        let reports = s.run().unwrap();
        assert_eq!(
            Setup::outcomes(&reports),
            [Outcome::Replaced, Outcome::Replaced]
        );
        assert_eq!(mode(&s.plugin_dest()), 0o755);
        assert_eq!(mode(&s.conflist_dest()), 0o644);
    }

    #[test]
    fn invalid_conflists_are_refused_and_nothing_is_touched() {
        for (bad, why) in [
            ("{\"plugins\": [", "not JSON"),
            ("[1, 2]", "not a JSON object"),
            (r#"{"type": "weft-cni"}"#, "no \"plugins\" array"),
            (r#"{"plugins": {"type": "weft-cni"}}"#, "not an array"),
            (r#"{"plugins": [{"type": "bridge"}]}"#, "no plugin of"),
            (r#"{"plugins": []}"#, "no plugin of"),
        ] {
            let s = Setup::new();
            // An older install is on the node.
            fs::write(s.plugin_dest(), b"old plugin").unwrap();
            fs::write(s.conflist_dest(), b"old conflist").unwrap();
            fs::write(s.image.join(CONFLIST_NAME), bad).unwrap();
            let err = s.run().unwrap_err();
            assert!(
                matches!(err, InstallError::InvalidConflist { .. }),
                "{bad}: {err}"
            );
            let message = err.to_string();
            assert!(message.contains(why), "{bad}: {message}");
            assert!(message.contains(CONFLIST_NAME), "{message}");
            assert_eq!(fs::read(s.plugin_dest()).unwrap(), b"old plugin");
            assert_eq!(fs::read(s.conflist_dest()).unwrap(), b"old conflist");
            s.assert_clean();
        }
    }

    #[test]
    fn the_shipped_conflist_is_valid() {
        let shipped = include_bytes!("../../../deploy/10-weft.conflist");
        assert_eq!(validate_conflist(shipped), Ok(()));
    }

    /// containerd 1.6's libcni (CNI <= 1.0) reads `cniVersion`; runtimes
    /// speaking CNI 1.1 pick the newest of `cniVersions` and then call
    /// STATUS and GC.
    #[test]
    fn the_shipped_conflist_offers_cni_1_0_and_1_1() {
        let shipped: serde_json::Value =
            serde_json::from_slice(include_bytes!("../../../deploy/10-weft.conflist")).unwrap();
        assert_eq!(shipped["cniVersion"], "1.0.0");
        assert_eq!(
            shipped["cniVersions"],
            serde_json::json!(["1.0.0", "1.1.0"])
        );
    }

    #[test]
    fn missing_sources_are_named_and_nothing_is_installed() {
        let s = Setup::new();
        fs::remove_file(s.image.join(PLUGIN_NAME)).unwrap();
        let err = s.run().unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, InstallError::Read { what: "plugin", .. }));
        assert!(
            message.contains(&s.image.join(PLUGIN_NAME).display().to_string()),
            "{message}"
        );
        assert!(
            message.contains("set --plugin or WEFT_CNI_PLUGIN"),
            "{message}"
        );
        assert!(!s.conflist_dest().exists());

        let s = Setup::new();
        let mut args = s.args.clone();
        args.conflist = Some(s.image.join("nope.conflist"));
        let err = install(&args, Ok(s.image.clone())).unwrap_err();
        assert!(err.to_string().contains("nope.conflist"), "{err}");
        assert!(!err.to_string().contains("set --conflist"), "{err}");
        assert!(!s.plugin_dest().exists());

        // An empty plugin is as good as missing.
        let s = Setup::new();
        fs::write(s.image.join(PLUGIN_NAME), b"").unwrap();
        assert!(matches!(
            s.run().unwrap_err(),
            InstallError::EmptyPlugin { .. }
        ));
        assert!(!s.plugin_dest().exists());
    }

    #[test]
    fn explicit_sources_need_no_executable_directory() {
        let s = Setup::new();
        let mut args = s.args.clone();
        args.plugin = Some(s.image.join(PLUGIN_NAME));
        args.conflist = Some(s.image.join(CONFLIST_NAME));
        let no_exe = || Err(io::Error::other("no /proc"));
        assert_eq!(install(&args, no_exe()).unwrap().len(), 2);

        args.conflist = None;
        let err = install(&args, no_exe()).unwrap_err();
        assert!(err.to_string().contains("WEFT_CNI_CONFLIST"), "{err}");
    }

    #[test]
    fn a_directory_in_the_way_is_an_error() {
        let s = Setup::new();
        fs::create_dir(s.plugin_dest()).unwrap();
        let err = s.run().unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
        assert!(!s.conflist_dest().exists());
    }

    #[test]
    fn flags_and_defaults() {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: InstallArgs,
        }
        let cli = Cli::try_parse_from(["weft"]).unwrap();
        assert_eq!(cli.args.cni_bin_dir, Path::new("/opt/cni/bin"));
        assert_eq!(cli.args.cni_conf_dir, Path::new("/etc/cni/net.d"));
        assert_eq!(cli.args.plugin, None);
        assert_eq!(cli.args.conflist, None);
        let cli = Cli::try_parse_from([
            "weft",
            "--cni-bin-dir=/b",
            "--cni-conf-dir=/c",
            "--plugin=/p",
            "--conflist=/l",
        ])
        .unwrap();
        assert_eq!(cli.args.cni_bin_dir, Path::new("/b"));
        assert_eq!(cli.args.cni_conf_dir, Path::new("/c"));
        assert_eq!(cli.args.plugin.as_deref(), Some(Path::new("/p")));
        assert_eq!(cli.args.conflist.as_deref(), Some(Path::new("/l")));
    }
}
