//! The one place that decides what a job may write, before any work starts.
//!
//! Every input (model files and directories, shards, config and tokenizer
//! files, deltas, scores, option files) and every output (the model, the
//! report, ...) is resolved to a canonical path, symbolic links followed.
//! An output that is, contains, or lies inside an input is refused, with
//! `--force` or without; so are outputs that overlap each other. `--force`
//! replaces an existing output only when it is of the kind the job writes:
//! a file for a file, and for a directory, one holding nothing but what the
//! job itself would write there. What an interrupted earlier run left
//! beside an output is cleaned up first (`output::clean_stale`).

use super::output::{clean_stale, file_name, parent_dir};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// What an output is.
#[derive(Clone, Debug)]
pub enum OutputKind {
    /// A file.
    File {
        /// Endings it may have, without the dot (any name when empty).
        extensions: &'static [&'static str],
    },
    /// A directory.
    Dir {
        /// Entries it will hold (besides `.safetensors` shards); with
        /// `--force` an existing directory holding anything else is not
        /// replaced.
        names: Vec<String>,
    },
}

/// One thing a job writes.
#[derive(Clone, Debug)]
pub struct Output<'a> {
    /// As the user gave it.
    pub path: &'a Path,
    /// How messages call it: "output", "--report".
    pub role: &'static str,
    /// A file or a directory.
    pub kind: OutputKind,
}

fn refuse(o: &Output, why: impl std::fmt::Display) -> Error {
    Error::input(format!("{} {}: {why}", o.role, o.path.display()))
}

/// Where `o` will land: its canonical directory joined with its name (the
/// entry a rename replaces), or the canonical path itself for "." and "..".
fn destination(o: &Output) -> Result<PathBuf> {
    let raw = o.path.as_os_str().to_string_lossy();
    if matches!(o.kind, OutputKind::File { .. }) && (raw.ends_with('/') || raw.ends_with('\\')) {
        return Err(refuse(o, "ends in a slash, but this output is a file"));
    }
    let last_is_name = matches!(
        o.path.components().next_back(),
        Some(std::path::Component::Normal(_))
    );
    if !last_is_name {
        let c = o
            .path
            .canonicalize()
            .map_err(|e| refuse(o, format!("cannot be resolved: {e}")))?;
        file_name(&c).map_err(|_| refuse(o, "is the root directory"))?;
        return Ok(c);
    }
    let name = file_name(o.path)?;
    let dir = parent_dir(o.path);
    let dir = dir.canonicalize().map_err(|e| {
        refuse(
            o,
            format!("its directory {} cannot be used: {e}", dir.display()),
        )
    })?;
    if !dir.is_dir() {
        return Err(refuse(o, format!("{} is not a directory", dir.display())));
    }
    Ok(dir.join(name))
}

/// How `a` relates to `b`, both canonical: "is", "contains", "is inside".
fn overlap(a: &Path, b: &Path) -> Option<&'static str> {
    if a == b {
        Some("is")
    } else if b.starts_with(a) {
        Some("contains")
    } else if a.starts_with(b) {
        Some("is inside")
    } else {
        None
    }
}

/// Checks `outputs` against `inputs` and each other and against what
/// exists (see the module doc); removes what interrupted runs left beside
/// them. Returns each output's destination, in order.
pub fn check(inputs: &[PathBuf], outputs: &[Output], force: bool) -> Result<Vec<PathBuf>> {
    let mut canon_inputs = Vec::with_capacity(inputs.len());
    for p in inputs {
        let c = p.canonicalize().map_err(|e| Error::Io {
            path: p.clone(),
            source: e,
        })?;
        canon_inputs.push((p, c));
    }
    let mut dests: Vec<PathBuf> = Vec::with_capacity(outputs.len());
    for o in outputs {
        let dest = destination(o)?;
        if let OutputKind::File { extensions } = &o.kind {
            if !extensions.is_empty()
                && dest
                    .extension()
                    .is_none_or(|e| !extensions.iter().any(|x| e == *x))
            {
                return Err(refuse(
                    o,
                    format!("should end in .{}", extensions.join(" or .")),
                ));
            }
        }
        // The entry itself, and what a symbolic link there points to.
        let mut forms = vec![dest.clone()];
        if let Ok(t) = dest.canonicalize() {
            if t != dest {
                forms.push(t);
            }
        }
        // The closest relation wins: being an input says more than lying
        // inside its directory.
        let mut found: Option<(usize, String)> = None;
        for (given, c) in &canon_inputs {
            for f in &forms {
                let Some(how) = overlap(f, c) else { continue };
                let (rank, what) = match how {
                    "is" if f != &dest => (0, "is a symbolic link to an input".to_string()),
                    "is" => (0, "is an input".to_string()),
                    _ => (1, format!("{how} the input {}", given.display())),
                };
                if found.as_ref().is_none_or(|(r, _)| rank < *r) {
                    found = Some((rank, what));
                }
            }
        }
        if let Some((_, what)) = found {
            return Err(refuse(
                o,
                format!("{what}: modelpress never writes over its inputs"),
            ));
        }
        for (prev, po) in dests.iter().zip(outputs) {
            if let Some(how) = overlap(&dest, prev) {
                return Err(refuse(
                    o,
                    format!("{how} the {} {}", po.role, po.path.display()),
                ));
            }
        }
        if let Ok(meta) = std::fs::symlink_metadata(&dest) {
            if !force {
                return Err(refuse(o, "already exists (use --force to replace it)"));
            }
            check_replaceable(o, &dest, &meta)?;
        }
        for note in clean_stale(&dest)? {
            log::warn!("{note}");
        }
        dests.push(dest);
    }
    Ok(dests)
}

