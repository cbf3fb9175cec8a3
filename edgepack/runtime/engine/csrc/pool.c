/* The engine's thread pool, built for boxes where other programs run too.
 *
 * Waiting: a thread spins at most SPIN_NS for the next part of a step (they come
 * microseconds apart), then sleeps on a futex (Linux; a condition variable elsewhere). A
 * worker that spins for long burns its share of a core it shares with another program, and
 * the scheduler then preempts it in the middle of its rows while every other thread waits:
 * with 20,000 spins (60 us to 1.4 ms by CPU) and one busy core beside it, SmolLM2-135M fell
 * from ~108 to 22 tok/s on a 2-core box.
 *
 * Rows: each thread first takes its own contiguous region of a matrix's rows (so the threads
 * stream disjoint memory), a chunk at a time, then takes chunks left in the others' regions:
 * a thread slowed by another program leaves its rows to the rest. Which thread computes a row
 * does not change its value, so results are bit-identical for any thread count.
 *
 * Late workers: a job of shared rows (parallel_rows) waits only for the workers that joined
 * it before the caller ran out of rows to take. A worker the scheduler has preempted (another
 * program on its core) would otherwise hold up every one of the ~150 parts of a step until it
 * runs again, with nothing left for it to do; it joins the next job instead.
 *
 * Thread count: adapt_threads picks it per decode step from measured step times (below). */
#include <limits.h>
#include <time.h>

#include "engine.h"

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#ifndef SPIN_NS
#define SPIN_NS 50000
#endif

/* one cache line per worker: its wake-up word and whether it sleeps on it */
typedef struct {
    _Alignas(64) atomic_int go;
    atomic_int sleeping;
} Slot;

/* one cache line per region of rows: the next row to take and the region's end */
typedef struct {
    _Alignas(64) atomic_int next;
    int end, chunk;
} Region;

/* an elastic job's word: OPEN while workers may join it, plus JOINED per worker inside it */
enum { OPEN = 1, JOINED = 2 };

static struct {
    Slot slot[MAX_THREADS];
    Region region[MAX_THREADS];
    _Alignas(64) atomic_int pending, caller_sleeping;
    _Alignas(64) atomic_int joined; /* elastic jobs: OPEN | JOINED x the workers inside */
    int workers, active;
    unsigned gen; /* a worker's go word: gen << 1, | 1 for an elastic job */
    task_fn fn;
    void *ctx;
} pool;
pthread_mutex_t step_lock = PTHREAD_MUTEX_INITIALIZER;
#ifndef __linux__
static pthread_mutex_t wait_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wait_cv = PTHREAD_COND_INITIALIZER;
#endif

