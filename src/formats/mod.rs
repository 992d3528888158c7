//! File formats. A format reads and writes bytes; it knows nothing of
//! devices or operations.

pub mod atomic;
pub mod gguf;
pub mod model;
pub mod safetensors;

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
