// The NBD protocol's wire constants and fixed layouts, in one place
// (NetworkBlockDevice/nbd doc/proto.md). Everything on the wire is
// big-endian. Only the fixed newstyle handshake is spoken. The messages are
// encoded and decoded in Codec/ (the only code that knows where a field
// sits); this file names the numbers and draws the layouts.
//
// Handshake, server first:
//   S: "NBDMAGIC" (8) | "IHAVEOPT" (8) | handshake flags (u16)  = 18 bytes
//   C: client flags (u32)
//   C: "IHAVEOPT" (8) | option (u32) | length (u32) | data     = 16 + data
//   S: 0x3e889045565a9 (u64) | option (u32) | reply type (u32) | length (u32)
//      | data                                                  = 20 + data
//   ... until EXPORT_NAME (answered by size u64, transmission flags u16 and,
//   without NO_ZEROES, 124 zero bytes) or an acknowledged GO.
//   GO and INFO data: name length (u32) | name | count (u16) | info (u16)...
//   NBD_REP_INFO data: info (u16) | EXPORT: size (u64), flags (u16)
//                                 | BLOCK_SIZE: minimum, preferred, maximum (u32)
//                                 | DESCRIPTION, NAME: text
//   LIST_META_CONTEXT and SET_META_CONTEXT data: name length (u32) | name |
//      query count (u32) | (query length (u32) | query)...
//   NBD_REP_META_CONTEXT data: context id (u32) | context name
//   NBD_REP_SERVER data: name length (u32) | name
// Transmission:
//   C: request magic 0x25609513 (u32) | command flags (u16) | type (u16) |
//      cookie (u64) | offset (u64) | length (u32)             = 28 bytes
//      (followed by `length` bytes of data for WRITE)
//   S: simple reply magic 0x67446698 (u32) | error (u32) | cookie (u64)
//                                                             = 16 bytes
//      (followed by `length` bytes of data for a successful READ)
//   S: structured reply chunk, once NBD_OPT_STRUCTURED_REPLY is agreed:
//      magic 0x668e33ef (u32) | flags (u16) | type (u16) | cookie (u64) |
//      length (u32) = 20 bytes, followed by `length` bytes of payload:
//      OFFSET_DATA: offset (u64) | data
//      BLOCK_STATUS: context id (u32) | (length (u32) | flags (u32))...
//      ERROR: error (u32) | message length (u16) | message
//      NONE: nothing

public enum NBD {
  public static let initMagic: UInt64 = 0x4e42_444d_4147_4943  // "NBDMAGIC"
  public static let optionMagic: UInt64 = 0x4948_4156_454f_5054  // "IHAVEOPT"
  public static let optionReplyMagic: UInt64 = 0x3_e889_0455_65a9
  /// Where an oldstyle server sends "IHAVEOPT".
  public static let oldstyleMagic: UInt64 = 0x0042_0281_8612_53
  public static let requestMagic: UInt32 = 0x2560_9513
  public static let simpleReplyMagic: UInt32 = 0x6744_6698
  public static let structuredReplyMagic: UInt32 = 0x668e_33ef
  public static let defaultPort: UInt16 = 10809

  // Handshake flags (server) and client flags.
  public static let flagFixedNewstyle: UInt16 = 1 << 0
  public static let flagNoZeroes: UInt16 = 1 << 1
  public static let clientFlagFixedNewstyle: UInt32 = 1 << 0
  public static let clientFlagNoZeroes: UInt32 = 1 << 1

  // Options.
  public static let optExportName: UInt32 = 1
  public static let optAbort: UInt32 = 2
  public static let optList: UInt32 = 3
  public static let optStartTLS: UInt32 = 5
  public static let optInfo: UInt32 = 6
  public static let optGo: UInt32 = 7
  public static let optStructuredReply: UInt32 = 8
  public static let optListMetaContext: UInt32 = 9
  public static let optSetMetaContext: UInt32 = 10

