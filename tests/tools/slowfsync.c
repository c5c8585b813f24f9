/* A disk whose every fsync and fdatasync is 20-100 ms slower, for bench/exactly_once_soak.py
 * (LD_PRELOAD, the agent process only). SLOW_FSYNC_MIN_MS / SLOW_FSYNC_MAX_MS change the range.
 * Prints what it did to stderr (the agent's log) when the process exits normally.
 * Built with tests/shims.py, as the tests' fault shims are.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <pthread.h>

static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static unsigned long calls;
static double slept_ms;
static unsigned int seed;
static int lo_ms = 20, hi_ms = 100;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

__attribute__((constructor)) static void init(void) {
    real_fsync = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    const char *lo = getenv("SLOW_FSYNC_MIN_MS"), *hi = getenv("SLOW_FSYNC_MAX_MS");
    if (lo) lo_ms = atoi(lo);
    if (hi) hi_ms = atoi(hi);
    seed = (unsigned int)getpid();
    fprintf(stderr, "slow-fsync shim loaded: fsync/fdatasync +%d..%d ms (pid %d)\n",
            lo_ms, hi_ms, (int)getpid());
}

__attribute__((destructor)) static void fini(void) {
    fprintf(stderr, "slow-fsync shim: %lu calls, %.0f ms slept\n", calls, slept_ms);
}

static void slow(void) {
    pthread_mutex_lock(&mu);
    int ms = lo_ms + (hi_ms > lo_ms ? rand_r(&seed) % (hi_ms - lo_ms + 1) : 0);
    calls++;
    slept_ms += ms;
    pthread_mutex_unlock(&mu);
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int fsync(int fd) { slow(); return real_fsync(fd); }
int fdatasync(int fd) { slow(); return real_fdatasync(fd); }
