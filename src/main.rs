//! The `tokenwarden` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    tokenwarden::cli::main()
}
