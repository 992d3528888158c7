//! A model on disk: one `.safetensors` file, or a Hugging Face model
//! directory holding one file or shards listed in
//! `model.safetensors.index.json`, beside config and tokenizer files.
//!
//! Output mirrors the input: a file gives a file, a directory a directory
//! with the same shard split, a correct index and copies of the other files.
//! Everything is written to a staging path beside the target and renamed
//! into place at the end; dropped before `commit`, nothing appears.

use super::output::Staged;
use super::plan::OutputKind;
use super::safetensors::{Entry, Metadata, OutEntry, SafetensorsFile, SafetensorsWriter};
use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The index of a sharded Hugging Face model directory.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// An open model: its shards in order, its index and its other files.
pub struct Model {
    /// The file or directory, as the user named it.
    pub path: PathBuf,
    /// Whether it is a directory.
    pub is_dir: bool,
    /// The safetensors files, in index order (one for a single file).
    pub shards: Vec<SafetensorsFile>,
    /// The index json of a sharded directory (rewritten for the output).
    pub index: Option<Map<String, Value>>,
    /// Files copied as they are (config.json, tokenizer files, ...).
    pub other_files: Vec<PathBuf>,
    /// Subdirectories copied whole (sentence-transformers' 1_Pooling, ...).
    pub other_dirs: Vec<PathBuf>,
    by_name: HashMap<String, (usize, usize)>,
    /// For a `layout`: the files it reads (its shards exist only in memory).
    sources: Option<Vec<PathBuf>>,
}

impl Model {
    /// Opens a `.safetensors` file or a model directory, validating every
    /// shard's header and the index against the shards.
    pub fn open(path: &Path) -> Result<Model> {
        let meta = std::fs::metadata(path).map_err(io(path))?;
        if !meta.is_dir() {
            let f = SafetensorsFile::open(path)?;
            return Model::assemble(path, false, vec![f], None, vec![]);
        }
        let index_path = path.join(INDEX_NAME);
        let mut all: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io(path))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        all.sort();
        let other_dirs: Vec<PathBuf> = all.iter().filter(|p| p.is_dir()).cloned().collect();
        let listing: Vec<PathBuf> = all.into_iter().filter(|p| p.is_file()).collect();
        let (shard_names, index) = if index_path.is_file() {
            let text = super::read_input(&index_path)?;
            let index: Map<String, Value> = serde_json::from_slice(&text)
                .map_err(|e| Error::format(&index_path, None, format!("not a valid index: {e}")))?;
            let Some(Value::Object(map)) = index.get("weight_map") else {
                return Err(Error::format(&index_path, None, "no weight_map object"));
            };
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let Some(file) = file.as_str() else {
                    return Err(Error::format(
                        &index_path,
                        Some(tensor),
                        "weight_map value is not a file name",
                    ));
                };
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(Error::format(
                        &index_path,
                        Some(tensor),
                        format!("shard '{file}' is not a plain file name"),
                    ));
                }
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_string());
                }
            }
            names.sort();
            (names, Some(index))
        } else {
            let names: Vec<String> = listing
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .map(|p| name_of(p))
                .collect();
            match names.len() {
                0 => {
                    return Err(Error::format(
                        path,
                        None,
                        "no .safetensors file in this directory",
                    ));
                }
                1 => {}
                _ => {
                    return Err(Error::format(
                        path,
                        None,
                        format!(
                            "{} .safetensors files but no {INDEX_NAME} to say how they fit",
                            names.len()
                        ),
                    ))
                }
            }
            (names, None)
        };
        let shards = shard_names
            .iter()
            .map(|n| SafetensorsFile::open(&path.join(n)))
            .collect::<Result<Vec<_>>>()?;
        let other_files = listing
            .into_iter()
            .filter(|p| {
                let n = name_of(p);
                n != INDEX_NAME && !shard_names.contains(&n)
            })
            .collect();
        let mut model = Model::assemble(path, true, shards, index, other_files)?;
        model.other_dirs = other_dirs;
        if let Some(Value::Object(map)) = model.index.as_ref().and_then(|i| i.get("weight_map")) {
            for (tensor, file) in map {
                match model.by_name.get(tensor) {
                    Some(&(s, _))
                        if name_of(&model.shards[s].path) == file.as_str().unwrap_or("") => {}
                    Some(&(s, _)) => {
                        return Err(Error::format(
                            &index_path,
                            Some(tensor),
                            format!(
                                "index says {}, but it is in {}",
                                file,
                                model.shards[s].path.display()
                            ),
                        ))
                    }
                    None => {
                        return Err(Error::format(
                            &index_path,
                            Some(tensor),
                            format!("listed in the index but not in {file}"),
                        ))
                    }
                }
            }
            if map.len() != model.by_name.len() {
                return Err(Error::format(
                    &index_path,
                    None,
                    "shards hold tensors the index does not list",
                ));
            }
        }
        Ok(model)
    }

    fn assemble(
        path: &Path,
        is_dir: bool,
        shards: Vec<SafetensorsFile>,
        index: Option<Map<String, Value>>,
        other_files: Vec<PathBuf>,
    ) -> Result<Model> {
        let mut by_name = HashMap::new();
        for (s, f) in shards.iter().enumerate() {
            for (i, e) in f.entries.iter().enumerate() {
                if by_name.insert(e.name.clone(), (s, i)).is_some() {
                    return Err(Error::format(
                        &f.path,
                        Some(&e.name),
                        "tensor name appears in two shards",
                    ));
                }
            }
        }
        Ok(Model {
            path: path.to_path_buf(),
            is_dir,
            shards,
            index,
            other_files,
            other_dirs: Vec::new(),
            by_name,
            sources: None,
        })
    }

    /// A model directory that exists only in memory: `shards` built with
    /// `SafetensorsFile::layout`, with the other files and directories of
    /// `template`, and an index when `indexed`. `sources` are the files
    /// it reads, which no output may overwrite. An output written from it
    /// gets these shards, files and index.
    pub fn layout(
        template: &Model,
        shards: Vec<SafetensorsFile>,
        indexed: bool,
        sources: Vec<PathBuf>,
    ) -> Result<Model> {
        let index = indexed.then(|| {
            let mut m = Map::new();
            m.insert("metadata".into(), Value::Object(Map::new()));
            m
        });
        let mut model = Model::assemble(
            &template.path,
            true,
            shards,
            index,
            template.other_files.clone(),
        )?;
        model.other_dirs = template.other_dirs.clone();
        model.sources = Some(sources);
        Ok(model)
    }

    /// Every tensor, shard by shard in file order.
    pub fn entries(&self) -> impl Iterator<Item = (&SafetensorsFile, &Entry)> {
        self.shards
            .iter()
            .flat_map(|s| s.entries.iter().map(move |e| (s, e)))
    }

    /// The tensor `name` and its shard, found in O(1).
    pub fn find(&self, name: &str) -> Option<(&SafetensorsFile, &Entry)> {
        self.by_name
            .get(name)
            .map(|&(s, i)| (&self.shards[s], &self.shards[s].entries[i]))
    }

    /// config.json of a model directory as a JSON object: None for a single
    /// file or a directory without one; an error when it is not an object.
    pub fn config(&self) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
        let path = self.path.join("config.json");
        if !self.is_dir || !self.other_files.iter().any(|p| p.ends_with("config.json")) {
            return Ok(None);
        }
        match serde_json::from_slice(&crate::formats::read_input(&path)?) {
            Ok(serde_json::Value::Object(m)) => Ok(Some(m)),
            _ => Err(Error::input(format!(
                "{}: not a JSON object",
                path.display()
            ))),
        }
    }

    /// Bytes of all tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.entries().map(|(_, e)| e.bytes() as u64).sum()
    }

    /// Every path this model reads (for refusing to write over one).
    pub fn input_paths(&self) -> Vec<PathBuf> {
        if let Some(s) = &self.sources {
            return s.clone();
        }
        let mut v = vec![self.path.clone()];
        v.extend(self.shards.iter().map(|s| s.path.clone()));
        v.extend(self.other_files.iter().cloned());
        v.extend(self.other_dirs.iter().cloned());
        v
    }
}

