//! How outputs reach the disk: whole or not at all, never over something
//! the job did not mean to replace, and with nothing left behind.
//!
//! Every file or directory a job writes is first a *temporary* beside its
//! target, named `.NAME.modelpress-PID-SEQ.KIND` (KIND is `tmp` for a file,
//! `staging` for a directory, `old` for a replaced output during a commit).
//! A temporary is
//! - created exclusively and *registered*, so that [`remove_temporaries`]
//!   (called on SIGINT/SIGTERM/SIGHUP, see [`install_signal_cleanup`]) and
//!   every error path remove it;
//! - locked (`flock`) for as long as the process holds it, so that a later
//!   run can tell a live writer (refused: two jobs writing one output) from
//!   what a killed one left ([`clean_stale`] removes that, or restores an
//!   output a killed commit had moved aside).
//!
//! [`commit`] moves a job's finished temporaries into place in one step,
//! with signals held off: with `replace`, existing outputs are moved aside
//! first and restored if any rename fails; without it, an output that
//! appeared while the job ran is an error, never replaced (`renameat2`
//! with `RENAME_NOREPLACE` closes the race on Linux).

use crate::error::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The tag every temporary name carries after `.NAME`.
const TAG: &str = ".modelpress-";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// The last component of `path`, which every output has (checked by
/// `plan::check`; library callers get an error instead of a panic).
pub(crate) fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            Error::input(format!(
                "{}: not a file or directory name that can be written",
                path.display()
            ))
        })
}

/// The directory holding `path` ("." for a bare name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// What a temporary stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A file being written.
    Tmp,
    /// A directory being filled.
    Staging,
    /// An output moved aside while a commit replaces it.
    Old,
}

impl Kind {
    fn suffix(self) -> &'static str {
        match self {
            Kind::Tmp => "tmp",
            Kind::Staging => "staging",
            Kind::Old => "old",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "tmp" => Kind::Tmp,
            "staging" => Kind::Staging,
            "old" => Kind::Old,
            _ => return None,
        })
    }
}

fn temp_path(dest: &Path, kind: Kind) -> Result<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let name = file_name(dest)?;
    Ok(dest.with_file_name(format!(
        ".{name}{TAG}{}-{seq}.{}",
        std::process::id(),
        kind.suffix()
    )))
}

/// (pid, kind) of a temporary of the output named `dest_name`, from its
/// file name.
fn parse_temp(name: &str, dest_name: &str) -> Option<(u32, Kind)> {
    let rest = name.strip_prefix('.')?.strip_prefix(dest_name)?;
    let rest = rest.strip_prefix(TAG)?;
    let (ids, kind) = rest.rsplit_once('.')?;
    let (pid, seq) = ids.split_once('-')?;
    seq.parse::<u64>().ok()?;
    Some((pid.parse().ok()?, Kind::parse(kind)?))
}

/// Temporaries this process holds, removed by `remove_temporaries`.
/// Held during creation and commit, so a signal never sees half of either.
static LIVE: Mutex<Vec<(u64, PathBuf, bool)>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<(u64, PathBuf, bool)>> {
    // A panic elsewhere while holding it leaves the list itself intact.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn register(list: &mut Vec<(u64, PathBuf, bool)>, path: &Path, is_dir: bool) -> u64 {
    static ID: AtomicU64 = AtomicU64::new(0);
    let id = ID.fetch_add(1, Ordering::Relaxed);
    list.push((id, path.to_path_buf(), is_dir));
    id
}

fn unregister(list: &mut Vec<(u64, PathBuf, bool)>, id: u64) {
    list.retain(|(i, _, _)| *i != id);
}

fn remove_path(path: &Path, is_dir: bool) {
    if is_dir {
        // A writer may still be adding a file inside: try again.
        for _ in 0..5 {
            match std::fs::remove_dir_all(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => continue,
                _ => return,
            }
        }
    } else {
        let _ = std::fs::remove_file(path);
    }
}

