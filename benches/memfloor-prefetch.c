// The memory floor of a hit with prefetch instructions, which the project's Rust cannot issue
// (they need `unsafe`, forbidden in Cargo.toml's lints, and `std::hint::prefetch_read` is not
// stable yet). The same shape as `examples/memfloor.rs`: N entries of 224 bytes scattered over
// one arena on transparent huge pages (as mimalloc gives the server), 24-byte buckets at ~40 %
// load, every request a batch of random keys: find the bucket, read the entry, copy 150 bytes.
//
//   cc -O2 -o target/memfloor-prefetch benches/memfloor-prefetch.c
//   target/memfloor-prefetch 100000 20     # entries, batch
//
// Prints nanoseconds per key one by one, and in passes with prefetches (all buckets, then all
// entries' lines, then the copies), and one dependent load's latency.
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

typedef struct {
    uint64_t key, check;
    char *entry;
} bucket;

enum { ENTRY = 224, ELEMENT = 150, ELEMENT_AT = 48 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint64_t state = 0x9E3779B97F4A7C15ull;
static uint64_t next(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

// Zeroed memory on huge pages where the kernel allows them (madvise mode).
static void *big(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 2 << 20, n) != 0) exit(1);
    madvise(p, n, MADV_HUGEPAGE);
    memset(p, 0, n);
    return p;
}

int main(int argc, char **argv) {
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 10) : 100000;
    int batch = argc > 2 ? atoi(argv[2]) : 20;
    if (n < 2 || batch < 1 || batch > 256) return 2;
    size_t slots = 1;
    while (slots < n * 5 / 2) slots <<= 1;
    size_t mask = slots - 1;
    bucket *table = big(slots * sizeof(bucket));
    char *arena = big(n * ENTRY);
    uint64_t *keys = malloc(n * sizeof(uint64_t));
    size_t *place = malloc(n * sizeof(size_t));
    for (size_t i = 0; i < n; i++) place[i] = i;
    for (size_t i = n - 1; i > 0; i--) {
        size_t j = next() % (i + 1), x = place[i];
        place[i] = place[j];
        place[j] = x;
    }
    for (size_t i = 0; i < n; i++) {
        char *e = arena + place[i] * ENTRY;
        memset(e, 'a' + i % 26, ENTRY);
        keys[i] = next() | 1;
        size_t h = keys[i] & mask;
        while (table[h].key) h = (h + 1) & mask;
        table[h] = (bucket){keys[i], ~keys[i], e};
    }
    static char out[256 * ELEMENT];
    bucket *found[256];
    uint64_t k[256], sum = 0;
    size_t rounds = 4000000 / batch;
    for (int way = 0; way < 2; way++) {
        double t0 = now();
        for (size_t r = 0; r < rounds; r++) {
            for (int i = 0; i < batch; i++) k[i] = keys[next() % n];
            if (way == 0) {
                for (int i = 0; i < batch; i++) {
                    size_t h = k[i] & mask;
                    while (table[h].key != k[i]) h = (h + 1) & mask;
                    memcpy(out + i * ELEMENT, table[h].entry + ELEMENT_AT, ELEMENT);
                }
            } else {
                for (int i = 0; i < batch; i++) __builtin_prefetch(&table[k[i] & mask]);
                for (int i = 0; i < batch; i++) {
                    size_t h = k[i] & mask;
                    while (table[h].key != k[i]) h = (h + 1) & mask;
                    found[i] = &table[h];
                    for (int line = 0; line < ENTRY; line += 64) __builtin_prefetch(table[h].entry + line);
                }
                for (int i = 0; i < batch; i++)
                    memcpy(out + i * ELEMENT, found[i]->entry + ELEMENT_AT, ELEMENT);
            }
            sum += (unsigned char)out[batch * ELEMENT - 1];
        }
        printf("%zu entries, batch %d, %s: %.1f ns per key\n", n, batch,
               way ? "in passes with prefetch" : "one by one", (now() - t0) * 1e9 / (rounds * batch));
    }
    // A ring through the entries in random order: each entry's first bytes point to the next.
    for (size_t i = 0; i < n; i++) *(char **)(arena + place[i] * ENTRY) = arena + place[(i + 1) % n] * ENTRY;
    char *p = arena;
    double t0 = now();
    for (int i = 0; i < 4000000; i++) p = *(char **)p;
    printf("%zu entries: %.1f ns per dependent load (%d)\n", n, (now() - t0) * 1e9 / 4000000,
           (int)(sum + (p != NULL)) & 1);
    return 0;
}
