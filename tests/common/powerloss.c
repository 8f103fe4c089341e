/* A power-loss simulator, preloaded (LD_PRELOAD) into a process whose files under a root
 * directory should lose, at a "power cut", every write that no fsync made durable.
 *
 * The process's writes go to its files as usual (so it reads what it wrote). Before each write
 * to a regular file under $POWERLOSS_ROOT, the bytes it overwrites and the file's size are
 * appended to an undo journal ($POWERLOSS_JOURNAL); an fsync or fdatasync of the file records
 * that everything before it is durable. The cut is made by the test: it kills the process with
 * SIGKILL, then undoes, newest first, every write recorded since each file's last sync (see
 * `power_cut` in tests/kill_loop.rs), leaving each file as the disk held it at its last sync.
 *
 * Files are known by device and inode, so that renames keep their history. What is not
 * simulated: directory entries (a create, rename or unlink is kept whether or not its directory
 * was synced), and writes through mmap (SQLite's -shm index, which it rebuilds).
 *
 * Journal record: struct rec, then `len` bytes of what the write overwrote. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum { UNDO = 1, SYNC = 2, NEW = 3, SYNC_ALL = 4 };

struct rec {
    uint32_t magic;
    uint32_t kind;
    uint64_t dev;
    uint64_t ino;
    int64_t offset;
    int64_t old_size;
    uint64_t len;
};

#define MAGIC 0x504c4f53u /* "PLOS" */
#define FDS 65536

static char root[PATH_MAX];
static size_t root_len;
static int journal = -1;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
/* Per descriptor: 0 not looked at yet, 1 not ours, 2 ours (a regular file under the root). */
static unsigned char state[FDS];
static dev_t fd_dev[FDS];
static ino_t fd_ino[FDS];

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_fallocate64)(int, int, off_t, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_syncfs)(int);
static void (*real_sync)(void);
static int (*real_close)(int);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static ssize_t (*real_copy_file_range)(int, off_t *, int, off_t *, size_t, unsigned);

#define REAL(name, sym) (name = dlsym(RTLD_NEXT, sym))

