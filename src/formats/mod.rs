//! File formats. A format reads and writes bytes; it knows nothing of
//! devices or operations.

pub mod ggml_types;
pub mod gguf;
pub mod model;
pub mod output;
pub mod plan;
pub mod safetensors;

use crate::error::{Error, Result};
use std::path::Path;

/// Opens an input file for reading, refusing what is not a regular file (a
/// FIFO would block the job, a device would never end).
pub fn open_input(path: &Path) -> Result<std::fs::File> {
    let io = |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(Error::Format {
            file: path.display().to_string(),
            tensor: None,
            why: if meta.is_dir() {
                "is a directory, not a file".into()
            } else {
                "is not a regular file (a FIFO, device or socket)".into()
            },
        });
    }
    std::fs::File::open(path).map_err(io)
}

/// Reads a small input file whole (configs, option files), refusing what is
/// not a regular file.
pub fn read_input(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut v = Vec::new();
    open_input(path)?
        .read_to_end(&mut v)
        .map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
    Ok(v)
}

/// Makes the pages of `map[start..start + len]` resident now
/// (MADV_POPULATE_READ, one call, where the system has it), so that
/// reading is measured apart from computing.
pub fn populate_pages(map: &memmap2::Mmap, start: usize, len: usize) {
    #[cfg(target_os = "linux")]
    let _ = map.advise_range(memmap2::Advice::PopulateRead, start, len);
    #[cfg(not(target_os = "linux"))]
    let _ = (map, start, len);
}

/// Drops the pages of `map[start..start + len]` from this process (they stay
/// in the page cache and are read again if touched), so that resident
/// memory does not grow with the model as its tensors stream through.
pub fn release_pages(map: &memmap2::Mmap, start: usize, len: usize) {
    // madvise needs a page-aligned start: release whole pages inside.
    let page = 4096;
    let (first, end) = (start.div_ceil(page) * page, (start + len) / page * page);
    if end > first {
        // SAFETY: the map is read-only and file-backed; dropped pages are
        // read again from the file if touched.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, end - first)
        };
    }
}
