/* The engine's thread pool. Workers spin briefly between the parallel parts of a step
 * (microseconds apart) and sleep on a condition variable between steps, so they hold no
 * core while Python or torch runs. Dekker-style handshake: the caller bumps the generation,
 * then wakes sleepers; a worker announces it sleeps, then re-checks the generation under
 * the mutex. */
#include "engine.h"

#define SPIN_LIMIT 20000

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_int gen, pending, sleeping;
    int workers, active;
    task_fn fn;
    void *ctx;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
pthread_mutex_t step_lock = PTHREAD_MUTEX_INITIALIZER;

static inline void cpu_relax(void) {
#if EP_X86
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int start_gen[MAX_THREADS]; /* the generation a worker was created at */

static void *worker_main(void *arg) {
    const int tid = (int)(intptr_t)arg;
    int seen = start_gen[tid]; /* not pool.gen now: a job may have been posted since */
    for (;;) {
        int g, spins = 0;
        while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
            if (++spins < SPIN_LIMIT) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleeping, 1);
            while ((g = atomic_load(&pool.gen)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.mu);
            break;
        }
        seen = g;
        if (tid < pool.active) pool.fn(pool.ctx, tid, pool.active);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_acq_rel);
    }
    return NULL;
}

void pool_after_fork(void) { /* threads do not survive fork(): start afresh */
    pool.workers = 0;
    atomic_store(&pool.pending, 0);
    atomic_store(&pool.sleeping, 0);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pthread_mutex_init(&step_lock, NULL);
}

/* at least n workers besides the caller, as far as the system allows; the threads there are */
int ensure_workers(int n) {
    if (n > MAX_THREADS - 1) n = MAX_THREADS - 1;
    while (pool.workers < n) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        start_gen[pool.workers + 1] = atomic_load(&pool.gen);
        int rc = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)(pool.workers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool.workers++;
    }
    return pool.workers + 1;
}

/* fn(ctx, tid, nth) on nth threads, the caller being tid 0; returns when all are done */
void parallel(task_fn fn, void *ctx, int nth) {
    if (nth > pool.workers + 1) nth = pool.workers + 1;
    if (nth <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.active = nth;
    atomic_store(&pool.pending, pool.workers);
    atomic_fetch_add(&pool.gen, 1); /* seq_cst: publishes fn/ctx/active */
    if (atomic_load(&pool.sleeping) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    fn(ctx, 0, nth);
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) cpu_relax();
}
