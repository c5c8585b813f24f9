/* A disk that keeps only what was fsynced: LazyFS, in-process, for tests (LD_PRELOAD).
 *
 * What it models. For regular files whose path starts with LAZYFS_PREFIX (a directory), this
 * process's writes go to its own memory, a "page cache" per inode, and reach the real file only
 * when the process fsyncs or fdatasyncs that file (or calls sync/syncfs). The process sees its
 * own unsynced writes everywhere it looks (read, pread, readv, fstat/stat/lstat/fstatat sizes,
 * lseek SEEK_END), so it runs as usual. When it dies, by SIGKILL or any other way, what it did
 * not sync is gone: the real file holds what a disk holds after a power cut at that instant,
 * in the outcome where no unsynced write had reached the disk. ftruncate and O_TRUNC are
 * deferred the same way. SQLite's "-shm" files are passed through untouched: shared memory
 * (mmap), rebuilt from the WAL after a crash, never durable anyway.
 *
 * Directory entries. Creating a file, rename and unlink under the prefix happen at once (the
 * process sees them) and are appended to the text file LAZYFS_LOG (keep it outside the prefix),
 * with a hard link to any file they remove; an fsync of a directory under the prefix appends
 * "sync DIR". After the process is dead, tests/faultfs.py undoes every entry change that no
 * later fsync of its directory made durable (POSIX's worst case, not ext4's kinder one).
 * Without LAZYFS_LOG, entry changes are durable at once.
 *
 * Not modeled (the shim is for SQLite and the agent, whose calls were checked with strace:
 * openat, pread64, pwrite64, write, read, lseek, fstat/newfstatat, ftruncate, fsync,
 * fdatasync (files and directories), rename, unlink, close; mmap of "-shm" only):
 * - unsynced writes that did reach the disk, partly or out of order (LazyFS's torn writes and
 *   reorderings), and disks that lie about flushes: only "nothing unsynced survives";
 * - a clean exit keeps nothing unsynced either (no writeback: as if the power went then);
 * - other processes see only what was synced (a real page cache is shared), and a child forked
 *   without exec keeps a private copy of the parent's unsynced writes;
 * - a file's fsync does not make its own new name durable (ext4's does; POSIX does not say);
 * - metadata other than the size (mode, owner, times), mkdir, rmdir, link, symlink and
 *   RENAME_EXCHANGE: durable at once;
 * - sync_file_range (no barrier: no metadata, no device flush) and SEEK_DATA/SEEK_HOLE reach
 *   the real file, which holds none of the unsynced data; O_DIRECT writes are cached as any;
 * - stdio (fopen: glibc's internal calls do not pass here), fcntl(F_DUPFD) copies, truncate(path),
 *   statx, the old __xstat family and 32-bit builds are not intercepted;
 * - mmap, fallocate, copy_file_range, sendfile, preadv and pwritev on a tracked file are
 *   refused (ENOTSUP, with a line on stderr), so they do not silently bypass the model.
 * Built by tests/faultfs.py with the system's cc (Linux, glibc 2.34 or later).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define PG 4096
#define MAXFD 65536

/* One inode's page cache. */
struct file {
    dev_t dev;
    ino_t ino;
    int rfd;        /* our own O_RDWR descriptor: reads of clean data, and the flush */
    int refs;       /* the process's descriptors open on it */
    int dirty;
    off_t size;     /* the size the process sees */
    off_t floor;    /* outside dirty pages, bytes at or past this offset read as zeros */
    unsigned char **page; /* dirty pages by page number (NULL: clean, read the real file) */
    size_t npage;
    struct file *next;
};

enum { UNTRACKED, TFILE, TDIR };
static struct {
    unsigned char kind, append, sync, acc;
    struct file *f;
} fds[MAXFD];
static struct file *files;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static char pfx[PATH_MAX];
static size_t plen;
static const char *logp;

