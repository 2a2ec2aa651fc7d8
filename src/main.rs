/// Counts live heap bytes for `loratune bench` (see `loratune::heap`).
#[global_allocator]
static HEAP: loratune::heap::Counting = loratune::heap::Counting;

fn main() {
    loratune::backend::tune_allocator();
    if let Err(e) = loratune::cli::main() {
        // The error and its causes, each cause once: most of ours already quote their source.
        let mut msg = e.to_string();
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !msg.contains(&c) {
                msg = format!("{msg}: {c}");
            }
        }
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}