/// Removes every temporary this process holds and keeps them from being
/// created again: for a process about to end on a signal. Returns how many
/// there were.
pub fn remove_temporaries() -> usize {
    // A commit holds the list for moments; a wait much longer than that
    // means something is stuck, and the process must still end: the next
    // run on the same output removes what is left (`clean_stale`).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let guard = loop {
        match LIVE.try_lock() {
            Ok(g) => break g,
            Err(std::sync::TryLockError::Poisoned(e)) => break e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(std::sync::TryLockError::WouldBlock) => return 0,
        }
    };
    for (_, p, is_dir) in guard.iter().rev() {
        remove_path(p, *is_dir);
    }
    let n = guard.len();
    // Nothing may register a new temporary while the process ends.
    std::mem::forget(guard);
    n
}

/// Registers a directory the caller created as a temporary of this process
/// (removed on a signal); `forget_temporary` with the returned id ends it.
pub fn register_temporary(path: &Path) -> u64 {
    register(&mut live(), path, true)
}

/// Stops tracking a temporary registered by `register_temporary`.
pub fn forget_temporary(id: u64) {
    unregister(&mut live(), id)
}

/// On SIGINT, SIGTERM and SIGHUP: remove this process's temporaries, then
/// end by the same signal (the shell sees 130, 143 or 129). For programs;
/// a library embedding modelpress keeps its own signal handling.
pub fn install_signal_cleanup() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(io(Path::new("<signal handlers>")))?;
    std::thread::Builder::new()
        .name("modelpress-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                remove_temporaries();
                let _ = signal_hook::low_level::emulate_default_handler(sig);
                std::process::exit(128 + sig);
            }
        })
        .map_err(io(Path::new("<signal thread>")))?;
    Ok(())
}

/// A finished temporary waiting for `commit`: removed if dropped before.
pub struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    is_dir: bool,
    id: u64,
    /// Holds the flock that tells other runs this temporary is live.
    _lock: Option<File>,
    done: bool,
}

impl Staged {
    /// Creates and locks a new temporary for `dest` (a file or directory).
    fn create(dest: &Path, is_dir: bool) -> Result<(Staged, Option<File>)> {
        let tmp = temp_path(dest, if is_dir { Kind::Staging } else { Kind::Tmp })?;
        let mut list = live();
        // Until the temporary holds its flock, another run's stale scan
        // (`clean_stale`, under the same directory lock) must not see it:
        // unlocked, it would look left behind and be removed. Not in a
        // staging directory of ours: private, and its liveness flock would
        // make the lock wait forever (as in `commit`, whose lock order,
        // `live` then the directory, this keeps).
        let dir = parent_dir(dest);
        let _scan = if list.iter().any(|(_, p, is_dir)| *is_dir && p == dir) {
            None
        } else {
            lock_dir(dir)
        };
        let file = if is_dir {
            std::fs::create_dir(&tmp).map_err(io(&tmp))?;
            None
        } else {
            Some(
                File::options()
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
                    .map_err(io(&tmp))?,
            )
        };
        let id = register(&mut list, &tmp, is_dir);
        drop(list);
        let lock = match &file {
            Some(f) => f.try_clone().ok(),
            None => File::open(&tmp).ok(),
        };
        // Best effort: a file system without flock still gets atomic
        // outputs, only not the live-writer check.
        if let Some(l) = &lock {
            let _ = l.try_lock();
        }
        Ok((
            Staged {
                tmp,
                dest: dest.to_path_buf(),
                is_dir,
                id,
                _lock: lock,
                done: false,
            },
            file,
        ))
    }

    /// A new, empty staging directory beside `dest`, committed as `dest`.
    pub fn dir(dest: &Path) -> Result<Staged> {
        Ok(Staged::create(dest, true)?.0)
    }

    /// Where the content is being written.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Where `commit` puts it.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Moves this one temporary into place (see [`commit`]).
    pub fn commit(self, replace: bool) -> Result<()> {
        commit(vec![self], replace)
    }

