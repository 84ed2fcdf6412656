// Opening what a tool reads: an image file, a block device, or an NBD export.

import DualRestore

/// Opens `path` for reading: an NBD URI (nbd://, nbd+unix://, or over TLS
/// nbds://, nbds+unix://) or a file or block device (with O_DIRECT when
/// `direct`).
public func openSource(_ path: String, direct: Bool = false, timeout: Double = 60) throws -> BlockDevice {
  if NBDURI.isURI(path) {
    if direct { throw ToolkitError("\(path): --direct applies to files and block devices, not NBD exports") }
    return try NBDClient(uri: path, timeout: timeout)
  }
  return try Device(path: path, options: DeviceOpenOptions(direct: direct))
}