__attribute__((constructor)) static void init(void) {
    REAL(real_write, "write");
    REAL(real_pwrite64, "pwrite64");
    REAL(real_writev, "writev");
    REAL(real_pwritev64, "pwritev64");
    REAL(real_ftruncate64, "ftruncate64");
    REAL(real_fallocate64, "fallocate64");
    REAL(real_fsync, "fsync");
    REAL(real_fdatasync, "fdatasync");
    REAL(real_syncfs, "syncfs");
    REAL(real_sync, "sync");
    REAL(real_close, "close");
    REAL(real_open64, "open64");
    REAL(real_openat64, "openat64");
    REAL(real_copy_file_range, "copy_file_range");
    const char *r = getenv("POWERLOSS_ROOT");
    const char *j = getenv("POWERLOSS_JOURNAL");
    if (!r || !j || !realpath(r, root)) return;
    root_len = strlen(root);
    journal = real_open64(j, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
}

static void fail(const char *what) {
    /* The simulation cannot keep its promise: stop loudly rather than mislead the test. */
    char msg[256];
    int n = snprintf(msg, sizeof msg, "powerloss: %s: %s\n", what, strerror(errno));
    real_write(2, msg, n);
    abort();
}

static void append(const struct rec *r, const void *data) {
    struct iovec v[2] = {{(void *)r, sizeof *r}, {(void *)data, r->len}};
    size_t want = sizeof *r + r->len;
    if (real_writev(journal, v, data ? 2 : 1) != (ssize_t)want) fail("journal write");
}

static int under_root(const char *path) {
    return strncmp(path, root, root_len) == 0 && (path[root_len] == '/' || !path[root_len]);
}

/* Whether `fd` is a regular file under the root; if so, its device and inode. */
static int ours(int fd, dev_t *dev, ino_t *ino) {
    if (journal < 0 || fd < 0) return 0;
    if (fd < FDS && state[fd]) {
        *dev = fd_dev[fd];
        *ino = fd_ino[fd];
        return state[fd] == 2;
    }
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    struct stat st;
    int yes = 0;
    if (n > 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
        path[n] = 0;
        yes = under_root(path);
        *dev = st.st_dev;
        *ino = st.st_ino;
    }
    if (fd < FDS) {
        state[fd] = yes ? 2 : 1;
        fd_dev[fd] = *dev;
        fd_ino[fd] = *ino;
    }
    return yes;
}

/* Records what writing `len` bytes at `offset` of `fd` (ours) will overwrite. Holds `mu`. */
static void save(int fd, dev_t dev, ino_t ino, off_t offset, off_t len) {
    struct stat st;
    if (fstat(fd, &st) != 0) fail("fstat");
    struct rec r = {MAGIC, UNDO, dev, ino, offset, st.st_size, 0};
    off_t end = offset + len < st.st_size ? offset + len : st.st_size;
    char *old = NULL;
    if (end > offset) {
        r.len = end - offset;
        old = malloc(r.len);
        if (!old || pread(fd, old, r.len, offset) != (ssize_t)r.len) fail("reading the old bytes");
    }
    append(&r, old);
    free(old);
}

static void mark(int kind, dev_t dev, ino_t ino) {
    struct rec r = {MAGIC, kind, dev, ino, 0, 0, 0};
    append(&r, NULL);
}

/* The offset a non-positional write to `fd` writes at. */
static off_t position(int fd) {
    if (fcntl(fd, F_GETFL) & O_APPEND) {
        struct stat st;
        return fstat(fd, &st) == 0 ? st.st_size : 0;
    }
    return lseek(fd, 0, SEEK_CUR);
}

static size_t total(const struct iovec *v, int n) {
    size_t t = 0;
    for (int i = 0; i < n; i++) t += v[i].iov_len;
    return t;
}

#define GUARDED(fd, offset, len, call)                     \
    do {                                                   \
        dev_t dev;                                         \
        ino_t ino;                                         \
        if (!ours(fd, &dev, &ino)) return call;            \
        pthread_mutex_lock(&mu);                           \
        save(fd, dev, ino, offset, len);                   \
        __typeof__(call) result = call;                    \
        pthread_mutex_unlock(&mu);                         \
        return result;                                     \
    } while (0)

ssize_t write(int fd, const void *buf, size_t n) {
    GUARDED(fd, position(fd), n, real_write(fd, buf, n));
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t o) {
    GUARDED(fd, o, n, real_pwrite64(fd, buf, n, o));
}
ssize_t pwrite(int fd, const void *buf, size_t n, off_t o) { return pwrite64(fd, buf, n, o); }
ssize_t writev(int fd, const struct iovec *v, int c) {
    GUARDED(fd, position(fd), total(v, c), real_writev(fd, v, c));
}
ssize_t pwritev64(int fd, const struct iovec *v, int c, off_t o) {
    GUARDED(fd, o, total(v, c), real_pwritev64(fd, v, c, o));
}
ssize_t pwritev(int fd, const struct iovec *v, int c, off_t o) { return pwritev64(fd, v, c, o); }
int ftruncate64(int fd, off_t len) { GUARDED(fd, len, INT64_MAX / 2, real_ftruncate64(fd, len)); }
int ftruncate(int fd, off_t len) { return ftruncate64(fd, len); }
int fallocate64(int fd, int mode, off_t o, off_t len) {
    GUARDED(fd, o, len, real_fallocate64(fd, mode, o, len));
}
int fallocate(int fd, int mode, off_t o, off_t len) { return fallocate64(fd, mode, o, len); }
ssize_t copy_file_range(int in, off_t *in_off, int out, off_t *out_off, size_t n, unsigned f) {
    GUARDED(out, out_off ? *out_off : position(out), n,
            real_copy_file_range(in, in_off, out, out_off, n, f));
}

static int synced(int fd, int result) {
    dev_t dev;
    ino_t ino;
    if (result == 0 && ours(fd, &dev, &ino)) {
        pthread_mutex_lock(&mu);
        mark(SYNC, dev, ino);
        pthread_mutex_unlock(&mu);
    }
    return result;
}
int fsync(int fd) { return synced(fd, real_fsync(fd)); }
int fdatasync(int fd) { return synced(fd, real_fdatasync(fd)); }
static void synced_all(void) {
    if (journal < 0) return;
    pthread_mutex_lock(&mu);
    mark(SYNC_ALL, 0, 0);
    pthread_mutex_unlock(&mu);
}
int syncfs(int fd) {
    int result = real_syncfs(fd);
    if (result == 0) synced_all();
    return result;
}
void sync(void) {
    real_sync();
    synced_all();
}

int close(int fd) {
    if (fd >= 0 && fd < FDS) state[fd] = 0;
    return real_close(fd);
}

/* An open of `path` (relative to `dirfd`) with `flags`: records a truncation of what is there,
 * and a new file's history starting empty. */
static int opened(int dirfd, const char *path, int flags, mode_t mode) {
    char full[2 * PATH_MAX + 2];
    int mine = 0, existed = 1;
    if (journal >= 0 && (flags & (O_CREAT | O_TRUNC))) {
        if (path[0] == '/' || dirfd == AT_FDCWD) {
            if (path[0] == '/') snprintf(full, sizeof full, "%s", path);
            else {
                char cwd[PATH_MAX];
                if (!getcwd(cwd, sizeof cwd)) cwd[0] = 0;
                snprintf(full, sizeof full, "%s/%s", cwd, path);
            }
        } else {
            char link[64], dir[PATH_MAX];
            snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
            ssize_t n = readlink(link, dir, sizeof dir - 1);
            dir[n > 0 ? n : 0] = 0;
            snprintf(full, sizeof full, "%s/%s", dir, path);
        }
        mine = under_root(full);
        struct stat st;
        existed = stat(full, &st) == 0;
    }
    if (mine) pthread_mutex_lock(&mu);
    if (mine && existed && (flags & O_TRUNC)) {
        /* Save the whole file before the open truncates it. */
        int old = real_open64(full, O_RDONLY | O_CLOEXEC);
        dev_t dev;
        ino_t ino;
        if (old >= 0 && ours(old, &dev, &ino)) save(old, dev, ino, 0, INT64_MAX / 2);
        if (old >= 0) close(old);
    }
    int fd = real_openat64(dirfd, path, flags, mode);
    if (fd >= 0 && fd < FDS) state[fd] = 0;
    dev_t dev;
    ino_t ino;
    if (mine && fd >= 0 && !existed && ours(fd, &dev, &ino)) mark(NEW, dev, ino);
    if (mine) pthread_mutex_unlock(&mu);
    return fd;
}

#define MODE(flags) \
    ({ mode_t m = 0; if ((flags) & (O_CREAT | O_TMPFILE)) { va_list a; va_start(a, flags); m = va_arg(a, int); va_end(a); } m; })

int open(const char *p, int flags, ...) { return opened(AT_FDCWD, p, flags, MODE(flags)); }
int open64(const char *p, int flags, ...) { return opened(AT_FDCWD, p, flags, MODE(flags)); }
int openat(int d, const char *p, int flags, ...) { return opened(d, p, flags, MODE(flags)); }
int openat64(int d, const char *p, int flags, ...) { return opened(d, p, flags, MODE(flags)); }
int __open_2(const char *p, int flags) { return opened(AT_FDCWD, p, flags, 0); }
int __open64_2(const char *p, int flags) { return opened(AT_FDCWD, p, flags, 0); }
int creat(const char *p, mode_t m) { return opened(AT_FDCWD, p, O_CREAT | O_WRONLY | O_TRUNC, m); }
int creat64(const char *p, mode_t m) { return creat(p, m); }