  // Option replies.
  public static let repAck: UInt32 = 1
  public static let repServer: UInt32 = 2
  public static let repInfo: UInt32 = 3
  public static let repMetaContext: UInt32 = 4
  public static let repErrUnsupported: UInt32 = 0x8000_0001
  public static let repErrPolicy: UInt32 = 0x8000_0002
  public static let repErrInvalid: UInt32 = 0x8000_0003
  public static let repErrUnknown: UInt32 = 0x8000_0006
  public static let repErrTLSRequired: UInt32 = 0x8000_0005
  public static let repErrShutdown: UInt32 = 0x8000_0007
  public static let repErrPlatform: UInt32 = 0x8000_0004
  public static let repErrBlockSizeRequired: UInt32 = 0x8000_0008
  public static let repErrTooBig: UInt32 = 0x8000_0009
  /// Set in every error reply type.
  public static let repErrorBit: UInt32 = 0x8000_0000

  // NBD_REP_INFO kinds.
  public static let infoExport: UInt16 = 0
  public static let infoName: UInt16 = 1
  public static let infoDescription: UInt16 = 2
  public static let infoBlockSize: UInt16 = 3

  // Transmission flags.
  public static let flagHasFlags: UInt16 = 1 << 0
  public static let flagReadOnly: UInt16 = 1 << 1
  public static let flagSendFlush: UInt16 = 1 << 2
  public static let flagSendFUA: UInt16 = 1 << 3
  public static let flagSendTrim: UInt16 = 1 << 5
  public static let flagSendWriteZeroes: UInt16 = 1 << 6
  /// Offered once structured replies are agreed: READ takes NBD_CMD_FLAG_DF.
  public static let flagSendDF: UInt16 = 1 << 7
  public static let flagCanMultiConn: UInt16 = 1 << 8

  // Commands and their flags.
  public static let cmdRead: UInt16 = 0
  public static let cmdWrite: UInt16 = 1
  public static let cmdDisconnect: UInt16 = 2
  public static let cmdFlush: UInt16 = 3
  public static let cmdTrim: UInt16 = 4
  public static let cmdCache: UInt16 = 5
  public static let cmdWriteZeroes: UInt16 = 6
  public static let cmdBlockStatus: UInt16 = 7
  public static let cmdFlagFUA: UInt16 = 1 << 0
  public static let cmdFlagNoHole: UInt16 = 1 << 1
  /// "Don't fragment": a READ's data in one chunk (ours always are).
  public static let cmdFlagDF: UInt16 = 1 << 2
  public static let cmdFlagReqOne: UInt16 = 1 << 3
  public static let cmdFlagFastZero: UInt16 = 1 << 4

  // Structured reply chunks, and the base:allocation context.
  public static let replyFlagDone: UInt16 = 1 << 0
  public static let replyTypeNone: UInt16 = 0
  public static let replyTypeOffsetData: UInt16 = 1
  public static let replyTypeBlockStatus: UInt16 = 5
  public static let replyTypeError: UInt16 = 0x8001
  /// Set in every error chunk type.
  public static let replyTypeErrorBit: UInt16 = 0x8000
  public static let structuredReplyLength = 20
  public static let baseAllocation = "base:allocation"
  /// The context id this server gives base:allocation.
  public static let baseAllocationID: UInt32 = 1
  public static let stateHole: UInt32 = 1 << 0
  public static let stateZero: UInt32 = 1 << 1

  // Error numbers on the wire (the protocol's, not the host's).
  public static let errPerm: UInt32 = 1
  public static let errIO: UInt32 = 5
  public static let errNoMem: UInt32 = 12
  public static let errInvalid: UInt32 = 22
  public static let errNoSpace: UInt32 = 28
  public static let errOverflow: UInt32 = 75
  public static let errNotSupported: UInt32 = 95
  public static let errShutdown: UInt32 = 108

  public static let requestLength = 28
  public static let simpleReplyLength = 16
  /// The largest READ or WRITE payload the servers accept (advertised in
  /// NBD_INFO_BLOCK_SIZE, as nbdkit's) and the clients send to a server that
  /// advertises at least as much.
  public static let maximumPayload = 64 << 20
  /// The largest READ or WRITE sent to a server that advertises no maximum:
  /// the protocol's limit for a client that wants to work with any server.
  public static let defaultMaximumPayload = 32 << 20
  /// Longest export name or option payload accepted in the handshake.
  public static let maximumOptionLength = 65536
}
