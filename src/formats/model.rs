//! A model on disk: one `.safetensors` file, or a Hugging Face model
//! directory holding one file or shards listed in
//! `model.safetensors.index.json`, beside config and tokenizer files.
//!
//! Output mirrors the input: a file gives a file, a directory a directory
//! with the same shard split, a correct index and copies of the other files.
//! Everything is written to a staging path beside the target and renamed
//! into place at the end; dropped before `commit`, nothing appears.

use super::safetensors::{Entry, Metadata, OutEntry, SafetensorsFile, SafetensorsWriter};
use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const INDEX_NAME: &str = "model.safetensors.index.json";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

fn format_error(file: &Path, tensor: &str, why: impl Into<String>) -> Error {
    Error::Format {
        file: file.display().to_string(),
        tensor: tensor.to_string(),
        why: why.into(),
    }
}

/// An open model: its shards in order, its index and its other files.
pub struct Model {
    pub path: PathBuf,
    pub is_dir: bool,
    pub shards: Vec<SafetensorsFile>,
    /// The index json of a sharded directory (rewritten for the output).
    pub index: Option<Map<String, Value>>,
    /// Files copied as they are (config.json, tokenizer files, ...).
    pub other_files: Vec<PathBuf>,
    /// Subdirectories copied whole (sentence-transformers' 1_Pooling, ...).
    pub other_dirs: Vec<PathBuf>,
    by_name: HashMap<String, (usize, usize)>,
}

