fn main() { eprintln!("loadtest: not implemented yet (see issue 3)"); std::process::exit(2); }