/// `check` for the usual job: one output of `kind` and an optional JSON
/// report. Returns [output, report] destinations.
pub fn check_job(
    inputs: &[PathBuf],
    out: &Path,
    kind: OutputKind,
    report: Option<&Path>,
    force: bool,
) -> Result<Vec<PathBuf>> {
    let mut outputs = vec![Output {
        path: out,
        role: "output",
        kind,
    }];
    if let Some(r) = report {
        outputs.push(Output {
            path: r,
            role: "--report",
            kind: OutputKind::File { extensions: &[] },
        });
    }
    check(inputs, &outputs, force)
}

/// With --force: whether the existing `dest` is something this job writes.
fn check_replaceable(o: &Output, dest: &Path, meta: &std::fs::Metadata) -> Result<()> {
    let ft = meta.file_type();
    match &o.kind {
        OutputKind::File { .. } if ft.is_file() || ft.is_symlink() => Ok(()),
        OutputKind::File { .. } if ft.is_dir() => Err(refuse(
            o,
            "exists and is a directory; this job writes a file",
        )),
        OutputKind::Dir { .. } if ft.is_symlink() => Ok(()),
        OutputKind::Dir { names } if ft.is_dir() => {
            let entries = std::fs::read_dir(dest).map_err(|e| Error::Io {
                path: dest.to_path_buf(),
                source: e,
            })?;
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !(names.contains(&n) || n.ends_with(".safetensors")) {
                    return Err(refuse(
                        o,
                        format!(
                            "exists and holds '{n}', which this job does not write: \
                             it is not replaced, even with --force (remove it yourself \
                             or choose another output)"
                        ),
                    ));
                }
            }
            Ok(())
        }
        OutputKind::Dir { .. } if ft.is_file() => Err(refuse(
            o,
            "exists and is a file; this job writes a directory",
        )),
        _ => Err(refuse(
            o,
            "exists and is not a regular file or directory (a device, FIFO or socket); \
             it is not replaced",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &Path) -> Output<'_> {
        Output {
            path: p,
            role: "output",
            kind: OutputKind::File {
                extensions: &["safetensors"],
            },
        }
    }

    fn dir(p: &Path) -> Output<'_> {
        Output {
            path: p,
            role: "output",
            kind: OutputKind::Dir {
                names: vec!["config.json".into()],
            },
        }
    }

    #[test]
    fn outputs_overlapping_inputs_are_refused_even_with_force() {
        let t = tempfile::tempdir().unwrap();
        let proj = t.path().join("proj");
        let model = proj.join("model");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("model.safetensors"), b"x").unwrap();
        let inputs = vec![model.clone(), model.join("model.safetensors")];
        let err = |o: Output| check(&inputs, &[o], true).unwrap_err().to_string();
        assert!(err(dir(&proj)).contains("contains the input"));
        assert!(err(dir(&model)).contains("is an input"));
        assert!(err(dir(&model.join("sub"))).contains("is inside the input"));
        assert!(err(file(&model.join("model.safetensors"))).contains("is an input"));
        let dotted = model.join("..").join("model");
        assert!(err(dir(&dotted)).contains("is an input"));
        std::os::unix::fs::symlink(
            model.join("model.safetensors"),
            t.path().join("l.safetensors"),
        )
        .unwrap();
        assert!(err(file(&t.path().join("l.safetensors"))).contains("symbolic link"));
        assert!(err(dir(Path::new("/"))).contains("root"));
        assert!(err(file(&t.path().join("o.safetensors/"))).contains("slash"));
        assert!(err(file(&t.path().join("no/o.safetensors"))).contains("cannot be used"));
        // Outputs that overlap each other.
        let a = t.path().join("a.safetensors");
        let r = Output {
            path: &a,
            role: "--report",
            kind: OutputKind::File { extensions: &[] },
        };
        let e = check(&inputs, &[file(&a), r], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--report") && e.contains("is the output"), "{e}");
    }

    #[test]
    fn force_replaces_only_what_the_job_writes() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("config.json"), b"{}").unwrap();
        std::fs::write(out.join("a.safetensors"), b"").unwrap();
        let e = check(&[], &[dir(&out)], false).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(
            check(&[], &[dir(&out)], true).unwrap(),
            [out.canonicalize().unwrap()]
        );
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        let e = check(&[], &[dir(&out)], true).unwrap_err().to_string();
        assert!(e.contains("notes.txt"), "{e}");
        let e = check(&[], &[file(&out.join("x.safetensors"))], true);
        assert!(e.is_ok());
        let f = t.path().join("f.safetensors");
        std::fs::create_dir(&f).unwrap();
        let e = check(&[], &[file(&f)], true).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
    }
}
