import FuzzDriver

runFuzzer(.streamEncrypted)
