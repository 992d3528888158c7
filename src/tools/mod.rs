//! Tools around the library: seeded sample models (`sample`), the kernel
//! cases behind `check` and `bench` (`bench`), model summaries (`inspect`)
//! and stdout that never panics (`print`, `outln!`).

pub mod bench;
pub mod inspect;
pub mod print;
pub mod sample;
