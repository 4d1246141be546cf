fn main() {
    eprintln!("loadgen: not built yet; see docs/LOADGEN.md once the loadgen issue lands");
    std::process::exit(2);
}
