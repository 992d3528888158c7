//! Standard output that never panics: `println!` panics when stdout is a
//! closed pipe or a full device; `outln!` returns `Error::Stdout` instead,
//! which the command line turns into the conventional exit status.

use crate::error::{Error, Result};
use std::io::Write;

/// Writes one line to stdout; an error is `Error::Stdout`.
pub fn line(args: std::fmt::Arguments) -> Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_fmt(args)
        .and_then(|_| o.write_all(b"\n"))
        .map_err(Error::Stdout)
}

/// `println!` returning `Result<()>`: use with `?`.
#[macro_export]
#[doc(hidden)]
macro_rules! outln {
    () => {
        $crate::tools::print::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::tools::print::line(format_args!($($arg)*))
    };
}
