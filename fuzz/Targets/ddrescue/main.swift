import FuzzDriver

runFuzzer(.ddrescue)
