/// mimalloc instead of the C library's allocator: the Redis path allocates per request
/// (arguments, replies, answers), and under glibc's malloc a profile of it at 16 × 32 streams
/// spent ~22 % in malloc/free (`_int_malloc`, `_int_free`, `malloc_consolidate`); the static
/// image's musl malloc is slower still. Measured in the README (Performance → Redis).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ratethrottle::cli::main()
}
