//! The `tokenwarden` binary; everything lives in the library.

/// mimalloc instead of the system allocator: every request allocates and frees
/// many small strings across threads, where glibc's malloc spent several times more.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tokenwarden::cli::main()
}
