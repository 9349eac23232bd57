//! The one error type of moe-hal and every backend.

/// Everything that can go wrong, in one enum shared by the front-end validation, every backend,
/// the checkpoint loader and the `moe` command.
///
/// Every variant carries one sentence a user can act on: it names the argument, tensor, file or
/// value at fault. Backends map their native failures onto these variants (an allocation failure
/// is always [`Error::OutOfMemory`], never [`Error::Driver`]) and never panic on them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A caller passed something the contract forbids: a wrong shape or dtype, top-k larger than
    /// the expert count, an expert id out of range, a non-finite input, and so on.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The backend exists but does not implement this op for this dtype (see
    /// [`crate::Backend::supports`]).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The backend cannot run on this machine (no driver, no adapter, no toolkit), or is a slot
    /// without an implementation.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The device (or the host, for the CPU backend) has not enough memory for the request.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The device was lost (reset, removed, driver crash); its buffers are gone.
    #[error("device lost: {0}")]
    DeviceLost(String),
    /// Any other failure reported by the native driver or runtime.
    #[error("driver error: {0}")]
    Driver(String),
    /// A model checkpoint is missing, truncated or not an MoE layer this crate understands.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// Reading or writing a file failed.
    #[error("i/o: {0}")]
    Io(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for `Err(Error::InvalidArgument(format!(..)))`.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { Err($crate::Error::InvalidArgument(format!($($arg)*))) };
}
