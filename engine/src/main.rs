use clap::Parser;
use tarta::config::{Cli, Config};

#[cfg(not(feature = "alloc-census"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "alloc-census")]
#[global_allocator]
static GLOBAL: census::Census = census::Census;

#[cfg(feature = "alloc-census")]
mod census {
    //! Live allocations by requested size (8-byte buckets up to 4 KiB).
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

    const BUCKETS: usize = 513;
    static LIVE: [AtomicI64; BUCKETS] = [const { AtomicI64::new(0) }; BUCKETS];
    static BYTES: [AtomicI64; BUCKETS] = [const { AtomicI64::new(0) }; BUCKETS];

    pub struct Census;

    fn bucket(size: usize) -> usize {
        size.div_ceil(8).min(BUCKETS - 1)
    }

    unsafe impl GlobalAlloc for Census {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            LIVE[bucket(l.size())].fetch_add(1, Relaxed);
            BYTES[bucket(l.size())].fetch_add(l.size() as i64, Relaxed);
            unsafe { mimalloc::MiMalloc.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            LIVE[bucket(l.size())].fetch_sub(1, Relaxed);
            BYTES[bucket(l.size())].fetch_sub(l.size() as i64, Relaxed);
            unsafe { mimalloc::MiMalloc.dealloc(p, l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            LIVE[bucket(l.size())].fetch_sub(1, Relaxed);
            BYTES[bucket(l.size())].fetch_sub(l.size() as i64, Relaxed);
            LIVE[bucket(new)].fetch_add(1, Relaxed);
            BYTES[bucket(new)].fetch_add(new as i64, Relaxed);
            unsafe { mimalloc::MiMalloc.realloc(p, l, new) }
        }
    }

    pub fn start() {
        let Some(path) = std::env::var_os("TARTA_ALLOC_CENSUS") else {
            return;
        };
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(2));
            let mut out = String::from("bucket_max_size live_count live_bytes\n");
            for i in 0..BUCKETS {
                let n = LIVE[i].load(Relaxed);
                if BYTES[i].load(Relaxed) > 50_000 {
                    out += &format!("{} {} {}\n", i * 8, n, BYTES[i].load(Relaxed));
                }
            }
            let _ = std::fs::write(&path, out);
        });
    }
}

fn main() {
    #[cfg(feature = "alloc-census")]
    census::start();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("passwd") {
        std::process::exit(tarta::passwd_tool::main(&args[2..]));
    }
    let cli = Cli::parse();
    let cfg = match Config::load(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tarta: {e}");
            std::process::exit(2);
        }
    };
    let guard = tarta::logging::init(&cfg.log, cfg.log_format);
    let result = tarta::runtime::run(cfg);
    // Flushes the log lines still queued.
    drop(guard);
    if let Err(e) = result {
        eprintln!("tarta: {e}");
        std::process::exit(1);
    }
}
