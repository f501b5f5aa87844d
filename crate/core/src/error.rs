use std::fmt;

/// Errors of the core. Messages are written for the person who called the API: they say what
/// was wrong and what was expected.
#[derive(Debug)]
pub enum Error {
    /// An impossible or malformed model configuration.
    Config(String),
    /// An input of the wrong size, type or range.
    Input(String),
    /// A checkpoint that does not match the model it is loaded into, or cannot be read.
    Checkpoint(String),
    /// A non-finite loss or gradient.
    Numeric(String),
    /// MPI could not be found or started, or the ranks of a job disagree.
    Distributed(String),
    Io(std::io::Error),
    Candle(candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(m) | Error::Input(m) | Error::Checkpoint(m) | Error::Numeric(m) | Error::Distributed(m) => {
                f.write_str(m)
            }
            Error::Io(e) => write!(f, "I/O error: {e}"),
            Error::Candle(e) => write!(f, "tensor error: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}
