//! The `vipsec` binary: parse, then hand over to the CLI module (which runs the agent or a
//! client subcommand).

fn main() -> std::process::ExitCode {
    vipsec::cli::main()
}