#define DECL(name) static __typeof__(name) *real_##name
DECL(open); DECL(openat); DECL(close); DECL(close_range); DECL(dup); DECL(dup2); DECL(dup3);
DECL(read); DECL(write); DECL(pread); DECL(pwrite); DECL(readv); DECL(writev); DECL(lseek);
DECL(ftruncate); DECL(fsync); DECL(fdatasync); DECL(sync); DECL(syncfs); DECL(fstat);
DECL(stat); DECL(lstat); DECL(fstatat); DECL(rename); DECL(renameat); DECL(renameat2);
DECL(unlink); DECL(unlinkat); DECL(mmap);

static void init(void) {
#define LOAD(name) real_##name = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)
    LOAD(open); LOAD(openat); LOAD(close); LOAD(close_range); LOAD(dup); LOAD(dup2);
    LOAD(dup3); LOAD(read); LOAD(write); LOAD(pread); LOAD(pwrite); LOAD(readv); LOAD(writev);
    LOAD(lseek); LOAD(ftruncate); LOAD(fsync); LOAD(fdatasync); LOAD(sync); LOAD(syncfs);
    LOAD(fstat); LOAD(stat); LOAD(lstat); LOAD(fstatat); LOAD(rename); LOAD(renameat);
    LOAD(renameat2); LOAD(unlink); LOAD(unlinkat); LOAD(mmap);
    const char *p = getenv("LAZYFS_PREFIX");
    if (p && *p == '/' && strlen(p) < sizeof pfx) {
        strcpy(pfx, p);
        plen = strlen(pfx);
        while (plen > 1 && pfx[plen - 1] == '/') pfx[--plen] = '\0';
    }
    logp = getenv("LAZYFS_LOG");
    if (logp && !*logp) logp = NULL;
}

static void lock(void) { pthread_mutex_lock(&mu); }
static void unlock(void) { pthread_mutex_unlock(&mu); }
static void start(void) { pthread_once(&once, init); }

static void atfork_prepare(void) { lock(); }
__attribute__((constructor)) static void setup(void) {
    start();
    pthread_atfork(atfork_prepare, unlock, unlock);
}

static int tracked(int fd) { return fd >= 0 && fd < MAXFD && fds[fd].kind == TFILE; }

static int refuse(const char *what) {
    fprintf(stderr, "lazyfs: %s on a file under %s is not modeled; refused\n", what, pfx);
    errno = ENOTSUP;
    return -1;
}

