/* A disk that fails on demand, for tests (LD_PRELOAD).
 *
 * While the file named by EIO_CONTROL exists, every write, pwrite, pwrite64, fsync and
 * fdatasync on a file whose path starts with EIO_PREFIX fails with EIO, as a dying SD card or
 * eMMC does. Reads keep working. Remove the control file and the disk is healthy again.
 * Built by tests/faultdisk.py with the system's cc; nothing else uses it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static int failing_fd(int fd) {
    const char *prefix = getenv("EIO_PREFIX");
    const char *control = getenv("EIO_CONTROL");
    if (prefix == NULL || control == NULL || access(control, F_OK) != 0) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = '\0';
    return strncmp(path, prefix, strlen(prefix)) == 0;
}

#define REAL(name) static __typeof__(name) *real = NULL; if (!real) real = dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write);
    if (failing_fd(fd)) { errno = EIO; return -1; }
    return real(fd, buf, count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite);
    if (failing_fd(fd)) { errno = EIO; return -1; }
    return real(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite64);
    if (failing_fd(fd)) { errno = EIO; return -1; }
    return real(fd, buf, count, offset);
}

int fsync(int fd) {
    REAL(fsync);
    if (failing_fd(fd)) { errno = EIO; return -1; }
    return real(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync);
    if (failing_fd(fd)) { errno = EIO; return -1; }
    return real(fd);
}