static inline void cpu_relax(void) {
#if EP_X86
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* sleep while *w == v (returns at once if it differs, or spuriously) */
static void sleep_on(atomic_int *w, int v) {
#ifdef __linux__
    syscall(SYS_futex, (int *)w, FUTEX_WAIT_PRIVATE, v, NULL, NULL, 0);
#else
    pthread_mutex_lock(&wait_mu);
    if (atomic_load(w) == v) pthread_cond_wait(&wait_cv, &wait_mu);
    pthread_mutex_unlock(&wait_mu);
#endif
}

static void wake(atomic_int *w) {
#ifdef __linux__
    syscall(SYS_futex, (int *)w, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    (void)w;
    pthread_mutex_lock(&wait_mu);
    pthread_cond_broadcast(&wait_cv);
    pthread_mutex_unlock(&wait_mu);
#endif
}

/* spin up to SPIN_NS while *w == v; 1 if it changed meanwhile */
static int spin_while(atomic_int *w, int v) {
    const double until = now_s() + SPIN_NS * 1e-9;
    for (int i = 1;; i++) {
        if (atomic_load_explicit(w, memory_order_acquire) != v) return 1;
        cpu_relax();
        if (!(i & 63) && now_s() > until) return 0;
    }
}

static int start_go[MAX_THREADS]; /* a worker's word when it was created: a job may be posted before it runs */

static void *worker_main(void *arg) {
    const int tid = (int)(intptr_t)arg;
    Slot *s = &pool.slot[tid];
    int seen = start_go[tid];
    for (;;) {
        if (!spin_while(&s->go, seen)) {
            /* Dekker with parallel(): announce the sleep, then re-check the word */
            atomic_store(&s->sleeping, 1);
            while (atomic_load(&s->go) == seen) sleep_on(&s->go, seen);
            atomic_store(&s->sleeping, 0);
        }
        seen = atomic_load_explicit(&s->go, memory_order_acquire);
        if (!(seen & 1)) { /* every posted worker runs it once: the caller waits for all */
            pool.fn(pool.ctx, tid, pool.active);
            if (atomic_fetch_sub(&pool.pending, 1) == 1 && atomic_load(&pool.caller_sleeping)) wake(&pool.pending);
            continue;
        }
        /* elastic: join the job open now, if any (a later one than posted to this worker is as good) */
        int j = atomic_load(&pool.joined);
        while ((j & OPEN) && !atomic_compare_exchange_weak(&pool.joined, &j, j + JOINED)) {
        }
        if (!(j & OPEN)) continue; /* closed: the caller took every row */
        if (tid < pool.active) pool.fn(pool.ctx, tid, pool.active);
        if (atomic_fetch_sub(&pool.joined, JOINED) == JOINED && atomic_load(&pool.caller_sleeping)) wake(&pool.joined);
    }
    return NULL;
}

void pool_after_fork(void) { /* threads do not survive fork(): start afresh */
    pool.workers = 0;
    atomic_store(&pool.pending, 0);
    atomic_store(&pool.joined, 0);
    atomic_store(&pool.caller_sleeping, 0);
    for (int i = 0; i < MAX_THREADS; i++) atomic_store(&pool.slot[i].sleeping, 0);
    pthread_mutex_init(&step_lock, NULL);
#ifndef __linux__
    pthread_mutex_init(&wait_mu, NULL);
    pthread_cond_init(&wait_cv, NULL);
#endif
}

/* at least n workers besides the caller, as far as the system allows; the threads there are */
int ensure_workers(int n) {
    if (n > MAX_THREADS - 1) n = MAX_THREADS - 1;
    while (pool.workers < n) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        start_go[pool.workers + 1] = atomic_load(&pool.slot[pool.workers + 1].go);
        int rc = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)(pool.workers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool.workers++;
    }
    return pool.workers + 1;
}

const char *SYNC_NAMES[S_COUNTS] = {"parallel calls", "worker wake-ups (futex)", "caller sleeps (futex)"};
long sync_counts[S_COUNTS];
double sync_wait_seconds;

/* until *w is 0 (workers leaving a job count it down): spin briefly, then sleep on it */
static void wait_drained(atomic_int *w) {
    int left;
    while ((left = atomic_load_explicit(w, memory_order_acquire)) > 0) {
        if (spin_while(w, left)) continue;
        sync_counts[S_CALLER_SLEEPS] += profiling != 0;
        atomic_store(&pool.caller_sleeping, 1); /* Dekker with the last worker's wake */
        while ((left = atomic_load(w)) > 0) sleep_on(w, left);
        atomic_store(&pool.caller_sleeping, 0);
    }
}

/* fn(ctx, tid, nth) on nth threads, the caller being tid 0. Not elastic: returns when all
 * nth have run it (fn may split work by tid). Elastic (fn takes rows with take_rows): returns
 * when the rows are done, having waited only for the workers that joined in time. */
static void run_job(task_fn fn, void *ctx, int nth, int elastic) {
    if (nth > pool.workers + 1) nth = pool.workers + 1;
    sync_counts[S_CALLS] += profiling != 0;
    if (nth <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.active = nth;
    if (elastic)
        atomic_store(&pool.joined, OPEN);
    else
        atomic_store(&pool.pending, nth - 1);
    pool.gen++;
    const int word = (int)(pool.gen << 1 | (unsigned)elastic);
    for (int t = 1; t < nth; t++) { /* seq_cst stores: publish fn/ctx/active first */
        atomic_store(&pool.slot[t].go, word);
        if (atomic_load(&pool.slot[t].sleeping)) {
            wake(&pool.slot[t].go);
            sync_counts[S_WAKES] += profiling != 0;
        }
    }
    fn(ctx, 0, nth);
    const double own_done = profiling ? now_s() : 0.0;
    if (elastic) {
        atomic_fetch_and(&pool.joined, ~OPEN); /* every row is taken: no one joins now */
        wait_drained(&pool.joined);
    } else {
        wait_drained(&pool.pending);
    }
    if (profiling) sync_wait_seconds += now_s() - own_done;
}

void parallel(task_fn fn, void *ctx, int nth) { run_job(fn, ctx, nth, 0); }

/* ------------------------------------------------------------------ rows shared out */

/* split `rows` into nth regions for the next parallel() (split() gives the bounds), taken
 * `unit` rows at a time at least: chunks of ~1/8 of a region, so a slowed thread holds few rows */
static void share_rows(int rows, int nth, int unit) {
    if (nth > pool.workers + 1) nth = pool.workers + 1;
    if (nth < 1) nth = 1;
    for (int t = 0; t < nth; t++) {
        int lo, hi;
        split(rows, t, nth, &lo, &hi);
        if (unit > 1 && t > 0) lo = lo / unit * unit;
        if (unit > 1 && t < nth - 1) hi = hi / unit * unit;
        int chunk = (hi - lo) / 8;
        chunk = unit > 1 ? (chunk < 4 * unit ? 4 * unit : chunk / unit * unit) : (chunk < 1 ? 1 : chunk);
        atomic_store_explicit(&pool.region[t].next, lo, memory_order_relaxed);
        pool.region[t].end = hi;
        pool.region[t].chunk = chunk;
    }
}

/* the next rows [lo, hi) for thread tid of nth: its own region first, then the others'; 0 when none are left */
int take_rows(int tid, int nth, int *lo, int *hi) {
    for (int i = 0; i < nth; i++) {
        Region *r = &pool.region[(tid + i) % nth];
        if (atomic_load_explicit(&r->next, memory_order_relaxed) >= r->end) continue;
        const int at = atomic_fetch_add_explicit(&r->next, r->chunk, memory_order_relaxed);
        if (at >= r->end) continue;
        *lo = at;
        *hi = at + r->chunk < r->end ? at + r->chunk : r->end;
        return 1;
    }
    return 0;
}

void parallel_rows(task_fn fn, void *ctx, int rows, int unit, int nth) {
    share_rows(rows, nth, unit);
    run_job(fn, ctx, nth, 1);
}

/* ------------------------------------------------------------------ thread count per step
 *
 * A step's time with n threads, averaged (EMA) per n. The count in use is the fastest known;
 * every PROBE_EVERY steps one step runs with a neighbouring count (one fewer, then one more,
 * alternately) to refresh its figure: another program may have started or stopped. A count is
 * kept over a smaller one only when more than MARGIN faster (a thread costs a core).
 *
 * A probe is a step at a worse count: on a quiet 2-core box one thread runs a 1B model's step
 * 1.8x slower than two, so a probe every 24 steps cost ~3% of its tokens/s. A direction whose
 * probe lost by more than LOSS sits out twice as many of its turns as before (up to
 * MAX_BACKOFF); a probe that comes close, or a step at the count in use that moves that
 * count's figure by more than SHIFT (another program started or stopped: the probes matter
 * again), brings both back to every turn. */
#define PROBE_EVERY 24
#define MARGIN 0.03
#define LOSS 0.25
#define SHIFT 0.15
#define MAX_BACKOFF 8

static Adapt adapt; /* one-sequence decode steps' (run_step); batched steps keep their own (module.c) */

void adapt_reset(void) { memset(&adapt, 0, sizeof adapt); }

static void every_turn(Adapt *a) { a->backoff[0] = a->backoff[1] = 1, a->skip[0] = a->skip[1] = 0; }

/* direction d (0 down, 1 up) on its turn: 1 if it probes now, else it sits the turn out */
static int takes_turn(Adapt *a, int d) {
    if (a->skip[d] > 0) {
        a->skip[d]--;
        return 0;
    }
    return 1;
}

int adapt_threads_of(Adapt *a, int most) {
    if (most < 1) most = 1;
    if (a->most != most || a->current < 1 || a->current > most) {
        memset(a, 0, sizeof *a);
        a->most = most;
        a->current = most;
        every_turn(a);
    }
    a->steps++;
    if (a->steps % PROBE_EVERY == 3) { /* the first at step 3: the first step warms the cache pages */
        const int up = a->current + 1, down = a->current - 1;
        a->probe_up = !a->probe_up;
        if (a->probe_up && up <= most && takes_turn(a, 1)) return up;
        if (down >= 1 && takes_turn(a, 0)) return down;
        if (!a->probe_up && up <= most && takes_turn(a, 1)) return up;
    }
    return a->current;
}

void adapt_record_of(Adapt *a, int nth, double seconds) {
    if (nth < 1 || nth > MAX_THREADS || !(seconds > 0.0)) return;
    double *e = &a->ema[nth];
    if (nth == a->current && *e > 0.0 && fabs(seconds / *e - 1.0) > SHIFT) every_turn(a);
    *e = *e > 0.0 ? 0.75 * *e + 0.25 * seconds : seconds;
    if (nth != a->current && a->ema[a->current] > 0.0) { /* a probe: did it come close? */
        const int d = nth > a->current;
        if (*e > a->ema[a->current] * (1.0 + LOSS)) {
            a->backoff[d] = a->backoff[d] * 2 < MAX_BACKOFF ? a->backoff[d] * 2 : MAX_BACKOFF;
            a->skip[d] = a->backoff[d] - 1;
        } else {
            every_turn(a);
        }
    }
    /* the fastest of the current count and its neighbours, fewer threads on near-ties */
    int best = a->current;
    for (int n = a->current - 1; n <= a->current + 1; n++) {
        if (n < 1 || n > a->most || a->ema[n] <= 0.0 || n == best) continue;
        const double b = a->ema[best], c = a->ema[n];
        if (n < best ? c < b * (1.0 + MARGIN) : c < b * (1.0 - MARGIN)) best = n;
    }
    if (best != a->current) every_turn(a); /* the neighbours are new ones */
    a->current = best;
}

int adapt_threads(int most) { return adapt_threads_of(&adapt, most); }

void adapt_record(int nth, double seconds) { adapt_record_of(&adapt, nth, seconds); }

int adapt_current(void) { return adapt.current; }

double pool_now(void) { return now_s(); }