/// The last component of a path read from a directory listing (which
/// always has one).
fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Writes a small file of a staged output and syncs it, so that a commit
/// never publishes a file whose bytes are still only in memory.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Copies a regular file and syncs the copy (streamed: a model directory
/// may hold gigabytes of other files, such as an ONNX export).
fn copy_synced(from: &Path, to: &Path) -> Result<()> {
    let mut src = super::open_input(from)?;
    let mut f = std::fs::File::create(to).map_err(io(to))?;
    std::io::copy(&mut src, &mut f).map_err(io(to))?;
    f.sync_all().map_err(io(to))
}

/// Other files up to this size are offered to a job's `Rewrite` (configs);
/// larger ones are copied as they are, without being held in memory.
const REWRITE_MAX: u64 = 64 << 20;

/// Copies a directory tree of regular files and directories (symbolic links
/// followed, up to a depth that stops loops); anything else is an error.
fn copy_dir(from: &Path, to: &Path, depth: usize) -> Result<()> {
    if depth > 16 {
        return Err(Error::format(
            from,
            None,
            "directories nest more than 16 deep (a symbolic link loop?)",
        ));
    }
    std::fs::create_dir_all(to).map_err(io(to))?;
    for e in std::fs::read_dir(from).map_err(io(from))? {
        let p = e.map_err(io(from))?.path();
        let dest = to.join(name_of(&p));
        let meta = std::fs::metadata(&p).map_err(io(&p))?;
        if meta.is_dir() {
            copy_dir(&p, &dest, depth + 1)?;
        } else if meta.is_file() {
            copy_synced(&p, &dest)?;
        } else {
            return Err(Error::format(
                &p,
                None,
                "is not a regular file or directory (a FIFO, device or socket); it cannot be copied"));
        }
    }
    Ok(())
}

