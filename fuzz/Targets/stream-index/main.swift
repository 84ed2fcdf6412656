import FuzzDriver

runFuzzer(.streamIndex)
