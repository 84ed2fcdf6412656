#define _GNU_SOURCE
#include "cshim.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#ifdef __linux__
#include <linux/fs.h>
#endif
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/random.h>
#include <linux/falloc.h>
#include <sys/syscall.h>

int dr_block_device_size(int fd, uint64_t *size) {
#ifdef BLKGETSIZE64
  return ioctl(fd, BLKGETSIZE64, size);
#else
  (void)fd; (void)size;
  errno = ENOTSUP;
  return -1;
#endif
}

int dr_block_device_sector_size(int fd, uint32_t *size) {
#ifdef BLKSSZGET
  int s = 0;
  int rc = ioctl(fd, BLKSSZGET, &s);
  if (rc == 0) *size = (uint32_t)s;
  return rc;
#else
  (void)fd; (void)size;
  errno = ENOTSUP;
  return -1;
#endif
}

int dr_open(const char *path, int flags, mode_t mode) {
  return open(path, flags, mode);
}

#ifdef O_DIRECT
const int dr_O_DIRECT = O_DIRECT;
#else
const int dr_O_DIRECT = 0;
#endif
const int dr_O_CLOEXEC = O_CLOEXEC;
const int dr_SEEK_DATA = SEEK_DATA;
const int dr_SEEK_HOLE = SEEK_HOLE;

int dr_mkostemp(char *template_, int flags) { return mkostemp(template_, flags); }

long dr_getrandom(void *buffer, unsigned long length) { return getrandom(buffer, length, 0); }

/* CRC-32C, reflected polynomial 0x82F63B78. */
static uint32_t crc32c_table[8][256];

/* Built before main, so no thread ever sees a half-built table. */
__attribute__((constructor)) static void crc32c_init(void) {
  for (uint32_t n = 0; n < 256; n++) {
    uint32_t c = n;
    for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    crc32c_table[0][n] = c;
  }
  for (uint32_t n = 0; n < 256; n++) {
    uint32_t c = crc32c_table[0][n];
    for (int t = 1; t < 8; t++) {
      c = crc32c_table[0][c & 0xFF] ^ (c >> 8);
      crc32c_table[t][n] = c;
    }
  }
}

static uint32_t crc32c_software(uint32_t crc, const unsigned char *p, size_t n) {
  while (n >= 8) {
    uint64_t w;
    __builtin_memcpy(&w, p, 8);
    w ^= crc;
    crc = crc32c_table[7][w & 0xFF] ^ crc32c_table[6][(w >> 8) & 0xFF] ^
          crc32c_table[5][(w >> 16) & 0xFF] ^ crc32c_table[4][(w >> 24) & 0xFF] ^
          crc32c_table[3][(w >> 32) & 0xFF] ^ crc32c_table[2][(w >> 40) & 0xFF] ^
          crc32c_table[1][(w >> 48) & 0xFF] ^ crc32c_table[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) crc = crc32c_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t crc32c_hardware(uint32_t crc, const unsigned char *p, size_t n) {
  uint64_t c = crc;
  while (n >= 8) {
    uint64_t w;
    __builtin_memcpy(&w, p, 8);
    c = __builtin_ia32_crc32di(c, w);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = (uint32_t)c;
  while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
  return c32;
}
#endif

uint32_t dr_crc32c(uint32_t crc, const void *data, size_t length) {
  crc = ~crc;
#if defined(__x86_64__)
  if (__builtin_cpu_supports("sse4.2")) return ~crc32c_hardware(crc, data, length);
#endif
  return ~crc32c_software(crc, data, length);
}

int dr_punch_hole(int fd, uint64_t offset, uint64_t length) {
  return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

int dr_allocate(int fd, uint64_t offset, uint64_t length) {
  return fallocate(fd, 0, (off_t)offset, (off_t)length);
}

int dr_block_zero_out(int fd, uint64_t offset, uint64_t length) {
#ifdef BLKZEROOUT
  uint64_t range[2] = {offset, length};
  return ioctl(fd, BLKZEROOUT, range);
#else
  (void)fd; (void)offset; (void)length;
  errno = ENOTSUP;
  return -1;
#endif
}

int dr_start_writeback(int fd, uint64_t offset, uint64_t length) {
  return sync_file_range(fd, (off64_t)offset, (off64_t)length, SYNC_FILE_RANGE_WRITE);
}

// Older headers lack it; the number is the same on x86-64 and arm64.
#if !defined(__NR_cachestat) && (defined(__x86_64__) || defined(__aarch64__))
#define __NR_cachestat 451
#endif

struct dr_cachestat {
  uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

static int dr_cachestat(int fd, uint64_t offset, uint64_t length, struct dr_cachestat *stat) {
#ifdef __NR_cachestat
  struct { uint64_t off, len; } range = {offset, length};
  return (int)syscall(__NR_cachestat, fd, &range, stat, 0);
#else
  (void)fd; (void)offset; (void)length; (void)stat;
  errno = ENOSYS;
  return -1;
#endif
}

long dr_unwritten_pages(int fd) {
  struct dr_cachestat stat;
  if (dr_cachestat(fd, 0, 0, &stat) != 0) return -1;
  return (long)(stat.nr_dirty + stat.nr_writeback);
}

long dr_cached_pages(int fd, uint64_t offset, uint64_t length) {
  struct dr_cachestat stat;
  if (dr_cachestat(fd, offset, length, &stat) != 0) return -1;
  return (long)stat.nr_cache;
}

long dr_pipe(int fds[2], long size) {
  if (pipe2(fds, O_CLOEXEC) != 0) return -1;
  // Larger pipes may be refused (fs.pipe-max-size, per-user limits): keep
  // whatever capacity there is.
  (void)fcntl(fds[1], F_SETPIPE_SZ, (int)size);
  long capacity = fcntl(fds[1], F_GETPIPE_SZ);
  if (capacity <= 0) {
    int e = errno;
    close(fds[0]);
    close(fds[1]);
    errno = e;
    return -1;
  }
  return capacity;
}

long dr_splice_in(int from, int pipe_in, unsigned long length, int wait) {
  return (long)splice(from, NULL, pipe_in, NULL, length, SPLICE_F_MOVE | (wait ? 0 : SPLICE_F_NONBLOCK));
}

long dr_splice_out(int pipe_out, int to, uint64_t offset, unsigned long length) {
  loff_t position = (loff_t)offset;
  return (long)splice(pipe_out, NULL, to, &position, length, SPLICE_F_MOVE);
}