impl Model {
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
            let text = std::fs::read(&index_path).map_err(io(&index_path))?;
            let index: Map<String, Value> = serde_json::from_slice(&text)
                .map_err(|e| format_error(&index_path, "-", format!("not a valid index: {e}")))?;
            let Some(Value::Object(map)) = index.get("weight_map") else {
                return Err(format_error(&index_path, "-", "no weight_map object"));
            };
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let Some(file) = file.as_str() else {
                    return Err(format_error(
                        &index_path,
                        tensor,
                        "weight_map value is not a file name",
                    ));
                };
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(format_error(
                        &index_path,
                        tensor,
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
                .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
                .collect();
            match names.len() {
                0 => {
                    return Err(format_error(
                        path,
                        "-",
                        "no .safetensors file in this directory",
                    ));
                }
                1 => {}
                _ => {
                    return Err(format_error(
                        path,
                        "-",
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
                let n = p.file_name().unwrap().to_string_lossy();
                n != INDEX_NAME && !shard_names.iter().any(|s| *s == n)
            })
            .collect();
        let mut model = Model::assemble(path, true, shards, index, other_files)?;
        model.other_dirs = other_dirs;
        if let Some(Value::Object(map)) = model.index.as_ref().and_then(|i| i.get("weight_map")) {
            for (tensor, file) in map {
                match model.by_name.get(tensor) {
                    Some(&(s, _))
                        if model.shards[s].path.file_name().unwrap().to_string_lossy()
                            == file.as_str().unwrap_or("") => {}
                    Some(&(s, _)) => {
                        return Err(format_error(
                            &index_path,
                            tensor,
                            format!(
                                "index says {}, but it is in {}",
                                file,
                                model.shards[s].path.display()
                            ),
                        ))
                    }
                    None => {
                        return Err(format_error(
                            &index_path,
                            tensor,
                            format!("listed in the index but not in {file}"),
                        ))
                    }
                }
            }
            if map.len() != model.by_name.len() {
                return Err(format_error(
                    &index_path,
                    "-",
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
                    return Err(format_error(
                        &f.path,
                        &e.name,
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
        })
    }

    /// Every tensor, shard by shard in file order.
    pub fn entries(&self) -> impl Iterator<Item = (&SafetensorsFile, &Entry)> {
        self.shards
            .iter()
            .flat_map(|s| s.entries.iter().map(move |e| (s, e)))
    }

    pub fn find(&self, name: &str) -> Option<(&SafetensorsFile, &Entry)> {
        self.by_name
            .get(name)
            .map(|&(s, i)| (&self.shards[s], &self.shards[s].entries[i]))
    }

    pub fn total_bytes(&self) -> u64 {
        self.entries().map(|(_, e)| e.bytes() as u64).sum()
    }

    /// Every path this model reads (for refusing to write over one).
    pub fn input_paths(&self) -> Vec<PathBuf> {
        let mut v = vec![self.path.clone()];
        v.extend(self.shards.iter().map(|s| s.path.clone()));
        v.extend(self.other_files.iter().cloned());
        v
    }
}

/// Copies a directory tree (regular files and subdirectories).
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(io(to))?;
    for e in std::fs::read_dir(from).map_err(io(from))? {
        let p = e.map_err(io(from))?.path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest)?;
        } else {
            std::fs::copy(&p, &dest).map_err(io(&p))?;
        }
    }
    Ok(())
}

/// Where output goes, checked before any work starts.
pub struct OutputTarget {
    pub path: PathBuf,
    pub is_dir: bool,
    pub force: bool,
}

impl OutputTarget {
    /// Refuses an output that is one of the inputs (even with --force), or
    /// that exists without --force, or whose kind differs from the input's.
    pub fn check(
        path: &Path,
        is_dir: bool,
        force: bool,
        inputs: &[&Model],
    ) -> Result<OutputTarget> {
        if let Ok(out) = path.canonicalize() {
            for m in inputs {
                for p in m.input_paths() {
                    if p.canonicalize().is_ok_and(|p| p == out) {
                        return Err(Error::input(format!(
                            "output {} is an input: modelpress never writes over its inputs",
                            path.display()
                        )));
                    }
                }
            }
            if !force {
                return Err(Error::input(format!(
                    "output {} already exists (use --force to replace it)",
                    path.display()
                )));
            }
            if path.is_dir() != is_dir {
                return Err(Error::input(format!(
                    "output {} exists and is {}; the input is {}",
                    path.display(),
                    if path.is_dir() {
                        "a directory"
                    } else {
                        "a file"
                    },
                    if is_dir { "a directory" } else { "a file" }
                )));
            }
        }
        if !is_dir && path.extension().is_none_or(|e| e != "safetensors") {
            return Err(Error::input(format!(
                "output {} should end in .safetensors (the input is a file)",
                path.display()
            )));
        }
        Ok(OutputTarget {
            path: path.to_path_buf(),
            is_dir,
            force,
        })
    }
}

/// New contents for a copied file (by name), or None to copy it as it is.
pub type Rewrite<'a> = &'a dyn Fn(&str, &[u8]) -> Result<Option<Vec<u8>>>;

/// Writes a model's output: shards into a staging directory (or one file
/// beside its target), then `commit` moves everything into place.
pub struct ModelWriter {
    target: OutputTarget,
    staging: PathBuf,
    committed: bool,
    /// (shard file name, tensor names) in order, for the index.
    shards: Vec<(String, Vec<String>, u64)>,
}

impl ModelWriter {
    pub fn new(target: OutputTarget) -> Result<ModelWriter> {
        let staging = if target.is_dir {
            let name = target
                .path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let s = target
                .path
                .with_file_name(format!(".{name}.modelpress-{}.staging", std::process::id()));
            let _ = std::fs::remove_dir_all(&s);
            std::fs::create_dir_all(&s).map_err(io(&s))?;
            s
        } else {
            target.path.clone()
        };
        Ok(ModelWriter {
            target,
            staging,
            committed: false,
            shards: Vec::new(),
        })
    }

    /// A writer for the next shard (file name as in the input; ignored for a
    /// single-file output).
    pub fn shard(
        &mut self,
        file_name: &str,
        entries: Vec<OutEntry>,
        metadata: Option<&Metadata>,
    ) -> Result<SafetensorsWriter> {
        let path = if self.target.is_dir {
            self.staging.join(file_name)
        } else {
            self.target.path.clone()
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

    /// Copies the input's other files (through `rewrite`, which may return
    /// new contents for a file name, such as a config whose sizes changed)
    /// and writes the index, then moves the output into place.
    pub fn commit(mut self, model: &Model, rewrite: Rewrite) -> Result<()> {
        if self.target.is_dir {
            for f in &model.other_files {
                let name = f.file_name().unwrap().to_string_lossy().to_string();
                let dest = self.staging.join(&name);
                let bytes = std::fs::read(f).map_err(io(f))?;
                match rewrite(&name, &bytes).map_err(|e| e.at(f, "-"))? {
                    Some(new) => std::fs::write(&dest, new).map_err(io(&dest))?,
                    None => std::fs::copy(f, &dest).map(|_| ()).map_err(io(f))?,
                }
            }
            for d in &model.other_dirs {
                copy_dir(d, &self.staging.join(d.file_name().unwrap()))?;
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
                let p = self.staging.join(INDEX_NAME);
                let text = serde_json::to_string_pretty(&Value::Object(index)).expect("json");
                std::fs::write(&p, text + "\n").map_err(io(&p))?;
            }
            let out = &self.target.path;
            let old = out.with_file_name(format!(
                ".{}.modelpress-{}.old",
                out.file_name().unwrap().to_string_lossy(),
                std::process::id()
            ));
            let replacing = out.exists();
            if replacing {
                std::fs::rename(out, &old).map_err(io(out))?;
            }
            if let Err(e) = std::fs::rename(&self.staging, out) {
                if replacing {
                    let _ = std::fs::rename(&old, out);
                }
                return Err(io(out)(e));
            }
            if replacing {
                let _ = std::fs::remove_dir_all(&old);
            }
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for ModelWriter {
    fn drop(&mut self) {
        if !self.committed && self.target.is_dir {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}
