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
/* The crc32 instruction takes 3 cycles and one more can start every cycle,
 * so three independent runs of the same length go three times as fast as
 * one; their CRCs are then joined by shifting the first over the bytes of
 * the next (multiplying by x^(8n) modulo the polynomial, by tables made at
 * start: four of 256 entries per length). As in Mark Adler's crc32c.c. */
#define CRC32C_LONG 8192
#define CRC32C_SHORT 256
static uint32_t crc32c_long[4][256];
static uint32_t crc32c_short[4][256];

static uint32_t gf2_matrix_times(const uint32_t *mat, uint32_t vec) {
  uint32_t sum = 0;
  while (vec) {
    if (vec & 1) sum ^= *mat;
    vec >>= 1;
    mat++;
  }
  return sum;
}

static void gf2_matrix_square(uint32_t *square, const uint32_t *mat) {
  for (int n = 0; n < 32; n++) square[n] = gf2_matrix_times(mat, mat[n]);
}

/* The operator that feeds `length` zero bytes (a power of two) to a CRC register. */
static void crc32c_zeros_op(uint32_t *even, size_t length) {
  uint32_t odd[32];
  odd[0] = 0x82F63B78u; /* one zero bit */
  uint32_t row = 1;
  for (int n = 1; n < 32; n++) {
    odd[n] = row;
    row <<= 1;
  }
  gf2_matrix_square(even, odd); /* two zero bits */
  gf2_matrix_square(odd, even); /* four zero bits */
  /* Each squaring doubles the zeros: eight bits (one byte) first. */
  do {
    gf2_matrix_square(even, odd);
    length >>= 1;
    if (length == 0) return;
    gf2_matrix_square(odd, even);
    length >>= 1;
  } while (length);
  for (int n = 0; n < 32; n++) even[n] = odd[n];
}

static void crc32c_zeros(uint32_t zeros[][256], size_t length) {
  uint32_t op[32];
  crc32c_zeros_op(op, length);
  for (uint32_t n = 0; n < 256; n++) {
    zeros[0][n] = gf2_matrix_times(op, n);
    zeros[1][n] = gf2_matrix_times(op, n << 8);
    zeros[2][n] = gf2_matrix_times(op, n << 16);
    zeros[3][n] = gf2_matrix_times(op, n << 24);
  }
}

__attribute__((constructor)) static void crc32c_shift_init(void) {
  crc32c_zeros(crc32c_long, CRC32C_LONG);
  crc32c_zeros(crc32c_short, CRC32C_SHORT);
}

static inline uint32_t crc32c_shift(uint32_t zeros[][256], uint32_t crc) {
  return zeros[0][crc & 0xFF] ^ zeros[1][(crc >> 8) & 0xFF] ^ zeros[2][(crc >> 16) & 0xFF] ^ zeros[3][crc >> 24];
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hardware(uint32_t crc, const unsigned char *p, size_t n) {
  uint64_t c0 = crc;
  while (n > 0 && ((uintptr_t)p & 7) != 0) {
    c0 = __builtin_ia32_crc32qi((uint32_t)c0, *p++);
    n--;
  }
  /* Three runs at a time, long ones then short ones. */
  const size_t runs[2] = {CRC32C_LONG, CRC32C_SHORT};
  for (int k = 0; k < 2; k++) {
    const size_t run = runs[k];
    while (n >= 3 * run) {
      uint64_t c1 = 0, c2 = 0;
      const unsigned char *end = p + run;
      do {
        uint64_t w0, w1, w2;
        __builtin_memcpy(&w0, p, 8);
        __builtin_memcpy(&w1, p + run, 8);
        __builtin_memcpy(&w2, p + 2 * run, 8);
        c0 = __builtin_ia32_crc32di(c0, w0);
        c1 = __builtin_ia32_crc32di(c1, w1);
        c2 = __builtin_ia32_crc32di(c2, w2);
        p += 8;
      } while (p < end);
      uint32_t (*zeros)[256] = k == 0 ? crc32c_long : crc32c_short;
      c0 = crc32c_shift(zeros, (uint32_t)c0) ^ (uint32_t)c1;
      c0 = crc32c_shift(zeros, (uint32_t)c0) ^ (uint32_t)c2;
      p += 2 * run;
      n -= 3 * run;
    }
  }
  while (n >= 8) {
    uint64_t w;
    __builtin_memcpy(&w, p, 8);
    c0 = __builtin_ia32_crc32di(c0, w);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = (uint32_t)c0;
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
