fn main() -> std::process::ExitCode {
    ratethrottle::cli::main()
}