/// New contents for a copied file (by name), or None to copy it as it is.
pub type Rewrite<'a> = &'a dyn Fn(&str, &[u8]) -> Result<Option<Vec<u8>>>;

/// Writes a model's output: shards into a staging directory (or one file
/// beside its target), then `finish` completes it (other files, index) for
/// `output::commit`, which moves it into place with the job's other
/// outputs. Dropped before, nothing is left.
pub struct ModelWriter {
    /// The checked destination (see `plan::check`).
    dest: PathBuf,
    /// The staging directory of a directory output.
    staging: Option<Staged>,
    /// The finished file of a single-file output.
    file: Option<Staged>,
    /// (shard file name, tensor names, bytes) in order, for the index.
    shards: Vec<(String, Vec<String>, u64)>,
}

impl ModelWriter {
    /// A writer for `dest`, a directory or a single file.
    pub fn new(dest: &Path, is_dir: bool) -> Result<ModelWriter> {
        Ok(ModelWriter {
            dest: dest.to_path_buf(),
            staging: if is_dir {
                Some(Staged::dir(dest)?)
            } else {
                None
            },
            file: None,
            shards: Vec::new(),
        })
    }

    /// What `plan::check` needs to know of this model's output: a file, or
    /// a directory holding the shards, the index and the other files.
    pub fn output_kind(model: &Model) -> OutputKind {
        if !model.is_dir {
            return OutputKind::File {
                extensions: &["safetensors"],
            };
        }
        let mut names: Vec<String> = model.shards.iter().map(|s| name_of(&s.path)).collect();
        names.push(INDEX_NAME.into());
        names.extend(model.other_files.iter().map(|p| name_of(p)));
        names.extend(model.other_dirs.iter().map(|p| name_of(p)));
        OutputKind::Dir { names }
    }

    /// A writer for the next shard (file name as in the input; ignored for a
    /// single-file output). Its `finish_staged` result goes to `shard_done`.
    pub fn shard(
        &mut self,
        file_name: &str,
        entries: Vec<OutEntry>,
        metadata: Option<&Metadata>,
    ) -> Result<SafetensorsWriter> {
        let path = match &self.staging {
            Some(s) => s.path().join(file_name),
            None => self.dest.clone(),
        };
        let mut total = 0u64;
        for e in &entries {
            total += e.bytes()? as u64;
        }
        self.shards.push((
            file_name.to_string(),
            entries.iter().map(|e| e.name.clone()).collect(),
            total,
        ));
        SafetensorsWriter::create(&path, entries, metadata)
    }

    /// Takes a finished shard: moved into the staging directory at once,
    /// or kept for the commit of a single-file output.
    pub fn shard_done(&mut self, shard: Staged) -> Result<()> {
        if self.staging.is_some() {
            shard.commit_in_staging()
        } else {
            self.file = Some(shard);
            Ok(())
        }
    }

    /// Copies the input's other files (through `rewrite`, which may return
    /// new contents for a file name, such as a config whose sizes changed),
    /// writes `extra` files of the job's own (replacing input files of the
    /// same name) and the index; returns the output for `output::commit`.
    /// A single-file output has no place for `extra`.
    pub fn finish(
        self,
        model: &Model,
        rewrite: Rewrite,
        extra: &[(String, Vec<u8>)],
    ) -> Result<Staged> {
        let Some(staging) = self.staging else {
            return self.file.ok_or_else(|| {
                Error::input(format!("{}: no shard was written", self.dest.display()))
            });
        };
        let dir = staging.path().to_path_buf();
        for (name, bytes) in extra {
            write_synced(&dir.join(name), bytes)?;
        }
        for f in &model.other_files {
            let name = name_of(f);
            if extra.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let dest = dir.join(&name);
            let size = std::fs::metadata(f).map_err(io(f))?.len();
            if size > REWRITE_MAX {
                copy_synced(f, &dest)?;
                continue;
            }
            let bytes = super::read_input(f)?;
            let new = rewrite(&name, &bytes).map_err(|e| e.in_file(f))?;
            write_synced(&dest, new.as_deref().unwrap_or(&bytes))?;
        }
        for d in &model.other_dirs {
            copy_dir(d, &dir.join(name_of(d)), 0)?;
        }
        if let Some(index) = &model.index {
            let mut index = index.clone();
            let mut weight_map = Map::new();
            for (file, names, _) in &self.shards {
                for n in names {
                    weight_map.insert(n.clone(), Value::String(file.clone()));
                }
            }
            let total: u64 = self.shards.iter().map(|s| s.2).sum();
            let mut meta = match index.get("metadata") {
                Some(Value::Object(m)) => m.clone(),
                _ => Map::new(),
            };
            meta.insert("total_size".into(), Value::from(total));
            index.insert("metadata".into(), Value::Object(meta));
            index.insert("weight_map".into(), Value::Object(weight_map));
            let p = dir.join(INDEX_NAME);
            let text = serde_json::to_string_pretty(&Value::Object(index))
                .map_err(|e| Error::input(e.to_string()))?;
            write_synced(&p, (text + "\n").as_bytes())?;
        }
        Ok(staging)
    }
}
