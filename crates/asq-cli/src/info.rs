//! `asq info`: the CPU features and kernel variants this machine runs.

/// `asq info`.
pub fn info() {
    println!("asq {}", env!("CARGO_PKG_VERSION"));
    println!("threads (rayon): {}", rayon::current_num_threads());
    let names: Vec<&str> = asq_kernels::Isa::available_all()
        .iter()
        .map(|i| i.name())
        .collect();
    println!("kernel variants available: {}", names.join(", "));
    println!("kernel variant in use: {}", asq_kernels::Isa::best().name());
}
