// The toolkit is for Linux only: copying rests on splice and sendfile, the
// page cache check on cachestat, devices on O_DIRECT and the NBD ioctls, and
// every file imports Glibc. Stop a build elsewhere here, with one sentence,
// rather than at the first of those.

#if !os(Linux)
  #error("dualrestore builds for Linux only (it needs splice, sendfile, cachestat and the NBD ioctls)")
#endif