/* Paths. "Under the prefix": the prefix directory itself (dirs only) or anything inside it. */
static int under(const char *p) {
    return plen && strncmp(p, pfx, plen) == 0 && (p[plen] == '/' || p[plen] == '\0');
}
static int modeled(const char *p) {  /* a file whose data and entry the shim models */
    size_t n = strlen(p);
    return under(p) && p[plen] == '/' && !(n >= 4 && strcmp(p + n - 4, "-shm") == 0);
}
static int fd_path(int fd, char *out) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, PATH_MAX - 1);
    if (n <= 0) return -1;
    out[n] = '\0';
    return 0;
}
/* The canonical path of `path` (relative to dirfd): its directory resolved, then its name. */
static int abs_at(int dirfd, const char *path, char *out) {
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/'), *base = slash ? slash + 1 : path;
    if (!*base || !strcmp(base, ".") || !strcmp(base, "..")) return -1;
    if (slash == path) strcpy(dir, "/");
    else if (slash) snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    else strcpy(dir, ".");
    int d = real_openat(dirfd, dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (d < 0) return -1;
    int r = fd_path(d, dir);
    real_close(d);
    size_t dl = strlen(dir), bl = strlen(base);
    if (r < 0 || dl + bl + 2 > PATH_MAX) return -1;
    memcpy(out, dir, dl);
    if (dl > 1) out[dl++] = '/';
    memcpy(out + dl, base, bl + 1);
    return 0;
}

/* The entry log (see the top): "pid op path path path", one line per change, written before
 * the change is made (a kill between the two leaves nothing undone that happened); "cancel"
 * withdraws the same process's line before it when the change failed. Callers hold the lock. */
static void log_line(const char *a, const char *b, const char *c, const char *d) {
    if (!logp) return;
    char line[4 * PATH_MAX + 32];
    int n = snprintf(line, sizeof line, "%d\t%s\t%s\t%s\t%s\n", (int)getpid(), a, b, c, d);
    int fd = real_open(logp, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    if (n > 0 && (size_t)n < sizeof line) real_write(fd, line, (size_t)n);
    real_close(fd);
}
/* Before a change removes the regular file `path`: a hard link to it, so it can be put back. */
static void keep(const char *path, char *out) {
    static unsigned counter;
    struct stat st;
    out[0] = '\0';
    if (!logp || real_lstat(path, &st) != 0 || !S_ISREG(st.st_mode)) return;
    snprintf(out, PATH_MAX, "%s.keep.%d.%u", logp, (int)getpid(), counter++);
    if (link(path, out) != 0) {
        fprintf(stderr, "lazyfs: cannot keep %s (%s): its removal is not undoable\n", path,
                strerror(errno));
        out[0] = '\0';
    }
}

/* The page cache. */
static struct file *lookup(dev_t dev, ino_t ino) {
    for (struct file *f = files; f; f = f->next)
        if (f->dev == dev && f->ino == ino) return f;
    return NULL;
}
static void forget(struct file *f) {
    for (struct file **p = &files; *p; p = &(*p)->next)
        if (*p == f) { *p = f->next; break; }
    for (size_t i = 0; i < f->npage; i++) free(f->page[i]);
    free(f->page);
    real_close(f->rfd);
    free(f);
}
/* A file nobody holds open is dropped once clean (its page cache is the real file), or once
 * it has no name left (nobody can ever sync it). */
static void maybe_forget(struct file *f) {
    struct stat st;
    if (f->refs == 0 && (!f->dirty || (real_fstat(f->rfd, &st) == 0 && st.st_nlink == 0)))
        forget(f);
}
static void sweep(void) {
    for (struct file *f = files, *next; f; f = next) {
        next = f->next;
        maybe_forget(f);
    }
}

/* Clean bytes [pos, pos+k) of one page: the real file below the floor, zeros above. */
static int clean_read(struct file *f, unsigned char *dst, size_t k, off_t pos) {
    off_t room = f->floor - pos;  /* bytes below the floor from pos */
    size_t below = room <= 0 ? 0 : room < (off_t)k ? (size_t)room : k;
    size_t got = 0;
    while (got < below) {
        ssize_t r = real_pread(f->rfd, dst + got, below - got, pos + (off_t)got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        got += (size_t)r;
    }
    memset(dst + got, 0, k - got);
    return 0;
}
static unsigned char *page_get(struct file *f, size_t pno) {
    if (pno >= f->npage) {
        size_t n = f->npage ? f->npage : 16;
        while (n <= pno) n *= 2;
        unsigned char **p = realloc(f->page, n * sizeof *p);
        if (!p) return NULL;
        memset(p + f->npage, 0, (n - f->npage) * sizeof *p);
        f->page = p;
        f->npage = n;
    }
    if (!f->page[pno]) {
        unsigned char *p = malloc(PG);
        if (!p) return NULL;
        if (clean_read(f, p, PG, (off_t)pno * PG) != 0) { free(p); return NULL; }
        f->page[pno] = p;
    }
    return f->page[pno];
}
static ssize_t ov_read(struct file *f, void *buf, size_t n, off_t off) {
    if (off >= f->size) return 0;
    if ((off_t)n > f->size - off) n = (size_t)(f->size - off);
    for (size_t done = 0, k; done < n; done += k) {
        off_t pos = off + (off_t)done;
        size_t pno = (size_t)(pos / PG), in = (size_t)(pos % PG);
        k = PG - in < n - done ? PG - in : n - done;
        if (pno < f->npage && f->page[pno]) memcpy((char *)buf + done, f->page[pno] + in, k);
        else if (clean_read(f, (unsigned char *)buf + done, k, pos) != 0) return -1;
    }
    return (ssize_t)n;
}
static ssize_t ov_write(struct file *f, const void *buf, size_t n, off_t off) {
    for (size_t done = 0, k; done < n; done += k) {
        off_t pos = off + (off_t)done;
        size_t pno = (size_t)(pos / PG), in = (size_t)(pos % PG);
        k = PG - in < n - done ? PG - in : n - done;
        unsigned char *p = page_get(f, pno);
        if (!p) { errno = ENOMEM; return -1; }
        memcpy(p + in, (const char *)buf + done, k);
    }
    if (off + (off_t)n > f->size) f->size = off + (off_t)n;
    f->dirty = 1;
    return (ssize_t)n;
}
static int ov_truncate(struct file *f, off_t len) {
    if (len < f->size) {
        for (size_t i = (size_t)((len + PG - 1) / PG); i < f->npage; i++) {
            free(f->page[i]);
            f->page[i] = NULL;
        }
        if (len % PG) {
            unsigned char *p = page_get(f, (size_t)(len / PG));
            if (!p) { errno = ENOMEM; return -1; }
            memset(p + len % PG, 0, PG - (size_t)(len % PG));
        }
        if (len < f->floor) f->floor = len;
    }
    f->size = len;
    f->dirty = 1;
    return 0;
}
/* fsync/fdatasync: the page cache goes to the real file, then the real sync. On an error the
 * pages stay dirty and the error is returned. */
static int flush(struct file *f, int data_only) {
    if (f->dirty) {
        struct stat st;
        if (real_fstat(f->rfd, &st) != 0) return -1;
        if (f->floor < st.st_size && real_ftruncate(f->rfd, f->floor) != 0) return -1;
        for (size_t i = 0; i < f->npage; i++) {
            if (!f->page[i]) continue;
            off_t at = (off_t)i * PG;
            size_t len = f->size - at < PG ? (size_t)(f->size - at) : PG;
            for (size_t done = 0; done < len;) {
                ssize_t r = real_pwrite(f->rfd, f->page[i] + done, len - done, at + (off_t)done);
                if (r < 0 && errno == EINTR) continue;
                if (r <= 0) return -1;
                done += (size_t)r;
            }
        }
        if (real_fstat(f->rfd, &st) != 0) return -1;
        if (st.st_size != f->size && real_ftruncate(f->rfd, f->size) != 0) return -1;
        for (size_t i = 0; i < f->npage; i++) {
            free(f->page[i]);
            f->page[i] = NULL;
        }
        f->floor = f->size;
        f->dirty = 0;
    }
    return data_only ? real_fdatasync(f->rfd) : real_fsync(f->rfd);
}

/* Descriptors. */
static void untrack(int fd) {  /* under the lock */
    if (fd < 0 || fd >= MAXFD || fds[fd].kind == UNTRACKED) return;
    struct file *f = fds[fd].f;
    memset(&fds[fd], 0, sizeof fds[fd]);
    if (f) {
        f->refs--;
        maybe_forget(f);
    }
}
/* After an open: track the descriptor if its file is under the prefix. */
static void adopt(int fd, int flags) {
    char path[PATH_MAX];
    struct stat st;
    if (fd >= 0 && fd < MAXFD && fds[fd].kind != UNTRACKED) {  /* closed behind our back */
        lock();
        untrack(fd);
        unlock();
    }
    if (fd < 0 || !plen || fd_path(fd, path) != 0 || !under(path) || real_fstat(fd, &st) != 0)
        return;
    if (fd >= MAXFD) {
        fprintf(stderr, "lazyfs: descriptor %d past %d: %s not modeled\n", fd, MAXFD, path);
        return;
    }
    lock();
    if (S_ISDIR(st.st_mode)) {
        fds[fd].kind = TDIR;
    } else if (S_ISREG(st.st_mode) && modeled(path)) {
        struct file *f = lookup(st.st_dev, st.st_ino);
        if (!f && (f = calloc(1, sizeof *f))) {
            char link[64];
            snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
            f->rfd = real_open(link, O_RDWR | O_CLOEXEC);
            if (f->rfd < 0) {
                fprintf(stderr, "lazyfs: cannot reopen %s read-write: not modeled\n", path);
                free(f);
                f = NULL;
            } else {
                f->dev = st.st_dev;
                f->ino = st.st_ino;
                f->size = f->floor = st.st_size;
                f->next = files;
                files = f;
            }
        }
        if (f) {
            f->refs++;
            fds[fd].kind = TFILE;
            fds[fd].f = f;
            fds[fd].acc = (unsigned char)(flags & O_ACCMODE);
            fds[fd].append = (flags & O_APPEND) != 0;
            fds[fd].sync = (flags & (O_SYNC | O_DSYNC)) != 0;
        }
    }
    unlock();
}

static int do_open(int dirfd, const char *path, int flags, mode_t mode) {
    start();
    if (!plen || (flags & O_PATH)) return real_openat(dirfd, path, flags, mode);
    char abs[PATH_MAX];
    struct stat st;
    int creating = (flags & O_CREAT) && !(flags & O_TMPFILE) &&
                   real_fstatat(dirfd, path, &st, AT_SYMLINK_NOFOLLOW) != 0 &&
                   abs_at(dirfd, path, abs) == 0 && modeled(abs);
    int trunc = (flags & O_TRUNC) && (flags & O_ACCMODE) != O_RDONLY;
    if (creating) {
        lock();
        log_line("create", abs, "", "");
    }
    int fd = real_openat(dirfd, path, flags & ~(trunc ? O_TRUNC : 0), mode);
    int e = errno;
    if (creating) {
        if (fd < 0) log_line("cancel", "", "", "");
        unlock();
    }
    if (fd < 0) {
        errno = e;
        return fd;
    }
    adopt(fd, flags);
    if (trunc) {
        if (tracked(fd)) {
            lock();
            ov_truncate(fds[fd].f, 0);
            unlock();
        } else {
            real_ftruncate(fd, 0);  /* what O_TRUNC would have done */
        }
    }
    return fd;
}
static mode_t mode_arg(int flags, va_list ap) {
    return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}
int open(const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t m = mode_arg(flags, ap);
    va_end(ap);
    return do_open(AT_FDCWD, path, flags, m);
}
int open64(const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t m = mode_arg(flags, ap);
    va_end(ap);
    return do_open(AT_FDCWD, path, flags, m);
}
int openat(int dirfd, const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t m = mode_arg(flags, ap);
    va_end(ap);
    return do_open(dirfd, path, flags, m);
}
int openat64(int dirfd, const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t m = mode_arg(flags, ap);
    va_end(ap);
    return do_open(dirfd, path, flags, m);
}
int __open_2(const char *path, int flags) { return do_open(AT_FDCWD, path, flags, 0); }
int __open64_2(const char *path, int flags) { return do_open(AT_FDCWD, path, flags, 0); }
int __openat_2(int d, const char *path, int flags) { return do_open(d, path, flags, 0); }
int __openat64_2(int d, const char *path, int flags) { return do_open(d, path, flags, 0); }
#define CREAT (O_CREAT | O_WRONLY | O_TRUNC)
int creat(const char *path, mode_t m) { return do_open(AT_FDCWD, path, CREAT, m); }
int creat64(const char *path, mode_t m) { return do_open(AT_FDCWD, path, CREAT, m); }

int close(int fd) {
    start();
    if (fd < 0 || fd >= MAXFD || fds[fd].kind == UNTRACKED) return real_close(fd);
    lock();
    untrack(fd);
    int r = real_close(fd);
    unlock();
    return r;
}
int close_range(unsigned first, unsigned last, int flags) {
    start();
    if (!(flags & CLOSE_RANGE_CLOEXEC)) {
        lock();
        for (unsigned fd = first; fd <= last && fd < MAXFD; fd++) untrack((int)fd);
        unlock();
    }
    if (!real_close_range) { errno = ENOSYS; return -1; }
    return real_close_range(first, last, flags);
}
static int copied(int from, int to) {  /* dup, dup2, dup3: the copy shares the file */
    if (to < 0 || to >= MAXFD || from < 0 || from >= MAXFD || from == to) return to;
    lock();
    untrack(to);
    if (fds[from].kind != UNTRACKED) {
        fds[to] = fds[from];
        if (fds[to].f) fds[to].f->refs++;
    }
    unlock();
    return to;
}
int dup(int fd) { start(); return copied(fd, real_dup(fd)); }
int dup2(int fd, int to) { start(); return copied(fd, real_dup2(fd, to)); }
int dup3(int fd, int to, int flags) { start(); return copied(fd, real_dup3(fd, to, flags)); }

/* Data. */
#define FILE_OR_REAL(fd, call) \
    start();                   \
    if (!tracked(fd)) return call
static ssize_t rw(int fd, void *buf, size_t n, off_t off, int writing, int positioned) {
    struct file *f = fds[fd].f;
    int acc = fds[fd].acc;
    if (writing ? acc == O_RDONLY : acc == O_WRONLY) { errno = EBADF; return -1; }
    lock();
    if (!positioned) off = fds[fd].append && writing ? f->size : real_lseek(fd, 0, SEEK_CUR);
    else if (writing && fds[fd].append) off = f->size;  /* Linux: pwrite on O_APPEND appends */
    ssize_t r = off < 0 ? -1 : writing ? ov_write(f, buf, n, off) : ov_read(f, buf, n, off);
    if (r >= 0 && !positioned) real_lseek(fd, off + r, SEEK_SET);
    if (r >= 0 && writing && fds[fd].sync && flush(f, 1) != 0) r = -1;
    unlock();
    return r;
}
/* The data calls: the real call for any other descriptor, the page cache for a tracked one. */
#define DATA(decl, call, ...)               \
    decl {                                  \
        start();                            \
        if (!tracked(fd)) return call;      \
        return rw(fd, __VA_ARGS__);         \
    }
DATA(ssize_t read(int fd, void *buf, size_t n), real_read(fd, buf, n), buf, n, 0, 0, 0)
DATA(ssize_t write(int fd, const void *buf, size_t n), real_write(fd, buf, n),
     (void *)buf, n, 0, 1, 0)
DATA(ssize_t pread(int fd, void *buf, size_t n, off_t off), real_pread(fd, buf, n, off),
     buf, n, off, 0, 1)
DATA(ssize_t pread64(int fd, void *buf, size_t n, off_t off), real_pread(fd, buf, n, off),
     buf, n, off, 0, 1)
DATA(ssize_t pwrite(int fd, const void *buf, size_t n, off_t off), real_pwrite(fd, buf, n, off),
     (void *)buf, n, off, 1, 1)
DATA(ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off),
     real_pwrite(fd, buf, n, off), (void *)buf, n, off, 1, 1)
static ssize_t rwv(int fd, const struct iovec *iov, int cnt, int writing) {
    ssize_t total = 0;
    for (int i = 0; i < cnt; i++) {
        ssize_t r = rw(fd, iov[i].iov_base, iov[i].iov_len, 0, writing, 0);
        if (r < 0) return total ? total : -1;
        total += r;
        if ((size_t)r < iov[i].iov_len) break;
    }
    return total;
}
ssize_t readv(int fd, const struct iovec *iov, int cnt) {
    FILE_OR_REAL(fd, real_readv(fd, iov, cnt));
    return rwv(fd, iov, cnt, 0);
}
ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    FILE_OR_REAL(fd, real_writev(fd, iov, cnt));
    return rwv(fd, iov, cnt, 1);
}

off_t lseek(int fd, off_t off, int whence) {
    FILE_OR_REAL(fd, real_lseek(fd, off, whence));
    if (whence != SEEK_END) return real_lseek(fd, off, whence);
    lock();
    off_t r = real_lseek(fd, fds[fd].f->size + off, SEEK_SET);
    unlock();
    return r;
}
off_t lseek64(int fd, off_t off, int whence) { return lseek(fd, off, whence); }

int ftruncate(int fd, off_t len) {
    FILE_OR_REAL(fd, real_ftruncate(fd, len));
    if (len < 0) { errno = EINVAL; return -1; }
    if (fds[fd].acc == O_RDONLY) { errno = EINVAL; return -1; }
    lock();
    int r = ov_truncate(fds[fd].f, len);
    unlock();
    return r;
}
int ftruncate64(int fd, off_t len) { return ftruncate(fd, len); }

/* Syncs. A directory's sync makes its entry changes durable (logged for tests/faultfs.py). */
static int do_sync(int fd, int data_only) {
    start();
    if (fd >= 0 && fd < MAXFD && fds[fd].kind == TDIR) {
        int r = data_only ? real_fdatasync(fd) : real_fsync(fd);
        char path[PATH_MAX];
        if (r == 0 && fd_path(fd, path) == 0) {
            lock();
            log_line("sync", path, "", "");
            unlock();
        }
        return r;
    }
    if (!tracked(fd)) return data_only ? real_fdatasync(fd) : real_fsync(fd);
    lock();
    int r = flush(fds[fd].f, data_only);
    unlock();
    return r;
}
int fsync(int fd) { return do_sync(fd, 0); }
int fdatasync(int fd) { return do_sync(fd, 1); }
static void flush_all(void) {  /* every page cache, then (after the real sync) every entry */
    lock();
    for (struct file *f = files; f; f = f->next) flush(f, 0);
    unlock();
}
static void synced_all(void) {
    lock();
    log_line("syncall", "", "", "");
    unlock();
}
void sync(void) { start(); flush_all(); real_sync(); synced_all(); }
int syncfs(int fd) {
    start();
    flush_all();
    int r = real_syncfs(fd);
    if (r == 0) synced_all();
    return r;
}

/* Sizes: every stat of an inode with a page cache shows the size the process sees. */
static void patch(struct stat *st) {
    if (!files || !S_ISREG(st->st_mode)) return;
    lock();
    struct file *f = lookup(st->st_dev, st->st_ino);
    if (f) {
        st->st_size = f->size;
        st->st_blocks = (f->size + 511) / 512;
    }
    unlock();
}
#define PATCHED(call, st)   \
    start();                \
    int r = call;           \
    if (r == 0) patch((struct stat *)(st)); \
    return r
int fstat(int fd, struct stat *st) { PATCHED(real_fstat(fd, st), st); }
int fstat64(int fd, struct stat64 *st) { PATCHED(real_fstat(fd, (struct stat *)st), st); }
int stat(const char *p, struct stat *st) { PATCHED(real_stat(p, st), st); }
int stat64(const char *p, struct stat64 *st) { PATCHED(real_stat(p, (struct stat *)st), st); }
int lstat(const char *p, struct stat *st) { PATCHED(real_lstat(p, st), st); }
int lstat64(const char *p, struct stat64 *st) { PATCHED(real_lstat(p, (struct stat *)st), st); }
int fstatat(int d, const char *p, struct stat *st, int fl) {
    PATCHED(real_fstatat(d, p, st, fl), st);
}
int fstatat64(int d, const char *p, struct stat64 *st, int fl) {
    PATCHED(real_fstatat(d, p, (struct stat *)st, fl), st);
}

/* Entries: logged before the change (with a link to what it removes), cancelled if it failed. */
static int do_rename(int od, const char *o, int nd, const char *n, unsigned flags) {
    start();
    char ao[PATH_MAX], an[PATH_MAX], kept[PATH_MAX] = "";
    int logged = logp && !(flags & RENAME_EXCHANGE) && abs_at(od, o, ao) == 0 &&
                 abs_at(nd, n, an) == 0 && (modeled(ao) || modeled(an));
    lock();
    if (logged) {
        keep(an, kept);
        log_line("rename", ao, an, kept);
    }
    int r = real_renameat2(od, o, nd, n, flags);
    int e = errno;
    if (r != 0 && logged) {
        log_line("cancel", "", "", "");
        if (kept[0]) real_unlink(kept);
    }
    sweep();
    unlock();
    errno = e;
    return r;
}
int rename(const char *o, const char *n) { return do_rename(AT_FDCWD, o, AT_FDCWD, n, 0); }
int renameat(int od, const char *o, int nd, const char *n) { return do_rename(od, o, nd, n, 0); }
int renameat2(int od, const char *o, int nd, const char *n, unsigned fl) {
    return do_rename(od, o, nd, n, fl);
}

static int do_unlink(int d, const char *p, int flags) {
    start();
    char ap[PATH_MAX], kept[PATH_MAX] = "";
    int logged = logp && !(flags & AT_REMOVEDIR) && abs_at(d, p, ap) == 0 && modeled(ap);
    lock();
    if (logged) {
        keep(ap, kept);
        log_line("unlink", ap, kept, "");
    }
    int r = real_unlinkat(d, p, flags);
    int e = errno;
    if (r != 0 && logged) {
        log_line("cancel", "", "", "");
        if (kept[0]) real_unlink(kept);
    }
    sweep();
    unlock();
    errno = e;
    return r;
}
int unlink(const char *p) { return do_unlink(AT_FDCWD, p, 0); }
int unlinkat(int d, const char *p, int flags) { return do_unlink(d, p, flags); }

/* What would bypass the page cache: refused on a tracked file. */
void *mmap(void *a, size_t n, int prot, int flags, int fd, off_t off) {
    start();
    if (tracked(fd)) { refuse("mmap"); return MAP_FAILED; }
    return real_mmap(a, n, prot, flags, fd, off);
}
void *mmap64(void *a, size_t n, int prot, int flags, int fd, off_t off) {
    return mmap(a, n, prot, flags, fd, off);
}
#define REFUSED(decl, name, fd, ...)                                              \
    decl {                                                                         \
        start();                                                                   \
        if (tracked(fd)) return refuse(#name);                                     \
        static __typeof__(name) *next;                                             \
        if (!next) next = (__typeof__(name) *)dlsym(RTLD_NEXT, #name);             \
        return next(__VA_ARGS__);                                                  \
    }
REFUSED(int fallocate(int fd, int m, off_t o, off_t n), fallocate, fd, fd, m, o, n)
REFUSED(int fallocate64(int fd, int m, off_t o, off_t n), fallocate64, fd, fd, m, o, n)
REFUSED(int posix_fallocate(int fd, off_t o, off_t n), posix_fallocate, fd, fd, o, n)
REFUSED(int posix_fallocate64(int fd, off_t o, off_t n), posix_fallocate64, fd, fd, o, n)
REFUSED(ssize_t preadv(int fd, const struct iovec *v, int c, off_t o), preadv, fd, fd, v, c, o)
REFUSED(ssize_t pwritev(int fd, const struct iovec *v, int c, off_t o), pwritev, fd, fd, v, c, o)
REFUSED(ssize_t preadv64(int fd, const struct iovec *v, int c, off_t o), preadv64, fd, fd, v, c, o)
REFUSED(ssize_t pwritev64(int fd, const struct iovec *v, int c, off_t o), pwritev64,
        fd, fd, v, c, o)
REFUSED(ssize_t preadv2(int fd, const struct iovec *v, int c, off_t o, int fl), preadv2,
        fd, fd, v, c, o, fl)
REFUSED(ssize_t pwritev2(int fd, const struct iovec *v, int c, off_t o, int fl), pwritev2,
        fd, fd, v, c, o, fl)
REFUSED(ssize_t sendfile(int out, int in, off_t *o, size_t n), sendfile,
        (tracked(in) ? in : out), out, in, o, n)
REFUSED(ssize_t copy_file_range(int in, off_t *io, int out, off_t *oo, size_t n, unsigned fl),
        copy_file_range, (tracked(in) ? in : out), in, io, out, oo, n, fl)
