fn main() {
    loratune::backend::tune_allocator();
    if let Err(e) = loratune::cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
