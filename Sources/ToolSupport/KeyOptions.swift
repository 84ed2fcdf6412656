// `--key-file` and `--passphrase-file`: the secret of an encrypted block
// stream, read from a file only. A key on the command line would show in
// `ps` and shell history, one in the environment in /proc/PID/environ, so
// neither is offered.

import ArgumentParser
import DualRestore

public struct KeyOptions: ParsableArguments {
  @Option(
    help: ArgumentHelp(
      "Read the stream's 256-bit key from this file: exactly 32 raw bytes, or 64 hex digits and an optional newline (openssl rand -hex 32 > FILE). Keys are read from files only, never from the command line or the environment.",
      valueName: "file"), completion: .file())
  public var keyFile: String?

  @Option(
    help: ArgumentHelp(
      "Read the passphrase from this file (its content less one trailing newline, 1 to 1024 bytes); the key is derived from it with scrypt. Never from the command line or the environment.",
      valueName: "file"), completion: .file())
  public var passphraseFile: String?

  public init() {}

  public func validate() throws {
    if keyFile != nil && passphraseFile != nil {
      throw ValidationError("give one of --key-file and --passphrase-file, not both")
    }
  }

  /// Whether either option was given.
  public var given: Bool { keyFile != nil || passphraseFile != nil }

  /// The option given, for messages.
  public var optionName: String { keyFile != nil ? "--key-file" : "--passphrase-file" }

  /// The secret from the file given, or nil when neither option was.
  public func load() throws -> StreamSecret? {
    if let keyFile { return try StreamSecret.load(keyFile: keyFile) }
    if let passphraseFile { return try StreamSecret.load(passphraseFile: passphraseFile) }
    return nil
  }
}
