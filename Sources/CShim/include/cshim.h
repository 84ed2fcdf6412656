// Macros and variadic calls that Swift cannot import directly.
#ifndef DUALRESTORE_CSHIM_H
#define DUALRESTORE_CSHIM_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>

/// The size in bytes of the block device open on `fd` (ioctl BLKGETSIZE64).
/// Returns 0 on success, -1 with errno set on failure.
int dr_block_device_size(int fd, uint64_t *size);

/// The logical sector size of the block device open on `fd` (ioctl BLKSSZGET).
/// Returns 0 on success, -1 with errno set on failure.
int dr_block_device_sector_size(int fd, uint32_t *size);

/// open(2) with a mode, since Swift cannot call the variadic form.
int dr_open(const char *path, int flags, mode_t mode);

/// The flag values Swift does not see as constants on every libc.
extern const int dr_O_DIRECT;
extern const int dr_O_CLOEXEC;
extern const int dr_SEEK_DATA;
extern const int dr_SEEK_HOLE;

/// mkostemp(3), a GNU extension.
int dr_mkostemp(char *template_, int flags);

/// getrandom(2): fills `buffer` from the kernel's generator.
long dr_getrandom(void *buffer, unsigned long length);

/// CRC-32C (Castagnoli) of `length` bytes, continuing from `crc` (start at 0).
/// Uses the SSE 4.2 instruction when the processor has it.
uint32_t dr_crc32c(uint32_t crc, const void *data, size_t length);

/// fallocate(2) punching a hole (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE).
int dr_punch_hole(int fd, uint64_t offset, uint64_t length);

/// fallocate(2) with mode 0: allocates the blocks of a byte range (holes
/// only; data there stays) and extends the file to its end.
int dr_allocate(int fd, uint64_t offset, uint64_t length);

/// ioctl BLKZEROOUT: zero a byte range of a block device.
int dr_block_zero_out(int fd, uint64_t offset, uint64_t length);

/// sync_file_range(2) with SYNC_FILE_RANGE_WRITE: starts write-out of the
/// dirty pages of a byte range without waiting for it.
int dr_start_writeback(int fd, uint64_t offset, uint64_t length);

/// Pages of a file that are dirty or under write-out (cachestat(2), Linux
/// 6.5 and later); -1 with errno set where the call is missing.
long dr_unwritten_pages(int fd);

/// Pages of a byte range of a file that are in the page cache (cachestat(2),
/// Linux 6.5 and later); -1 with errno set where the call is missing.
long dr_cached_pages(int fd, uint64_t offset, uint64_t length);

/// A pipe (close-on-exec) of at least `size` bytes where the system allows,
/// for moving data between descriptors with splice(2). Returns the pipe's
/// capacity, or -1 with errno set.
long dr_pipe(int fds[2], long size);

/// splice(2) from a socket (or any descriptor read from its position) into
/// a pipe's write end: at most `length` bytes, whatever is there; unless
/// `wait`, -1 with EAGAIN when there is nothing or the pipe is full.
long dr_splice_in(int from, int pipe_in, unsigned long length, int wait);

/// splice(2) from a pipe's read end into a file at `offset`.
long dr_splice_out(int pipe_out, int to, uint64_t offset, unsigned long length);

#endif
