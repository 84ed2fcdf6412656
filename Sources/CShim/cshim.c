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