    /// Moves a file finished inside a staging directory to its name there:
    /// no other process looks into that directory, so no locks and no
    /// replacing.
    pub fn commit_in_staging(mut self) -> Result<()> {
        let mut list = live();
        rename_noreplace(&self.tmp, &self.dest).map_err(io(&self.dest))?;
        self.done = true;
        unregister(&mut list, self.id);
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let mut list = live();
            remove_path(&self.tmp, self.is_dir);
            unregister(&mut list, self.id);
        }
    }
}

/// An output file that appears whole or not at all: written to a temporary
/// beside its target, then `finish`ed (flushed and synced) for [`commit`],
/// or `commit`ted on its own. Dropped before, the temporary is removed.
pub struct AtomicFile {
    staged: Staged,
    out: BufWriter<File>,
    /// Bytes written, and how many of them the disk was asked to take.
    written: u64,
    handed_to_disk: u64,
}

/// Written bytes are handed to the disk (asynchronously) in steps of this
/// much, so that the final sync waits for little while the job computes
/// the next tensors.
const WRITEBACK_STEP: u64 = 32 << 20;

impl AtomicFile {
    /// Starts a new file for `path`, as a temporary beside it.
    pub fn create(path: &Path) -> Result<AtomicFile> {
        let (staged, file) = Staged::create(path, false)?;
        let file = file.ok_or_else(|| Error::input("a file temporary has a file"))?;
        Ok(AtomicFile {
            staged,
            out: BufWriter::with_capacity(1 << 20, file),
            written: 0,
            handed_to_disk: 0,
        })
    }

    /// The final path (for messages).
    pub fn path(&self) -> &Path {
        &self.staged.dest
    }

    /// Appends `bytes`.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        // Errors name the output the user asked for, not its temporary.
        self.out
            .write_all(bytes)
            .map_err(|e| io(&self.staged.dest)(e))?;
        self.written += bytes.len() as u64;
        if self.written - self.handed_to_disk >= WRITEBACK_STEP {
            self.start_writeback()?;
        }
        Ok(())
    }

    /// Starts writing what was written so far to the disk without waiting
    /// for it (`sync_file_range`, where the system has it): the disk works
    /// while the job computes, and `finish`'s sync has little left to do.
    fn start_writeback(&mut self) -> Result<()> {
        self.out.flush().map_err(io(&self.staged.dest))?;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let (from, len) = (self.handed_to_disk, self.written - self.handed_to_disk);
            // SAFETY: a valid open descriptor and a byte range; the call
            // only schedules writeback. Failure is harmless (the final
            // sync still writes everything), so its result is ignored.
            unsafe {
                libc::sync_file_range(
                    self.out.get_ref().as_raw_fd(),
                    from as libc::off64_t,
                    len as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        self.handed_to_disk = self.written;
        Ok(())
    }

    /// Flushes and syncs the file; `commit` moves it into place.
    pub fn finish(self) -> Result<Staged> {
        let AtomicFile { staged, out, .. } = self;
        let file = out
            .into_inner()
            .map_err(|e| io(&staged.dest)(e.into_error()))?;
        file.sync_all().map_err(io(&staged.dest))?;
        Ok(staged)
    }

    /// Flushes, syncs and moves the file into place, replacing what is
    /// there.
    pub fn commit(self) -> Result<()> {
        self.finish()?.commit(true)
    }
}

/// Writes `bytes` to `dest` through a temporary, for `commit`.
pub fn stage_bytes(dest: &Path, bytes: &[u8]) -> Result<Staged> {
    let mut f = AtomicFile::create(dest)?;
    f.write_all(bytes)?;
    f.finish()
}

/// An exclusive flock on a directory, held while a commit or a stale-file
/// scan changes its entries (other modelpress processes wait). Best effort:
/// None where the directory cannot be opened or locked.
fn lock_dir(dir: &Path) -> Option<File> {
    let f = File::open(dir).ok()?;
    f.lock().ok()?;
    Some(f)
}

/// Renames `from` to `to` unless `to` exists (atomically where the system
/// allows it).
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
        let (a, b) = (c(from)?, c(to)?);
        // SAFETY: both are valid NUL-terminated paths for the duration of
        // the call.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        // File systems without RENAME_NOREPLACE: check, then rename.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(e);
        }
    }
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(std::io::ErrorKind::AlreadyExists.into());
    }
    std::fs::rename(from, to)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Moves finished temporaries into place, all or none, with signals held
