/* A gateway clock that steps on demand, for tests (LD_PRELOAD).
 *
 * CLOCK_REALTIME (clock_gettime, gettimeofday, time) reads the true time plus the number of
 * seconds in the file named by CLOCKSHIFT_FILE (re-read at most every 50 ms; missing or empty:
 * 0). CLOCK_MONOTONIC is untouched, as on a gateway whose RTC or NTP moves the wall clock.
 * Built by tests/faultclock.py with the system's cc; nothing else uses it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *) = NULL;
static double shift = 0.0;
static struct timespec checked = {0, 0};

static double current_shift(void) {
    struct timespec now;
    real_clock_gettime(CLOCK_MONOTONIC, &now);
    double since = (now.tv_sec - checked.tv_sec) + (now.tv_nsec - checked.tv_nsec) / 1e9;
    if (checked.tv_sec == 0 || since >= 0.05) {
        checked = now;
        const char *path = getenv("CLOCKSHIFT_FILE");
        double value = 0.0;
        FILE *f = path ? fopen(path, "r") : NULL;
        if (f) {
            if (fscanf(f, "%lf", &value) != 1) value = 0.0;
            fclose(f);
        }
        shift = value;
    }
    return shift;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    if (!real_clock_gettime) real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real_clock_gettime(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        double s = current_shift();
        long long whole = (long long)s;
        long nsec = ts->tv_nsec + (long)((s - (double)whole) * 1e9);
        ts->tv_sec += whole + nsec / 1000000000L;
        nsec %= 1000000000L;
        if (nsec < 0) { nsec += 1000000000L; ts->tv_sec -= 1; }
        ts->tv_nsec = nsec;
    }
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return -1;
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
