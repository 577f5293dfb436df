//! Allocations on disk: one JSON file per attachment under `<stateDir>/ipam/`.
//!
//! A file is written to a temporary name, fsynced, renamed into place and the directory
//! fsynced before the address is handed out, so after a crash every address a pod may be
//! using is on disk. A lock file keeps a second agent off the same directory.

use super::Allocation;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOCK_FILE: &str = ".lock";
const SUFFIX: &str = ".json";
const TMP_SUFFIX: &str = ".tmp";

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// Held for the life of the store: the `flock` is released when the file closes.
    _lock: File,
}

/// What `Store::load` found besides valid allocations.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Files that did not parse; renamed to `*.corrupt` so an operator can inspect them.
    pub corrupt: Vec<PathBuf>,
    /// Half-written temporary files from a crash, removed.
    pub removed_tmp: usize,
}

impl Store {
    /// Opens (creating) the directory and takes its lock; fails if another process holds it.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(
                err.kind(),
                format!("{} is locked by another agent: {err}", dir.display()),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn load(&self) -> io::Result<(Vec<Allocation>, LoadReport)> {
        let mut allocations = Vec::new();
        let mut report = LoadReport::default();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.ends_with(TMP_SUFFIX) {
                fs::remove_file(&path)?;
                report.removed_tmp += 1;
                continue;
            }
            if !name.ends_with(SUFFIX) {
                continue;
            }
            match fs::read(&path).map(|bytes| serde_json::from_slice::<Allocation>(&bytes)) {
                Ok(Ok(allocation)) => allocations.push(allocation),
                Ok(Err(_)) => {
                    let aside = path.with_extension("corrupt");
                    fs::rename(&path, &aside)?;
                    report.corrupt.push(aside);
                }
                Err(err) => return Err(err),
            }
        }
        Ok((allocations, report))
    }

    /// Durably records `allocation`; returns only once it is on disk.
    pub fn write(&self, allocation: &Allocation) -> io::Result<()> {
        let name = file_name(&allocation.container_id, &allocation.ifname);
        let tmp = self.dir.join(format!(".{name}{TMP_SUFFIX}"));
        let bytes = serde_json::to_vec_pretty(allocation).map_err(io::Error::other)?;
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, self.dir.join(name))?;
        self.sync_dir()
    }

    /// Removes the record of an attachment; absent records are fine.
    pub fn remove(&self, container_id: &str, ifname: &str) -> io::Result<()> {
        match fs::remove_file(self.dir.join(file_name(container_id, ifname))) {
            Ok(()) => self.sync_dir(),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(err),
        }
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

/// `@` cannot occur in a valid container id or interface name, so the name is unambiguous.
fn file_name(container_id: &str, ifname: &str) -> String {
    format!("{container_id}@{ifname}{SUFFIX}")
}
