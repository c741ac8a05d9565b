//! What the memory system alone allows for a hit: no parsing, no digest, no JSON, no locks.
//! N entries of 224 bytes (the size class of a cached ~150-byte element, see
//! `src/cache/entry.rs`) scattered over one arena, a bucket table at the read map's load (~40 %,
//! 24-byte buckets: a key and the entry's place), and for every request a batch of keys drawn at
//! random: find each one's bucket, read its entry, copy its 150-byte element out. Prints
//! nanoseconds per key, the floor under `hitpath`'s figures, which add the parse, the keyed
//! digest, the read map's locks and the stitch.
//!
//! `cargo run --release --example memfloor -- [--entries 100000,1000000] [--batch 20,100] [--seconds 2]`
//!
//! Three ways, each on the same table:
//! - `one by one`: each key found and copied before the next starts (the CPU overlaps what
//!   its out-of-order window lets it);
//! - `in passes`: all buckets read first, then all entries' lines, then the copies, so the
//!   loads of different keys are in flight together: how `Front::with_many` reads;
//! - `dependent`: every load's address comes from the one before it, the latency of one load
//!   that misses every cache (and, at 1 000 000 entries, the TLB).
//!
//! Safe Rust only: the passes start loads by reading a byte of each line (as the read map
//! does), not with prefetch instructions. `benches/memfloor-prefetch.c` is the same shape in C,
//! with prefetches (see BENCHMARKS.md).

/// The server's allocator (see `src/main.rs`): it asks the kernel for transparent huge pages,
/// so a random load seldom misses the TLB too, as in the server.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::time::{Duration, Instant};

const ENTRY: usize = 224;
const ELEMENT: usize = 150;
/// Where the element starts in an entry: after its count, head and length (48 bytes).
const ELEMENT_AT: usize = 48;
/// Every line of the entry is read in the second pass, as `Entry::touch` reads them.
const LINE_STEP: usize = 64;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn list(name: &str, default: &str) -> Vec<usize> {
    arg(name)
        .unwrap_or_else(|| default.to_string())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    key: u64,
    check: u64,
    /// Offset of the entry in the arena.
    at: u64,
}

struct Table {
    buckets: Vec<Bucket>,
    mask: usize,
    arena: Vec<u8>,
    keys: Vec<u64>,
}

impl Table {
    fn new(n: usize, rng: &mut fastrand::Rng) -> Table {
        let slots = (n * 5 / 2).next_power_of_two();
        let mut buckets = vec![Bucket::default(); slots];
        let mask = slots - 1;
        // Entries in shuffled places, so neighbouring keys are not neighbouring lines.
        let mut place: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            place.swap(i, rng.usize(..=i));
        }
        let mut arena = vec![0u8; n * ENTRY];
        let mut keys = Vec::with_capacity(n);
        for (i, &p) in place.iter().enumerate() {
            let at = p * ENTRY;
            arena[at..at + ENTRY].fill(b'a' + (i % 26) as u8);
            let key = rng.u64(..) | 1;
            keys.push(key);
            let mut h = key as usize & mask;
            while buckets[h].key != 0 {
                h = (h + 1) & mask;
            }
            buckets[h] = Bucket {
                key,
                check: !key,
                at: at as u64,
            };
        }
        Table {
            buckets,
            mask,
            arena,
            keys,
        }
    }

    fn find(&self, key: u64) -> &Bucket {
        let mut h = key as usize & self.mask;
        while self.buckets[h].key != key {
            h = (h + 1) & self.mask;
        }
        &self.buckets[h]
    }

    fn element(&self, at: usize) -> &[u8; ELEMENT] {
        let at = at + ELEMENT_AT;
        self.arena[at..at + ELEMENT]
            .try_into()
            .expect("an element is ELEMENT bytes")
    }

    /// Each element is copied to its own place in `out`.
    fn one_by_one(&self, keys: &[u64], out: &mut [[u8; ELEMENT]]) {
        for (&k, slot) in keys.iter().zip(out.iter_mut()) {
            let b = self.find(k);
            debug_assert_eq!(b.check, !k);
            *slot = *self.element(b.at as usize);
        }
    }

    fn in_passes(&self, keys: &[u64], found: &mut Vec<usize>, out: &mut [[u8; ELEMENT]]) -> usize {
        let mut sum = 0usize;
        for &k in keys {
            sum ^= self.buckets[k as usize & self.mask].key as usize;
        }
        found.clear();
        for &k in keys {
            let b = self.find(k);
            let at = b.at as usize;
            for line in (0..ENTRY).step_by(LINE_STEP) {
                sum ^= usize::from(self.arena[at + line]);
            }
            found.push(at);
        }
        for (&at, slot) in found.iter().zip(out.iter_mut()) {
            *slot = *self.element(at);
        }
        sum
    }
}

fn main() {
    let seconds = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let run_for = Duration::from_secs_f64(seconds);
    println!(
        "{:>9} {:>6} {:>12} {:>12}",
        "entries", "batch", "one by one", "in passes"
    );
    let mut dependent = Vec::new();
    for n in list("--entries", "100000,1000000") {
        // A cheap seeded generator (wyrand), so the draw does not hide the loads.
        let mut rng = fastrand::Rng::with_seed(0x9E37_79B9_7F4A_7C15);
        let table = Table::new(n.max(2), &mut rng);
        for batch in list("--batch", "20,100") {
            let batch = batch.max(1);
            let mut keys = vec![0u64; batch];
            let mut out = vec![[0u8; ELEMENT]; batch];
            let mut found = Vec::with_capacity(batch);
            let mut per_key = [0.0f64; 2];
            for (way, ns) in per_key.iter_mut().enumerate() {
                let (mut done, start) = (0u64, Instant::now());
                while start.elapsed() < run_for {
                    for _ in 0..64 {
                        for k in keys.iter_mut() {
                            *k = table.keys[rng.usize(..table.keys.len())];
                        }
                        if way == 0 {
                            table.one_by_one(&keys, &mut out);
                        } else {
                            black_box(table.in_passes(&keys, &mut found, &mut out));
                        }
                        black_box(&out);
                        done += batch as u64;
                    }
                }
                *ns = start.elapsed().as_nanos() as f64 / done as f64;
            }
            println!(
                "{n:>9} {batch:>6} {:>9.1} ns {:>9.1} ns",
                per_key[0], per_key[1]
            );
        }
        // A ring through every entry in a random order; each load's address is the last one's
        // value.
        let mut order: Vec<usize> = (0..table.keys.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.usize(..=i));
        }
        // Each entry's first 4 bytes name the next entry of the ring.
        let mut arena = table.arena;
        for w in 0..order.len() {
            let next = order[(w + 1) % order.len()] as u32;
            let at = order[w] * ENTRY;
            arena[at..at + 4].copy_from_slice(&next.to_le_bytes());
        }
        let (mut at, mut hops, start) = (0usize, 0u64, Instant::now());
        while start.elapsed() < run_for {
            for _ in 0..1024 {
                let base = at * ENTRY;
                let bytes = [
                    arena[base],
                    arena[base + 1],
                    arena[base + 2],
                    arena[base + 3],
                ];
                at = u32::from_le_bytes(bytes) as usize;
                hops += 1;
            }
        }
        black_box(at);
        dependent.push((n, start.elapsed().as_nanos() as f64 / hops as f64));
    }
    for (n, ns) in dependent {
        println!("{n:>9} entries: {ns:.1} ns per dependent load (one that misses)");
    }
}
