//! Writing to standard output without panicking when the reader goes away:
//! `synod ls / | head -1` ends quietly, as a Unix tool killed by SIGPIPE
//! would, instead of panicking in `println!`.

use std::io::{ErrorKind, Write};

/// Prints a line like `println!`; see [`line`].
macro_rules! say {
    () => {
        $crate::output::line(format_args!(""))
    };
    ($($argument:tt)*) => {
        $crate::output::line(format_args!($($argument)*))
    };
}

/// Writes one line to standard output. When the reader has gone (a closed
/// pipe) the program exits at once with status 0: nobody is left to read
/// the rest. Other write errors are ignored, as `println!` cannot report them.
pub fn line(arguments: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(arguments)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    if let Err(error) = written {
        if error.kind() == ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}
