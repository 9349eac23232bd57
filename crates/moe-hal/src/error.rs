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

/// The message of a caught panic (`catch_unwind`'s payload), for turning a panic inside a driver
/// or its bindings into an error sentence that says what happened: the `&str` or `String` that
/// `panic!` carries, or a placeholder for any other payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

thread_local! {
    /// How many [`catch_panic`] calls are running on this thread.
    static CATCHING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Runs `f`, turning a panic inside it into `Err(its message)`: for calls into a vendor's
/// bindings that can panic where they should fail (cudarc without a driver, wgpu-hal on a
/// feature the driver refuses), so a backend reports an error sentence instead.
///
/// While `f` runs, [`panic_is_caught`] is true on this thread, so a program's panic hook can
/// stay quiet about a panic that becomes an error (the `moe` command's hook prints every other
/// panic as a bug).
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    struct Depth;
    impl Drop for Depth {
        fn drop(&mut self) {
            CATCHING.with(|c| c.set(c.get() - 1));
        }
    }
    CATCHING.with(|c| c.set(c.get() + 1));
    let _depth = Depth;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| panic_message(&*p).to_string())
}

/// True inside [`catch_panic`] on this thread: a panic hook's cue that the panic will be caught
/// and reported as an error.
pub fn panic_is_caught() -> bool {
    CATCHING.with(|c| c.get() > 0)
}

#[cfg(test)]
mod tests {
    use super::panic_message;

    #[test]
    fn catch_panic_marks_its_extent() {
        use super::{catch_panic, panic_is_caught};
        assert!(!panic_is_caught());
        assert_eq!(catch_panic(panic_is_caught), Ok(true));
        assert_eq!(catch_panic(|| -> u8 { panic!("driver said no") }), Err("driver said no".to_string()));
        assert_eq!(catch_panic(|| catch_panic(|| 1)), Ok(Ok(1)));
        assert!(!panic_is_caught(), "the mark ends with the call, panic or not");
    }

    #[test]
    fn panic_message_reads_both_payload_kinds() {
        let s = std::panic::catch_unwind(|| panic!("static text")).unwrap_err();
        assert_eq!(panic_message(&*s), "static text");
        let n = 3;
        let f = std::panic::catch_unwind(|| panic!("formatted {n}")).unwrap_err();
        assert_eq!(panic_message(&*f), "formatted 3");
        let other = std::panic::catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(panic_message(&*other), "a panic without a message");
    }
}