/// off. With `replace`, an existing output is moved aside and removed once
/// every rename succeeded (restored if one fails); without it, an output
/// that exists now (it appeared while the job ran) is an error and nothing
/// is replaced.
pub fn commit(items: Vec<Staged>, replace: bool) -> Result<()> {
    let mut items = items;
    let mut list = live();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for s in &items {
        let d = parent_dir(&s.dest).to_path_buf();
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    // A staging directory of ours is private (and locked by its own
    // liveness flock, which a second lock here would wait on forever).
    let _locks: Vec<File> = dirs
        .iter()
        .filter(|d| !list.iter().any(|(_, p, is_dir)| *is_dir && p == *d))
        .filter_map(|d| lock_dir(d))
        .collect();
    // (index, moved-aside old output) of the renames done, to undo them.
    let mut done: Vec<(usize, Option<PathBuf>)> = Vec::new();
    let mut failure = None;
    for (i, s) in items.iter().enumerate() {
        let mut old = None;
        if std::fs::symlink_metadata(&s.dest).is_ok() {
            if !replace {
                failure = Some(Error::input(format!(
                    "output {} appeared while this job ran; it was not replaced (use --force to replace it)",
                    s.dest.display()
                )));
                break;
            }
            let o = match temp_path(&s.dest, Kind::Old) {
                Ok(o) => o,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            if let Err(e) = std::fs::rename(&s.dest, &o) {
                failure = Some(io(&s.dest)(e));
                break;
            }
            old = Some(o);
        }
        if let Err(e) = rename_noreplace(&s.tmp, &s.dest) {
            if let Some(o) = &old {
                let _ = std::fs::rename(o, &s.dest);
            }
            failure = Some(if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::input(format!(
                    "output {} appeared while this job ran; it was not replaced",
                    s.dest.display()
                ))
            } else {
                io(&s.dest)(e)
            });
            break;
        }
        done.push((i, old));
    }
    if let Some(e) = failure {
        // Undo: the new outputs go back to being temporaries (removed when
        // `items` drops), the old ones come back.
        for (i, old) in done.into_iter().rev() {
            let s = &items[i];
            let _ = std::fs::rename(&s.dest, &s.tmp);
            if let Some(o) = old {
                let _ = std::fs::rename(&o, &s.dest);
            }
        }
        drop(list);
        return Err(e);
    }
    for (i, old) in done {
        let s = &mut items[i];
        s.done = true;
        unregister(&mut list, s.id);
        if let Some(o) = old {
            let is_dir = std::fs::symlink_metadata(&o).is_ok_and(|m| m.is_dir());
            remove_path(&o, is_dir);
        }
    }
    for d in &dirs {
        sync_dir(d);
    }
    Ok(())
}

/// Before a job writes `dest`: removes what an earlier run that was killed
/// (SIGKILL, power loss) left beside it — temporaries no process holds —
/// and restores an output such a run had moved aside mid-commit. Returns a
/// line per thing done; a temporary another live process holds is an error
/// (two jobs writing one output).
pub fn clean_stale(dest: &Path) -> Result<Vec<String>> {
    let dir = parent_dir(dest);
    let name = file_name(dest)?;
    let _lock = lock_dir(dir);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut notes = Vec::new();
    for e in entries.flatten() {
        let fname = e.file_name().to_string_lossy().into_owned();
        let Some((pid, kind)) = parse_temp(&fname, &name) else {
            continue;
        };
        let path = e.path();
        let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        match kind {
            Kind::Tmp | Kind::Staging => {
                // A live writer holds its flock for as long as it runs.
                if let Ok(f) = File::open(&path) {
                    if let Err(std::fs::TryLockError::WouldBlock) = f.try_lock() {
                        return Err(Error::input(format!(
                            "output {} is being written by another process (pid {pid}, {}); \
                             wait for it or choose another output",
                            dest.display(),
                            path.display()
                        )));
                    }
                }
                remove_path(&path, is_dir);
                notes.push(format!(
                    "removed {}, left by an interrupted run (pid {pid})",
                    path.display()
                ));
            }
            Kind::Old => {
                // Commits hold the directory lock, which we hold: this one
                // was interrupted.
                if std::fs::symlink_metadata(dest).is_err() {
                    std::fs::rename(&path, dest).map_err(io(dest))?;
                    notes.push(format!(
                        "restored {} from {}, which an interrupted run (pid {pid}) had moved aside",
                        dest.display(),
                        path.display()
                    ));
                } else {
                    remove_path(&path, is_dir);
                    notes.push(format!(
                        "removed {}, the previous output an interrupted run (pid {pid}) had replaced",
                        path.display()
                    ));
                }
            }
        }
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_parse_back() {
        let d = Path::new("/x/out.safetensors");
        for kind in [Kind::Tmp, Kind::Staging, Kind::Old] {
            let t = temp_path(d, kind).unwrap();
            let n = t.file_name().unwrap().to_str().unwrap();
            assert_eq!(
                parse_temp(n, "out.safetensors"),
                Some((std::process::id(), kind))
            );
            // Another output's temporaries are not this one's.
            assert_eq!(parse_temp(n, "out"), None);
            assert_eq!(parse_temp(n, "out.safetensors.x"), None);
        }
        assert_eq!(parse_temp(".out.modelpress-12-3.tmpx", "out"), None);
        assert_eq!(parse_temp(".out.modelpress-a-3.tmp", "out"), None);
    }

    #[test]
    fn commit_replaces_or_refuses_and_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.bin");
        let b = d.path().join("b");
        std::fs::write(&a, b"old").unwrap();
        // Without replace, an existing output stops the whole commit.
        let sa = stage_bytes(&a, b"new").unwrap();
        let sb = Staged::dir(&b).unwrap();
        std::fs::write(sb.path().join("f"), b"x").unwrap();
        assert!(commit(vec![sb, sa], false).is_err());
        assert_eq!(std::fs::read(&a).unwrap(), b"old");
        assert!(!b.exists());
        let names = |p: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(d.path()), ["a.bin"]);
        // With replace, both land.
        let sa = stage_bytes(&a, b"new").unwrap();
        let sb = Staged::dir(&b).unwrap();
        std::fs::write(sb.path().join("f"), b"x").unwrap();
        commit(vec![sb, sa], true).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"new");
        assert_eq!(std::fs::read(b.join("f")).unwrap(), b"x");
        assert_eq!(names(d.path()), ["a.bin", "b"]);
        assert!(live().is_empty());
    }

    #[test]
    fn stale_temporaries_are_removed_and_live_ones_refused() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("m.safetensors");
        // What a killed run leaves: a temporary and a moved-aside output.
        std::fs::write(d.path().join(".m.safetensors.modelpress-1-0.tmp"), b"x").unwrap();
        std::fs::write(d.path().join(".m.safetensors.modelpress-1-1.old"), b"prev").unwrap();
        // Another output's temporary stays.
        std::fs::write(d.path().join(".n.safetensors.modelpress-1-0.tmp"), b"x").unwrap();
        let notes = clean_stale(&out).unwrap();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert_eq!(std::fs::read(&out).unwrap(), b"prev");
        assert!(!d.path().join(".m.safetensors.modelpress-1-0.tmp").exists());
        assert!(d.path().join(".n.safetensors.modelpress-1-0.tmp").exists());
        // A temporary a live process holds (locked through another open
        // file description, as another process's would be).
        let f = AtomicFile::create(&out).unwrap();
        let e = clean_stale(&out).unwrap_err().to_string();
        assert!(e.contains("another process"), "{e}");
        drop(f);
        assert!(clean_stale(&out).unwrap().is_empty());
    }
}
