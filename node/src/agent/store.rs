//! The node's state on disk: identity, ring and allocations, in one JSON
//! file under the data directory, written atomically (temp file, fsync,
//! rename, fsync of the directory) before anything that depends on it is
//! acknowledged. A lock file keeps two agents off one directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use weft_core::PersistedState;

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use data directory {dir}: {source}")]
    Directory {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "data directory {dir} is in use by another weft agent (it holds {dir}/lock); two agents must not share a data directory: give each its own --data-dir"
    )]
    InUse { dir: PathBuf },
    #[error("cannot read {file}: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{file} is corrupt ({reason}); it was left untouched. Move it away to start this node as a new peer (its addresses are then reclaimed from the others with `weft rmpeer`), or restore it from a backup"
    )]
    Corrupt { file: PathBuf, reason: String },
    #[error("cannot save {file}: {source}")]
    Write {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The data directory, locked for this process while the value lives.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

impl Store {
    /// Opens (creating if needed) and locks `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let directory = |source| StoreError::Directory {
            dir: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(directory)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(directory)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::InUse {
                    dir: dir.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(directory(e)),
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The saved state, `None` on a first start. A file that cannot be
    /// understood is an error, never silently replaced.
    pub fn load(&self) -> Result<Option<PersistedState>, StoreError> {
        let file = self.state_file();
        let bytes = match fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Read { file, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                file,
                reason: e.to_string(),
            })
    }

    /// Replaces the saved state atomically: a crash at any moment leaves
    /// either the old or the new file, whole.
    pub fn save(&self, state: &PersistedState) -> Result<(), StoreError> {
        let file = self.state_file();
        let write = |source| StoreError::Write {
            file: file.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| write(io::Error::other(e)))?;
        let temp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let mut out = File::create(&temp).map_err(write)?;
        out.write_all(&bytes).map_err(write)?;
        out.sync_all().map_err(write)?;
        drop(out);
        fs::rename(&temp, &file).map_err(write)?;
        // The rename itself is durable only once the directory is synced.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(write)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::PeerName;

    fn state(name: u64) -> PersistedState {
        PersistedState {
            name: PeerName(name),
            restarts: 3,
            ipam: None,
        }
    }

    #[test]
    fn saved_state_is_loaded_back_and_a_first_start_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), None);
        store.save(&state(7)).unwrap();
        store.save(&state(8)).unwrap();
        assert_eq!(store.load().unwrap(), Some(state(8)));
        // No temp file is left behind.
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn a_corrupt_file_is_refused_by_name_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(store.state_file(), b"{\"name\": 12, trunc").unwrap();
        let err = store.load().unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{text}");
        assert!(text.contains("state.json"), "{text}");
        assert_eq!(
            fs::read(store.state_file()).unwrap(),
            b"{\"name\": 12, trunc"
        );
    }

    #[test]
    fn two_agents_cannot_share_a_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let second = Store::open(dir.path()).unwrap_err();
        assert!(matches!(second, StoreError::InUse { .. }), "{second}");
        drop(_first);
        Store::open(dir.path()).expect("free again once the first is gone");
    }
}
